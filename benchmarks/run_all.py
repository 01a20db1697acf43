"""Run every benchmark script and write one report.

Each script runs as its own subprocess (its own floor, its own event loops, no state
left over from the one before), writes its JSON to ``benchmarks/results/<name>.json``,
and this runner gathers them into ``benchmarks/results/report.json`` and a Markdown
summary ``benchmarks/results/report.md``: one line per case with its ratio to the floor
and whether its aims were met. The scripts' own output streams through as they run;
the summary lines are printed again at the end.

    python benchmarks/run_all.py                    # full sizes: ~15 minutes, soak included
    python benchmarks/run_all.py --quick            # a smoke run: ~2 minutes
    python benchmarks/run_all.py --skip soak,backends
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (arguments of a full run, arguments of a --quick run)
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "relay": ([], ["--messages", "2000", "--repeat", "1", "--latency-messages", "4000"]),
    "stages": ([], ["--number", "2000"]),
    "broadcast": ([], ["--messages", "2000", "--repeat", "1"]),
    "payloads": ([], ["--messages", "200", "--element-messages", "40", "--repeat", "1"]),
    "offload": ([], ["--messages", "3000", "--heavy-messages", "200"]),
    "fanout": ([], ["--fast-messages", "1000", "--rounds", "2", "--repeat", "1"]),
    "backends": ([], ["--ops", "500", "--messages", "1000", "--rounds", "1"]),
    "distributed": ([], ["--messages", "500", "--latency-messages", "50"]),
    "soak": ([], ["--messages", "150000", "--every", "50000"]),
    "memory": ([], ["--conversations", "5000", "--no-tracemalloc"]),
    "store_stalls": ([], ["--messages", "20000"]),
}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def run_script(name: str, extra: list[str], results: Path) -> dict[str, Any]:
    out = results / f"{name}.json"
    if out.exists():
        out.unlink()
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out), *extra]
    shown = " ".join(["python", os.path.relpath(cmd[1], ROOT), *extra])
    print(f"== {name}: {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    seconds = time.perf_counter() - start
    entry: dict[str, Any] = {
        "script": name,
        "command": shown,
        "returncode": proc.returncode,
        "seconds": seconds,
    }
    if proc.returncode == 0 and out.exists():
        entry["report"] = json.loads(out.read_text())
    else:
        entry["error"] = f"exit status {proc.returncode}" + ("" if out.exists() else ", no JSON")
    return entry


def cases_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return list(entry.get("report", {}).get("cases", []))


def aims_cell(case: dict[str, Any]) -> str:
    aims = case.get("aims") or []
    if not aims:
        return ""
    text = "; ".join(
        f"{a['what']} {a['op']} {a['target']:g}: {'met' if a['met'] else '**NOT MET**'}"
        f" ({a['value']:.3g})"
        for a in aims
    )
    return text.replace("|", "\\|")


def floor_text(entry: dict[str, Any]) -> str:
    report = entry.get("report", {})
    floors = report.get("floors")
    if floors:
        return ", ".join(f"{k} {v['msgs_per_s']:,.0f} msg/s" for k, v in floors.items())
    floor = report.get("floor")
    return f"{floor['hops_per_s']:,.0f} hops/s" if floor else "-"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Benchmark report",
        "",
        f"{report['time']}, commit {report['commit']}, Python {report['python']}, "
        f"{report['cpus']} CPUs{', **quick run** (smoke sizes)' if report['quick'] else ''}.",
        "`ratio` is each case's throughput over the floor measured in the same script run "
        "(see benchmarks/README.md).",
        "",
        "| script | case | ratio | aims |",
        "|---|---|---:|---|",
    ]
    for entry in report["scripts"]:
        if "error" in entry:
            lines.append(f"| {entry['script']} | **failed: {entry['error']}** | | |")
            continue
        for case in cases_of(entry):
            ratio = case.get("ratio")
            cell = f"{ratio:.2f}" if isinstance(ratio, int | float) else ""
            lines.append(f"| {entry['script']} | {case['case']} | {cell} | {aims_cell(case)} |")
    lines += ["", "Floors: " + "; ".join(
        f"{e['script']} {floor_text(e)}" for e in report["scripts"] if "error" not in e
    ) + ".", "", "Summary lines:", "", "```"]  # fmt: skip
    for entry in report["scripts"]:
        lines += [case["summary"] for case in cases_of(entry)]
    lines += ["```", ""]
    met = sum(a["met"] for e in report["scripts"] for c in cases_of(e) for a in c["aims"])
    total = sum(len(c["aims"]) for e in report["scripts"] for c in cases_of(e))
    lines.append(f"Aims met: {met} of {total}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--skip", action="append", default=[], help="scripts to skip (name[,name])")
    ap.add_argument("--only", default="", help="run only these scripts (name[,name])")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="output folder")
    args = ap.parse_args()
    skip = {s for item in args.skip for s in item.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    unknown = (skip | only) - set(SCRIPTS)
    if unknown:
        ap.error(f"unknown script(s): {', '.join(sorted(unknown))} (of {', '.join(SCRIPTS)})")
    names = [n for n in SCRIPTS if n not in skip and (not only or n in only)]
    args.results.mkdir(parents=True, exist_ok=True)

    entries = []
    for name in names:
        full, quick = SCRIPTS[name]
        entries.append(run_script(name, quick if args.quick else full, args.results))
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "scripts": entries,
    }
    (args.results / "report.json").write_text(json.dumps(report, indent=2))
    (args.results / "report.md").write_text(markdown(report))

    print("\n== summary", flush=True)
    for entry in entries:
        if "error" in entry:
            print(f"{entry['script']}: FAILED ({entry['error']})")
        for case in cases_of(entry):
            print(case["summary"])
    print(f"\nreport: {args.results / 'report.md'} and report.json")
    return 1 if any("error" in e for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
