"""Small helpers for figures: percentiles of samples and plain-text tables.

Used by ``statistics()``, ``run --stats``, ``bench`` and the benchmark scripts, so that
a p99 means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["percentile", "table"]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of samples sorted in ascending order.

    The sample at rank ``int(q * (n - 1))``: no interpolation, so a p99 is a value
    that was really seen.

    Raises:
        ValueError: no samples, or ``q`` outside 0 to 1.
    """
    if not ordered:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile is between 0 and 1, not {q}")
    n = len(ordered)
    return ordered[min(n - 1, int(q * (n - 1)))]


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, min_width: int = 8) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned.

    Each column is as wide as its widest cell (the first at least ``min_width``).
    """
    body = [tuple(row) for row in rows]
    widths = [len(h) for h in header]
    widths[0] = max(widths[0], min_width)
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = " ".join(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"{first} {rest}".rstrip()

    return [line(header), *(line(row) for row in body)]
