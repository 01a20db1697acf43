"""Backend URL schemes: the registry, serve flags, joining URLs, Redis over a unix socket."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline import StreamPump, load_organism
from xml_pipeline.backends import (
    SCHEMES,
    Backend,
    BackendUnavailable,
    HistoryLimits,
    ManagerOptions,
    RedisOptions,
    backend_scheme,
    check_backend_url,
    client_url,
    open_backend,
    redact_url,
    serves,
)
from xml_pipeline.backends.manager import ManagerBackend
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.config import OrganismConfig
from xml_pipeline.testing import CHECKS, Check, run_check

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "organisms" / "hello.yaml"
KEY = "test-scheme-key"
VALID = "memory://, manager://, redis://, rediss://, unix://"


# -- the registry ------------------------------------------------------------------------


def test_every_scheme_has_one_record() -> None:
    assert list(SCHEMES) == ["memory", "manager", "redis", "rediss", "unix"]
    assert all(scheme.name == name for name, scheme in SCHEMES.items())
    flags = {name: (s.shared, s.persistent, s.servable) for name, s in SCHEMES.items()}
    assert flags == {
        "memory": (False, False, False),
        "manager": (True, True, True),
        "redis": (True, True, False),
        "rediss": (True, True, False),
        "unix": (True, True, False),
    }
    assert backend_scheme("rediss://h:6380/0").section == "redis"
    assert backend_scheme("unix:///run/redis.sock?db=0").options is RedisOptions
    assert backend_scheme("manager://h:1").options is ManagerOptions


def test_each_options_section_is_the_organism_files() -> None:
    fields = OrganismConfig.model_fields
    for scheme in SCHEMES.values():
        if scheme.section is None:
            assert scheme.options is None
            continue
        assert fields[scheme.section].annotation is scheme.options, scheme.name


@pytest.mark.parametrize(
    "url", ["pigeon://x", "localhost:6379", "redis", "", "http://[::1", "memory:"]
)
def test_an_unknown_scheme_is_one_message_naming_every_valid_one(url: str) -> None:
    for call in (backend_scheme, check_backend_url, open_backend):
        with pytest.raises(BackendUnavailable) as info:
            call(url)
        assert str(info.value) == f"unknown backend URL {url!r}: the schemes available are {VALID}"


def test_an_unknown_scheme_error_hides_the_password() -> None:
    with pytest.raises(BackendUnavailable) as info:
        backend_scheme("redis+sentinel://:s3cret@h:1/0")
    assert "s3cret" not in str(info.value) and ":***@" in str(info.value)


def test_looking_at_urls_imports_no_backend_module() -> None:
    code = textwrap.dedent("""
        import sys
        from xml_pipeline.backends import backend_scheme, client_url, serves
        for url in ("redis://h:1/0", "rediss://h:1/0", "unix:///r.sock", "manager://h:1"):
            backend_scheme(url)
            serves(url, {})
            client_url(url, {})
        loaded = [m for m in ("redis", "xml_pipeline.backends.redis",
                              "xml_pipeline.backends.manager") if m in sys.modules]
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout


def test_memory_backend_from_url() -> None:
    backend = open_backend("memory://", HistoryLimits(max_threads=3))
    assert isinstance(backend, MemoryBackend) and backend.limits.max_threads == 3
    with pytest.raises(BackendUnavailable, match="not a memory URL"):
        MemoryBackend.from_url("redis://h:1/0")


# -- serve flags and joining URLs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("manager://127.0.0.1:5000", {}, False),
        ("manager://127.0.0.1:5000", None, False),
        ("manager://127.0.0.1:5000", {"serve": True}, True),
        ("manager://127.0.0.1:5000?serve=1", {}, True),
        ("manager://127.0.0.1:5000?serve=true", {}, True),
        ("manager://127.0.0.1:5000?serve=TRUE", {}, True),
        ("manager://127.0.0.1:5000?serve=yes", {"serve": False}, True),
        ("manager://127.0.0.1:5000?serve=0", {"serve": True}, False),
        ("manager://127.0.0.1:5000?serve=false", {"serve": True}, False),
        ("memory://", {}, False),
        ("redis://127.0.0.1:6379/0", {"prefix": "p"}, False),
        ("unix:///run/redis.sock?db=0", {}, False),
    ],
)
def test_serves(url: str, options: dict[str, Any] | None, expected: bool) -> None:
    assert serves(url, options) is expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("manager://127.0.0.1:5000?serve=maybe", "serve='maybe' is not a flag"),
        ("manager://127.0.0.1:5000?serve=", "serve='' is not a flag"),
        ("redis://127.0.0.1:6379/0?serve=1", r"redis:// store cannot be served.*manager://"),
        ("memory://?serve=true", "memory:// store cannot be served"),
    ],
)
def test_serves_refuses(url: str, match: str) -> None:
    with pytest.raises(BackendUnavailable, match=match):
        serves(url, {})


def test_the_serve_flag_means_the_same_to_the_manager_backend() -> None:
    for url, serving in [
        ("manager://127.0.0.1:5000?serve=true", True),
        ("manager://127.0.0.1:5000?serve=1", True),
        ("manager://127.0.0.1:5000?serve=no", False),
    ]:
        backend = ManagerBackend.from_url(url, authkey=KEY, serve=not serving)
        assert ("serving" in repr(backend)) is serving, url
    with pytest.raises(BackendUnavailable, match="not a flag"):
        ManagerBackend.from_url("manager://127.0.0.1:5000?serve=maybe", authkey=KEY)


def test_client_url() -> None:
    options = {"authkey": KEY, "serve": True, "connect_timeout_s": 2.0}
    assert client_url("manager://127.0.0.1:5000?serve=1", options) == (
        "manager://127.0.0.1:5000",
        {"authkey": KEY, "serve": False, "connect_timeout_s": 2.0},
    )
    assert options["serve"] is True, "the caller's options are not changed"
    assert client_url("manager://127.0.0.1:5000", {"serve": True})[1]["serve"] is False
    redis_options = {"prefix": "p", "retries": 1}
    for url in ("redis://:pw@h:1/0", "rediss://h:1/2", "unix:///r.sock?db=3"):
        assert client_url(url, redis_options) == (url, redis_options)
    with pytest.raises(BackendUnavailable, match="lives in one process"):
        client_url("memory://", {})
    with pytest.raises(BackendUnavailable, match=r"port 0 .*--backend manager://HOST:PORT"):
        client_url("manager://127.0.0.1:0?serve=1", {})


async def test_a_pool_worker_joins_the_store_a_pump_serves_at_port_0() -> None:
    options = {"authkey": KEY, "serve": False}
    url = "manager://127.0.0.1:0?serve=true"
    served = open_backend(url, None, **options)
    try:
        await served.ping()
        joined_url, joined_options = client_url(url, options, backend=served)
        assert joined_url.startswith("manager://127.0.0.1:") and not joined_url.endswith(":0")
        assert joined_options["serve"] is False and "serve" not in joined_url
        joined = open_backend(joined_url, None, **joined_options)
        try:
            [letter_id] = await served.deadletter_add_many([_letter()])
            assert [x.id for x in await joined.deadletter_list()] == [letter_id]
        finally:
            await joined.aclose()
    finally:
        await served.aclose()


def _letter() -> Any:
    from xml_pipeline.backends import DeadLetter

    return DeadLetter("", 1.0, "malformed", "r", None, None, None, b"<x")


# -- redacting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:s3cret@h:1/0", "redis://user:***@h:1/0"),
        ("unix:///run/r.sock?db=0&password=s3cret", "unix:///run/r.sock?db=0&password=***"),
        ("unix://user@/run/r.sock?password=s3cret", "unix://user@/run/r.sock?password=***"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("manager://127.0.0.1:1?serve=1", "manager://127.0.0.1:1?serve=1"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- Redis over a unix socket -------------------------------------------------------------


def _answers(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_unix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server listening on a unix socket only: its ``unix://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    directory = tmp_path_factory.mktemp("redis-unix")
    path = directory / "redis.sock"
    args = [
        binary, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
    ]  # fmt: skip
    with open(directory / "redis.log", "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not _answers(path):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not listen on {path}")
            time.sleep(0.02)
        yield f"unix://{path}?db=0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def unix_factory(url: str) -> Any:
    @asynccontextmanager
    async def factory(limits: HistoryLimits) -> AsyncIterator[Backend]:
        prefix = f"test-{uuid.uuid4().hex[:12]}"
        backend = open_backend(url, limits, prefix=prefix)
        try:
            yield backend
        finally:
            await backend.aclose()
            cleaner = open_backend(url, limits, prefix=prefix)
            await cleaner.buffer_clear()
            await cleaner.registry_clear()
            await cleaner.deadletter_purge()
            await cleaner.aclose()

    return factory


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
async def test_conformance_over_a_unix_socket(redis_unix: str, check: Check) -> None:
    await run_check(unix_factory(redis_unix), check)


async def test_the_pump_runs_on_redis_over_a_unix_socket(redis_unix: str) -> None:
    organism = load_organism(HELLO, backend=redis_unix)
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    organism = dataclasses.replace(
        organism, backend_options={**organism.backend_options, "prefix": prefix}
    )
    greeting = '<Greeting xmlns="https://example.org/hello"><name>unix</name></Greeting>'
    async with StreamPump(organism) as pump:
        reply = await pump.request(greeting, to="greeter", sender="caller", timeout=30)
        await pump.wait_idle()
        assert "UNIX" in str(reply.payload)
        assert len(await pump.backend.buffer_list_threads()) == 3
        await pump.backend.buffer_clear()
        await pump.backend.registry_clear()


def test_unix_urls_take_the_redis_section(tmp_path: Path) -> None:
    path = tmp_path / "o.yaml"
    path.write_text(
        textwrap.dedent("""
        organism: {name: t}
        backend: unix:///run/redis.sock?db=0
        redis: {prefix: p, retries: 1}
        listeners: [{name: a, payload: support:Ping, handler: support:pong}]
        """)
    )
    organism = load_organism(path)
    assert organism.backend_options == {**RedisOptions().model_dump(), "prefix": "p", "retries": 1}


def test_the_cli_checks_a_unix_url(tmp_path: Path, redis_unix: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "check", str(HELLO), "--backend", redis_unix],
        capture_output=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


async def test_an_absent_unix_socket_is_one_line(tmp_path: Path) -> None:
    backend = open_backend(f"unix://{tmp_path}/none.sock?db=0", None, connect_timeout_s=1.0)
    try:
        with pytest.raises(BackendUnavailable, match="is unreachable: No such file or directory"):
            await asyncio.wait_for(backend.ping(), 10)
    finally:
        await backend.aclose()


def test_a_missing_redis_package_is_one_line_naming_the_extra() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["redis"] = None  # as if it were not installed
        from xml_pipeline.backends import BackendUnavailable, open_backend
        for url in ("redis://h:1/0", "unix:///r.sock"):
            try:
                open_backend(url)
            except BackendUnavailable as exc:
                print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    lines = out.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "redis:// needs the redis package: pip install 'xml-pipeline[redis]'",
        "unix:// needs the redis package: pip install 'xml-pipeline[redis]'",
    ], out.stdout
