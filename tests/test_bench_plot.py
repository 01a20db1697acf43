"""bench --plot: a real run drawn to SVG and PNG; a clear error without matplotlib;
the timeline is recorded only when asked; matplotlib's global state is left alone."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

from lxml import etree

from xml_pipeline import load_organism
from xml_pipeline.cli.bench import BenchMessage, BenchOptions, run_bench

ROOT = Path(__file__).resolve().parent.parent
RELAY = ROOT / "organisms" / "relay.yaml"
SVG = "{http://www.w3.org/2000/svg}svg"
DC_TITLE = "{http://purl.org/dc/elements/1.1/}title"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXTS = (
    "Latency distribution",
    "latency (ms), from sending a message to its first reply",
    "messages",
    "Throughput over time",
    "time since the start of the run (s)",
    "messages/s (answered or not)",
)
# Runs the command line with matplotlib made unimportable (None in sys.modules).
WITHOUT_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None; "
    "from xml_pipeline.cli import main; sys.exit(main())"
)


def bench(*args: str | Path, code: str | None = None) -> subprocess.CompletedProcess[str]:
    head = ["-c", code] if code is not None else ["-m", "xml_pipeline"]
    return subprocess.run(
        [sys.executable, *head, "bench", *map(str, args)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_plot_svg_of_a_real_run(tmp_path: Path) -> None:
    out = tmp_path / "run.svg"
    done = bench(RELAY, "--messages", "300", "--concurrency", "8", "--plot", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("bench relay 300 msgs")  # the table stays
    root = etree.parse(str(out)).getroot()
    assert root.tag == SVG
    # Text is drawn as paths; matplotlib keeps each text in a comment beside them.
    texts = {c.text.strip() for c in root.iter(etree.Comment) if c.text}
    for text in TEXTS:
        assert text in texts, text
    assert any(t.startswith("p50 ") and t.endswith(" ms") for t in texts)
    assert any(t.startswith("mean ") and t.endswith(" msg/s") for t in texts)
    title = root.find(f".//{DC_TITLE}")
    assert title is not None and title.text is not None
    assert title.text.startswith("bench relay: 300 messages, ")


def test_plot_png_of_a_real_run(tmp_path: Path) -> None:
    out = tmp_path / "run.PNG"
    done = bench(RELAY, "--messages", "200", "--concurrency", "4", "--plot", out)
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 400


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path) -> None:
    out = tmp_path / "run.svg"
    done = bench(RELAY, "--messages", "50", "--plot", out, code=WITHOUT_MATPLOTLIB)
    assert done.returncode == 2
    assert done.stderr == (
        "xml_pipeline: error: --plot needs matplotlib: pip install 'xml-pipeline[plot]'\n"
    )
    assert done.stdout == ""  # refused before the run
    assert not out.exists()
    # Positive control: the same wrapper runs the bench when --plot is not given.
    done = bench(RELAY, "--messages", "50", code=WITHOUT_MATPLOTLIB)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("bench relay 50 msgs")


def test_plot_file_errors_are_usage_errors(tmp_path: Path) -> None:
    for path, problem in [
        (tmp_path / "run.pdf", "the file name must end in .svg or .png"),
        (tmp_path / "missing" / "run.svg", "cannot write there"),
        (tmp_path, "the file name must end in .svg or .png"),
    ]:
        done = bench(RELAY, "--messages", "10", "--plot", path)
        assert done.returncode == 2
        assert done.stderr == f"xml_pipeline: error: --plot {path}: {problem}\n"


async def test_the_timeline_is_recorded_only_when_asked() -> None:
    organism = load_organism(RELAY)
    messages = [BenchMessage(b.payload, b.to, b.sender) for b in organism.boot]
    plain = await run_bench(organism, messages, BenchOptions(messages=100, concurrency=8))
    assert len(plain.latencies_s) == 100 and len(plain.completed_s) == 0
    options = BenchOptions(messages=100, concurrency=8, timeline=True)
    timed = await run_bench(organism, messages, options)
    assert len(timed.completed_s) == 100
    assert list(timed.completed_s) == sorted(timed.completed_s)
    assert 0 < timed.completed_s[-1] <= timed.elapsed_s


def test_write_plot_leaves_matplotlib_global_state_alone(tmp_path: Path) -> None:
    code = f"""if True:
        import sys, matplotlib
        # dict.items: reading rcParams["backend"] itself would resolve it (pyplot).
        params = dict(dict.items(matplotlib.rcParams))
        from xml_pipeline.cli._plot import write_plot
        report = {{"organism": "o", "messages": 3, "msgs_per_s": 3.0, "hops_per_s": 3.0,
                  "loop": "asyncio", "options": {{"concurrency": 1}}, "elapsed_s": 1.0,
                  "latency_ms": {{"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 3.0}}}}
        write_plot(__import__("pathlib").Path({str(tmp_path / "x.png")!r}), report,
                   [0.001, 0.002, 0.003], [0.2, 0.5, 1.0])
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
        assert dict(dict.items(matplotlib.rcParams)) == params, "rcParams changed"
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)  # fmt: skip
    assert done.stdout == "ok\n", done.stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_SIGNATURE
