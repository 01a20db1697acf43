"""The public conformance suite, run against every backend."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from xml_pipeline import testing
from xml_pipeline.backends import Backend, DeadLetter, HistoryLimits
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.testing import (
    CHECKS,
    Check,
    ConformanceError,
    backend_state_machine,
    check_backend,
    run_check,
)


@asynccontextmanager
async def memory(limits: HistoryLimits) -> AsyncIterator[Backend]:
    backend = MemoryBackend(limits)
    try:
        yield backend
    finally:
        await backend.aclose()


FACTORIES = {"memory": memory}


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
@pytest.mark.parametrize("name", sorted(FACTORIES))
async def test_conformance(name: str, check: Check) -> None:
    await run_check(FACTORIES[name], check)


async def test_check_backend_runs_everything() -> None:
    await check_backend(memory)


async def test_a_broken_backend_is_caught() -> None:
    class Forgetful(MemoryBackend):
        async def buffer_append(self, thread_id, slot):  # type: ignore[no-untyped-def]
            await super().buffer_append(thread_id, slot._replace(message_id=slot.message_id + "!"))
            return 0

    @asynccontextmanager
    async def forgetful(limits: HistoryLimits) -> AsyncIterator[Backend]:
        yield Forgetful(limits)

    with pytest.raises(ConformanceError, match="append and read") as info:
        await check_backend(forgetful)
    assert isinstance(info.value, AssertionError), "test runners report it as a failure"
    assert "got" in str(info.value) and "expected" in str(info.value)


async def test_an_exception_in_a_check_names_the_check() -> None:
    class Crashing(MemoryBackend):
        async def registry_setdefault(self, chain: str, uuid: str) -> str:
            raise KeyError("boom")

    @asynccontextmanager
    async def crashing(limits: HistoryLimits) -> AsyncIterator[Backend]:
        yield Crashing(limits)

    with pytest.raises(ConformanceError, match="check 'registry' failed: KeyError: 'boom'"):
        await check_backend(crashing)


async def test_a_backend_without_batched_dead_letters_is_caught() -> None:
    class Unbatched(MemoryBackend):
        async def deadletter_add_many(self, letters: Sequence[DeadLetter]) -> list[str]:
            return [await self.deadletter_add(letter) for letter in letters[:1]]

    @asynccontextmanager
    async def unbatched(limits: HistoryLimits) -> AsyncIterator[Backend]:
        yield Unbatched(limits)

    with pytest.raises(ConformanceError, match=r"'dead letters in one batch' failed: .*one id"):
        await check_backend(unbatched)


# A broken backend run through check_backend in a fresh interpreter; argv[1] picks it.
OPTIMIZED_RUN = """
import asyncio, sys
from contextlib import asynccontextmanager
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.testing import check_backend

class Forgetful(MemoryBackend):
    async def buffer_append(self, thread_id, slot):
        await super().buffer_append(thread_id, slot._replace(message_id=slot.message_id + "!"))
        return 0

@asynccontextmanager
async def factory(limits):
    backend = (Forgetful if sys.argv[1] == "broken" else MemoryBackend)(limits)
    try:
        yield backend
    finally:
        await backend.aclose()

print("optimize", sys.flags.optimize)
try:
    asyncio.run(check_backend(factory))
except AssertionError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
print("passed")
"""


@pytest.mark.parametrize(("which", "status"), [("broken", 3), ("correct", 0)])
def test_check_backend_does_not_rely_on_assert(which: str, status: int) -> None:
    """Under python -O (asserts stripped) a broken backend still fails; a correct one passes."""
    run = subprocess.run([sys.executable, "-O", "-c", OPTIMIZED_RUN, which],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.stdout.startswith("optimize 1\n"), run.stdout + run.stderr
    assert run.returncode == status, run.stdout + run.stderr
    if which == "broken":
        assert "ConformanceError conformance check 'append and read' failed" in run.stdout
    else:
        assert run.stdout.endswith("passed\n")


def test_conformance_error_is_public() -> None:
    assert "ConformanceError" in testing.__all__ and issubclass(ConformanceError, AssertionError)


TestMemoryStateMachine = backend_state_machine(memory).TestCase
