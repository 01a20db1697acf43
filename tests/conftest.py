"""Shared fixtures: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from xml_pipeline import (
    Listener,
    Organism,
    ProcessPoolSettings,
    PumpSettings,
    Reply,
    StreamPump,
)


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class Harness:
    """A running pump plus everything that left it."""

    def __init__(self, pump: StreamPump, replies: list[Reply]) -> None:
        self.pump = pump
        self.replies = replies

    @property
    def backend(self) -> Any:
        return self.pump.backend


@pytest.fixture
def run_pump() -> Callable[..., Any]:
    """``async with run_pump(listeners, **settings) as h:`` → a Harness."""

    @asynccontextmanager
    async def factory(
        listeners: list[Listener],
        *,
        history: Any = None,
        process_pool: ProcessPoolSettings | None = None,
        **settings: Any,
    ) -> AsyncIterator[Harness]:
        kwargs: dict[str, Any] = {"settings": PumpSettings(**settings)}
        if history is not None:
            kwargs["history"] = history
        if process_pool is not None:
            kwargs["process_pool"] = process_pool
        organism = Organism(name="test", listeners=tuple(listeners), **kwargs)
        replies: list[Reply] = []
        async with StreamPump(organism, egress=replies.append) as pump:
            yield Harness(pump, replies)

    return factory


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real ``redis-server`` on a free loopback port for the whole session.

    Fails (never skips) when the server cannot be started; stopped at the end.
    """
    from redis_server import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server
