"""The benchmark's arithmetic: percentiles, ETA errors, where a switch's time went, and the report."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.harness import SwitchSample
from benchmarks.report import eta_errors, markdown_table, percentile
from benchmarks.run import CLIENT_COUNTS, render


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


def engine_results(failure: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One engine's figures as results.json holds them, with the failure samples only when given."""
    status = {str(c): {"p50": 0.001, "p99": 0.005, "rps": 1000.0, "requests": 5000} for c in CLIENT_COUNTS}
    out: dict[str, Any] = {
        "switches": [{"target": t, "wall": 3.2, "engine_start": 3.0, "readiness": 0.1, "overhead": 0.15,
                      "unload": 0.05, "progress": []} for t in ("alpha", "beta")],
        "eta_errors": [{"25": 0.01, "50": -0.02, "75": 0.03}],
        "rss_growth_per_switch": [0.01, 0.02],
        "rss_mb": {"first": 100.0, "last": 101.0},
        "status": status,
    }
    if failure is not None:
        out["failure"] = failure
    return out


def results(engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"engines": engines, "command": "python -m benchmarks.run", "date": "2026-01-01", "duration_s": 60.0,
            "machine": {"cpu": "cpu", "cores": "2", "memory": "8 GiB", "os": "Linux", "python": "3.11"}}


def table_row(text: str, starts: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {starts}")]
    assert len(rows) == 1, rows
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def kill(to_error: float | None, to_failed: float | None, group_gone: float | None) -> dict[str, Any]:
    return {"to_error": to_error, "to_failed": to_failed, "group_gone": group_gone, "error": "engine_failed",
            "killed_after": 1.0, "active_after": "alpha"}


def test_results_without_failure_samples_render_without_the_failure_rows() -> None:
    text = render(results({"sim": engine_results(), "vLLM CPU": engine_results()}))
    assert "Engine killed mid-load" not in text
    assert "An engine killed while it loads" not in text
    assert table_row(text, "1. Switch overhead")[-1] == "met"


def test_failure_rows_give_median_and_worst_and_judge_each_engine_on_its_own_target() -> None:
    sim = [kill(0.2, 0.1, 0.01), kill(0.4, 0.3, 0.02), kill(1.5, 0.2, 0.03)]
    vllm = [kill(4.0, 0.5, 0.8), kill(3.0, 0.6, 1.2)]  # 4 s: over sim's 2 s, within vLLM's 5 s
    text = render(results({"sim": engine_results(sim), "vLLM CPU": engine_results(vllm)}))
    assert table_row(text, "7. Engine killed mid-load") == [
        "7. Engine killed mid-load → `error` event on the switch stream (median / worst)",
        "< 2 s sim, < 5 s vLLM CPU", "0.400 s / 1.500 s", "3.500 s / 4.000 s", "met"]
    assert table_row(text, "→ `failed`")[1:] == ["< 1 s", "0.200 s / 0.300 s", "0.550 s / 0.600 s", "met"]
    assert table_row(text, "→ no process")[1:] == ["(reported)", "0.020 s / 0.030 s", "1.000 s / 1.200 s", ""]
    assert table_row(text, "vLLM CPU | 2 |") == ["vLLM CPU", "2", "3.000 s", "0.600 s", "1.200 s",
                                                  "`engine_failed`", "1.0 s"]


def test_a_failure_never_reported_or_over_target_is_missed() -> None:
    sim = [kill(0.3, 1.2, 0.01), kill(None, None, 0.01)]
    text = render(results({"sim": engine_results(sim), "vLLM CPU": engine_results()}))
    error_row = table_row(text, "7. Engine killed mid-load")
    assert error_row[2:] == ["0.300 s / not seen in 1 of 2", "n/a", "**missed**"]  # vLLM had no kills: n/a
    assert table_row(text, "→ `failed`")[-1] == "**missed**"  # 1.2 s is over 1 s


def test_a_merged_failure_run_is_named_under_the_original_run() -> None:
    r = results({"sim": engine_results([kill(0.2, 0.1, 0.01)])})
    r["failure_run"] = {"command": "python -m benchmarks.run --only-failures", "date": "2026-02-02",
                        "duration_s": 120.0}
    text = render(r)
    assert "Produced by `python -m benchmarks.run` on 2026-01-01" in text
    assert "from a later `python -m benchmarks.run --only-failures` on 2026-02-02 (2.0 minutes)" in text


def test_each_benchmark_rewrites_only_its_own_section_of_the_results(tmp_path) -> None:
    from benchmarks.report import write_section

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nthe main table\n")
    write_section(results, "<!-- a:begin -->\nfirst\n<!-- a:end -->\n", "<!-- a:begin -->", "<!-- a:end -->")
    write_section(results, "<!-- b:begin -->\nother\n<!-- b:end -->\n", "<!-- b:begin -->", "<!-- b:end -->")
    write_section(results, "<!-- a:begin -->\nsecond\n<!-- a:end -->\n", "<!-- a:begin -->", "<!-- a:end -->")
    text = results.read_text()
    assert "the main table" in text and "second" in text and "other" in text and "first" not in text
    assert text.index("second") < text.index("other")  # replaced in place, not appended again
