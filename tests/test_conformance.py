"""The public conformance suite, run against every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from xml_pipeline.backends import Backend, HistoryLimits
from xml_pipeline.backends.memory import MemoryBackend
from xml_pipeline.testing import CHECKS, Check, backend_state_machine, check_backend, run_check


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

    with pytest.raises(AssertionError, match="append and read"):
        await check_backend(forgetful)


TestMemoryStateMachine = backend_state_machine(memory).TestCase
