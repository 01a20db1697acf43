"""``bench --plot FILE``: the latency distribution and the throughput over time of a
run, drawn with matplotlib (the optional extra ``plot``) as SVG or PNG.

matplotlib is imported only here, and only when a plot is asked for. The figure is
a :class:`matplotlib.figure.Figure` on its own Agg canvas: neither ``pyplot`` nor
``matplotlib.use()`` is touched, so a program that calls :func:`write_plot` keeps
its own backend and figures (no process-wide state changes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "INSTALL_HINT", "PlotUnavailable", "require", "write_plot"]

FORMATS = ("svg", "png")
INSTALL_HINT = "pip install 'xml-pipeline[plot]'"
_LATENCY_BINS = 60
# Throughput is counted in about this many intervals of the run; fewer when the run
# is short: messages end in waves (a full pump answers C conversations about every
# C / rate seconds), so an interval shorter than a few waves shows the waves.
_TIME_BINS = 60
_MIN_BIN_S = 0.05
_MIN_PER_BIN = 20
_WIDE_SPREAD = 20.0  # max/min latency above which the latency axis is logarithmic


class PlotUnavailable(Exception):
    """matplotlib cannot be imported (the ``plot`` extra is not installed)."""


def require() -> None:
    """Import matplotlib now (before a run, not after it).

    Raises:
        PlotUnavailable: it is not installed; the message says how to install it.
    """
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(f"--plot needs matplotlib: {INSTALL_HINT}") from exc


def write_plot(
    path: Path,
    report: dict[str, Any],
    latencies_s: Sequence[float],
    completed_s: Sequence[float],
) -> None:
    """Draw the run of ``report`` (bench's JSON report) to ``path`` (.svg or .png).

    Args:
        path: where to write; its suffix chooses the format.
        report: the figures of the run, as ``bench --json`` writes them.
        latencies_s: the latency of each answered message.
        completed_s: when each message ended (answered or not), in seconds from the
            start of the run.

    Raises:
        PlotUnavailable: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    require()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 7.5), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: PNG is drawn by Agg whatever the rc backend
    opts = report["options"]
    title = (
        f"bench {report['organism']}: {report['messages']:,} messages, "
        f"{report['msgs_per_s']:,.0f} msg/s, {report['hops_per_s']:,.0f} hops/s "
        f"({report['loop']}, concurrency {opts['concurrency']})"
    )
    fig.suptitle(title, fontsize="medium")
    top, bottom = fig.subplots(2, 1)
    _latency(top, [s * 1e3 for s in latencies_s], report["latency_ms"])
    _throughput(bottom, completed_s, report["elapsed_s"], report["msgs_per_s"])
    fmt = path.suffix.lower().lstrip(".")
    # No date in an SVG: two plots of the same run are the same file.
    metadata: dict[str, Any] = {"Title": title}
    if fmt == "svg":
        metadata["Date"] = None
    fig.savefig(path, format=fmt, metadata=metadata)


def _latency(ax: Any, latencies_ms: list[float], percentiles: dict[str, float | None]) -> None:
    ax.set_title("Latency distribution")
    ax.set_xlabel("latency (ms), from sending a message to its first reply")
    ax.set_ylabel("messages")
    if not latencies_ms:
        ax.text(0.5, 0.5, "no message was answered", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
        return
    low, high = min(latencies_ms), max(latencies_ms)
    edges: int | list[float] = _LATENCY_BINS
    if low > 0 and high / low > _WIDE_SPREAD:
        # Queueing makes latencies span decades: equal bins on a log axis show the
        # body and the tail alike.
        step = math.log(high / low) / _LATENCY_BINS
        edges = [low * math.exp(step * i) for i in range(_LATENCY_BINS + 1)]
        edges[-1] = high
        ax.set_xscale("log")
    ax.hist(latencies_ms, bins=edges, color="tab:blue", alpha=0.8)
    styles = {"p50": ("tab:green", "-"), "p90": ("tab:orange", "--"), "p99": ("tab:red", ":")}
    for name, (color, style) in styles.items():
        value = percentiles.get(name)
        if value is not None:
            ax.axvline(value, color=color, linestyle=style, label=f"{name} {value:.3f} ms")
    ax.legend(loc="upper right")


def _throughput(ax: Any, completed_s: Sequence[float], elapsed_s: float, mean: float) -> None:
    ax.set_title("Throughput over time")
    ax.set_xlabel("time since the start of the run (s)")
    ax.set_ylabel("messages/s (answered or not)")
    if not completed_s or elapsed_s <= 0:
        ax.text(0.5, 0.5, "no message ended", ha="center", va="center", transform=ax.transAxes)
        return
    bins = max(1, min(_TIME_BINS, int(elapsed_s / _MIN_BIN_S), len(completed_s) // _MIN_PER_BIN))
    width = elapsed_s / bins
    counts = [0] * bins
    for t in completed_s:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    edges = [width * i for i in range(bins + 1)]
    ax.stairs([c / width for c in counts], edges, fill=True, color="tab:blue", alpha=0.6,
              label=f"per {_duration(width)}")  # fmt: skip
    ax.axhline(mean, color="black", linestyle="--", label=f"mean {mean:,.0f} msg/s")
    ax.set_xlim(0, elapsed_s)
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
