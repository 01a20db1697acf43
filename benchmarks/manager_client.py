"""Manager client benchmark: what one call costs the client, for one checkout or
several compared in the same run.

    python benchmarks/manager_client.py                          # this checkout
    git worktree add /tmp/before <rev>
    python benchmarks/manager_client.py --tree /tmp/before --tree .   # A/B, alternating

For each tree (a checkout of this repository; ``.`` is this one) a child process
puts the tree first on ``sys.path``, starts that tree's standalone store
(``python -m xml_pipeline manager`` on a free loopback port) and times, with that
tree's ``ManagerBackend`` on one event loop:

- ``round trip``: sequential ``ping`` calls: wall µs per call (p50) and the client
  process's CPU per call (the server is another process);
- ``history``: sequential ``buffer_get_thread`` of a 50-slot history: the same two.

Trees run one after the other, ``--rounds`` times in turn, so that a burst of load
from elsewhere lands on all of them; each figure is the median of its rounds. The
first tree is the reference: the others' lines carry their CPU ratio to it. The
issue's aim for the history read is a client CPU 3 times lower than the first
asyncio-streams rewrite's starting point (the client with an I/O thread).

Only ``ManagerBackend.from_url``, ``ping``, ``buffer_append``, ``buffer_get_thread``
and ``aclose`` of a tree are used, so older checkouts run unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
AUTHKEY = "manager-client-benchmark"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(tree: Path, loop: str, calls: int) -> dict[str, float]:
    """Measure ``tree``'s client (run in a process of its own)."""
    sys.path.insert(0, str(tree))
    import asyncio

    from xml_pipeline.backends.base import Slot
    from xml_pipeline.backends.manager import ManagerBackend

    port = _free_port()
    env = dict(os.environ, XML_PIPELINE_MANAGER_AUTHKEY=AUTHKEY, PYTHONPATH=str(tree))
    server = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "manager", "--address", f"127.0.0.1:{port}"],
        env=env,
        cwd=tree,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        if not server.stdout.readline():  # the URL, once clients can connect
            raise RuntimeError(f"the manager server of {tree} did not start")

        async def measure() -> dict[str, float]:
            backend = ManagerBackend.from_url(f"manager://127.0.0.1:{port}", authkey=AUTHKEY)
            try:
                await backend.ping()
                xml = b'<Hop xmlns="urn:b"><seq>1</seq></Hop>'
                for i in range(50):
                    slot = Slot(0, "in", "relay.1", "relay.2", "{urn:b}Hop", f"m{i}", 1.5, xml)
                    await backend.buffer_append("reader", slot)
                figures: dict[str, float] = {}
                cases = (("round_trip", backend.ping), ("history", _reader(backend)))
                for name, call in cases:
                    walls = []
                    cpu0 = time.process_time()
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        await call()
                        walls.append(time.perf_counter() - t0)
                    figures[f"{name}_cpu_us"] = (time.process_time() - cpu0) / calls * 1e6
                    figures[f"{name}_p50_us"] = statistics.median(walls) * 1e6
                return figures
            finally:
                await backend.aclose()

        if loop == "uvloop":
            import uvloop

            return uvloop.run(measure())
        return asyncio.run(measure())
    finally:
        server.terminate()
        server.wait(10)


def _reader(backend: Any) -> Any:
    async def read() -> None:
        await backend.buffer_get_thread("reader")

    return read


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--calls", type=int, default=2000, help="calls per case (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per tree (default %(default)s)")
    ap.add_argument("--json", type=Path, default=RESULTS / "manager_client.json")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.loop, args.calls)))
        return 0
    trees = [tree.resolve() for tree in (args.tree or [HERE.parent.parent])]
    runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, str(HERE), "--child", str(tree), "--loop", args.loop,
                 "--calls", str(args.calls)],
                capture_output=True, text=True, check=True, cwd=tree,
            )  # fmt: skip
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
    cases = []
    reference: dict[str, float] | None = None
    for tree in trees:
        median = {key: statistics.median(run[key] for run in runs[tree]) for key in runs[tree][0]}
        line = (
            f"manager client {args.loop:7s} round trip {median['round_trip_p50_us']:6.1f} us "
            f"(cpu {median['round_trip_cpu_us']:5.1f} us)  50-slot history "
            f"{median['history_p50_us']:6.1f} us (cpu {median['history_cpu_us']:5.1f} us)"
        )
        if reference is None:
            reference = median
        else:
            trip = median["round_trip_cpu_us"] / reference["round_trip_cpu_us"]
            history = median["history_cpu_us"] / reference["history_cpu_us"]
            line += f"  cpu vs first: round trip {trip:.2f}, history {history:.2f}"
        line += f"  [{tree}]"
        print(line)
        cases.append({"case": f"manager client {tree}", "summary": line, "ratio": None,
                      "aims": [], "tree": str(tree), "rounds": runs[tree], **median})  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "manager_client",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "floor": None,
        "cases": cases,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
