"""The benchmark's arithmetic: percentiles, ETA errors and where a switch's time went."""

from __future__ import annotations

import pytest

from benchmarks.harness import SwitchSample
from benchmarks.report import eta_errors, markdown_table, percentile


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_eta_error_is_taken_when_the_bar_first_reaches_each_mark() -> None:
    sample = SwitchSample("sim", "alpha", started=100.0, done=110.0)
    # At 25 % (t=102.5) the ETA said 9 s; 7.5 s were left: 20 % too long. At 50 % it was exact.
    sample.progress = [(101.0, 10, 12.0), (102.5, 25, 9.0), (103.0, 30, 8.0), (105.0, 50, 5.0),
                       (107.5, 80, 2.0)]
    errors = eta_errors(sample)
    assert errors[25] == pytest.approx(0.2)
    assert errors[50] == pytest.approx(0.0)
    assert errors[75] == pytest.approx((2.0 - 2.5) / 2.5)  # 80 % is the first event past 75 %


def test_a_switch_splits_into_engine_time_and_overhead() -> None:
    sample = SwitchSample("sim", "beta", started=10.0, done=16.2, spawned=11.1, healthy=16.0, victim_gone=11.0)
    assert sample.wall == pytest.approx(6.2)
    assert sample.engine_start == pytest.approx(4.9)
    assert sample.readiness == pytest.approx(0.2)
    assert sample.load_overhead == pytest.approx(0.1 + 0.2)  # exit to spawn, then /health to complete
    assert SwitchSample("sim", "beta", started=0.0).load_overhead is None  # the prober saw nothing


def test_markdown_table_has_a_header_rule() -> None:
    assert markdown_table(["a", "b"], [["1", "2"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
