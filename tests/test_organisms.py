"""Every example organism loads, checks and runs once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_process import CliProcess

from xml_pipeline import load_organism

ROOT = Path(__file__).resolve().parent.parent
ORGANISMS = sorted((ROOT / "organisms").glob("*.yaml"))


def test_there_are_organisms() -> None:
    assert {p.stem for p in ORGANISMS} >= {"hello", "relay"}


@pytest.mark.parametrize("path", ORGANISMS, ids=[p.stem for p in ORGANISMS])
def test_organism_runs(path: Path, request: pytest.FixtureRequest) -> None:
    organism = load_organism(path)
    extra: list[str] = []
    if organism.backend.startswith("redis://"):
        # The example names a local Redis; the test points it at its own server.
        url = request.getfixturevalue("redis_server").url
        extra = ["--backend", url] + (["--transport", url] if organism.transport else [])
    check = subprocess.run([sys.executable, "-m", "xml_pipeline", "check", str(path)],
                           capture_output=True, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 0, check.stderr
    if organism.transport is not None:
        _runs_on_two_nodes(path, extra)
        return
    run = subprocess.run([sys.executable, "-m", "xml_pipeline", str(path), "--stats", *extra],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(organism.boot), run.stdout
    assert not any(b"<huh" in line for line in lines), run.stdout
    assert b"Traceback" not in run.stderr


def _runs_on_two_nodes(path: Path, extra: list[str]) -> None:
    """An organism on a transport, as its header says: node b serves every listener
    but the boot messages' targets, node a serves those and sends the boot messages;
    a prints one reply per boot message."""
    organism = load_organism(path)
    targets = sorted({boot.to for boot in organism.boot if boot.to is not None})
    rest = [listener.name for listener in organism.listeners if listener.name not in targets]
    with CliProcess("run", path, "--node", "b", "--listeners", ",".join(rest), "--no-boot",
                    "--log-level", "info", *extra) as b:  # fmt: skip
        b.wait_for_stderr(b"is running")
        with CliProcess("run", path, "--node", "a", "--listeners", ",".join(targets),
                        *extra) as a:  # fmt: skip
            lines = [a.readline() for _ in organism.boot]
            a.signal(signal.SIGTERM)
            a.finish()
        b.signal(signal.SIGTERM)
        _, err = b.finish()
    assert all(line.startswith(b"<message") for line in lines), lines
    assert not any(b"<huh" in line for line in lines), lines
    assert a.returncode == 0 and b.returncode == 0, err
    assert b"Traceback" not in err
