"""What the history keeps for the ETA: loads and stop times."""

from __future__ import annotations

from pathlib import Path

from dashboard.orchestrator.history import History
from dashboard.orchestrator.progress import FALLBACK_UNLOAD_S, expected_stop


def test_a_measured_stop_time_feeds_the_next_unload_estimate(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    assert expected_stop(history.phase_history("big")) == FALLBACK_UNLOAD_S
    history.record_load("big", {"stopping": 0.3}, 0, "unloaded")
    history.record_load("big", {"stopping": 0.5}, 0, "unloaded")
    assert expected_stop(history.phase_history("big")) == 0.4


def test_a_failed_load_teaches_the_eta_nothing(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    history.record_load("big", {"loading_weights": 99.0}, 99.0, "failed")
    assert history.phase_history("big") == {}


def test_milestones_are_learned_as_the_median_of_recent_loads(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    for into, left in ((10.0, 3.0), (12.0, 4.0), (20.0, 8.0)):
        history.record_milestones("tiny", {"Worker default_loader.py:501": (into, left)})
    assert history.learned_milestones("tiny") == {"Worker default_loader.py:501": (12.0, 4.0)}
    assert history.learned_milestones("other") == {}
