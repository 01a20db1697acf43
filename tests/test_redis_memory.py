"""A Redis that would lose data, or that is full, is seen for what it is (real
redis-server of each test's own, since the tests change its configuration)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_server import RedisServer, running_redis

from xml_pipeline import BackendUnavailable, ConfigError
from xml_pipeline.backends import HistoryLimits, Slot
from xml_pipeline.backends.redis import RedisBackend


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def _config(url: str, name: str, value: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.config_set(name, value)
    finally:
        await client.aclose()


async def test_a_redis_that_evicts_keys_is_refused_unless_allowed(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await _config(server.url, "maxmemory-policy", "allkeys-lru")
    backend = RedisBackend.from_url(server.url)
    try:
        with pytest.raises(ConfigError, match="maxmemory-policy is allkeys-lru"):
            await backend.ping()
    finally:
        await backend.aclose()
    allowed = RedisBackend.from_url(server.url, allow_eviction=True)
    try:
        with caplog.at_level(logging.WARNING, logger="xml_pipeline.backends.redis"):
            await allowed.ping()
        assert "may evict" in caplog.text
    finally:
        await allowed.aclose()
    await _config(server.url, "maxmemory-policy", "noeviction")
    fine = RedisBackend.from_url(server.url)
    try:
        await fine.ping()
    finally:
        await fine.aclose()


async def test_a_full_redis_is_unavailable_until_memory_is_freed(server: RedisServer) -> None:
    """Out of memory (maxmemory, noeviction) is BackendUnavailable, as an outage is:
    nothing was written and the same call succeeds once there is room."""
    backend = RedisBackend.from_url(server.url, HistoryLimits(), retries=0)
    try:
        await backend.ping()
        await _config(server.url, "maxmemory", "2mb")
        big = b"<P>" + b"x" * 100_000 + b"</P>"

        async def fill() -> None:
            for i in range(1000):
                slot = Slot(0, "in", "a", "b", "{urn:x}P", f"m{i}", 1.0, big)
                await backend.buffer_append(f"thread-{i}", slot)

        with pytest.raises(BackendUnavailable, match="out of memory"):
            await fill()
        await _config(server.url, "maxmemory", "0")
        slot = Slot(0, "in", "a", "b", "{urn:x}P", "after", 1.0, b"<P/>")
        assert await backend.buffer_append("thread-after", slot) == 0
    finally:
        await backend.aclose()
