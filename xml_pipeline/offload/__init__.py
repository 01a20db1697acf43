"""Where handlers that are not plain coroutines run.

- :mod:`~xml_pipeline.offload.pool`: :class:`WorkerPool`, the worker processes of
  ``cpu_bound`` listeners (batching, crash recovery, timeouts, recycling); each
  process runs :mod:`xml_pipeline.worker`, the worker entry point.
- :mod:`~xml_pipeline.offload.threads`: :class:`SyncRunner`, the few daemon threads of
  each listener whose handler is a plain (sync) function.
"""

from __future__ import annotations

from .pool import PoolStatistics, WorkerPool, worker_spec
from .threads import SyncRunner

__all__ = ["PoolStatistics", "SyncRunner", "WorkerPool", "worker_spec"]
