"""Every example organism loads, checks and runs once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
        extra = ["--backend", request.getfixturevalue("redis_server").url]
    check = subprocess.run([sys.executable, "-m", "xml_pipeline", "check", str(path)],
                           capture_output=True, timeout=60, check=False)  # fmt: skip
    assert check.returncode == 0, check.stderr
    run = subprocess.run([sys.executable, "-m", "xml_pipeline", str(path), "--stats", *extra],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(organism.boot), run.stdout
    assert not any(b"<huh" in line for line in lines), run.stdout
    assert b"Traceback" not in run.stderr
