"""The shared figures helpers: one percentile rule, one table layout."""

from __future__ import annotations

import pytest

from xml_pipeline._stats import percentile, table


def test_percentile_is_a_sample_at_the_rank() -> None:
    samples = [float(n) for n in range(1, 101)]  # 1..100
    assert percentile(samples, 0.0) == 1.0
    assert percentile(samples, 0.5) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile(samples, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_refuses_what_has_no_answer() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        percentile([1.0], 99)


def test_table_aligns_columns_to_their_widest_cell() -> None:
    lines = table(("name", "n"), [("a", "1"), ("long-listener-name", "12345")], min_width=4)
    assert lines == [
        "name                   n",
        "a                      1",
        "long-listener-name 12345",
    ]
