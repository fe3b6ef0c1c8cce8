"""Overall progress never goes backwards and the ETA comes from measured history."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard.engines import signals as sig
from dashboard.orchestrator.progress import LOAD_PHASES, Progress, expected_durations

EXPECTED = {"starting": 1.0, "loading_weights": 6.0, "initializing": 1.5, "warming_up": 1.5}


def test_eta_uses_this_models_own_history() -> None:
    history = {"starting": [1.0, 1.2, 1.1], "loading_weights": [8.0, 9.0, 10.0],
               "initializing": [2.0], "warming_up": [1.0]}
    expected = expected_durations(history, size_gb=183, throughput_gbps=None)
    assert expected["loading_weights"] == 9.0
    assert round(sum(expected.values()), 1) == 13.1


def test_eta_without_history_comes_from_size_and_measured_throughput() -> None:
    fast = expected_durations({}, size_gb=100, throughput_gbps=10.0)
    slow = expected_durations({}, size_gb=100, throughput_gbps=1.0)
    assert round(fast["loading_weights"], 6) == 10.0
    assert round(slow["loading_weights"], 6) == 100.0
    assert set(fast) == set(LOAD_PHASES)


def test_shard_progress_drives_percent_and_bytes() -> None:
    p = Progress(EXPECTED, now=0.0)
    p.enter("starting", 0.0)
    p.on_signal(sig.CheckpointSize(bytes_total=10_000), 1.0)
    p.on_signal(sig.ShardProgress(5, 10), 4.0)
    snap = p.snapshot(4.0)
    assert snap.phase == "loading_weights"
    assert snap.bytes_loaded == 5_000 and snap.bytes_total == 10_000
    assert 30 <= snap.percent <= 45
    # Half the shards took 3 s: about 3 s more for weights, then the later phases.
    assert snap.eta_s == 6.0


def test_one_slow_first_shard_barely_moves_an_eta_that_history_backs() -> None:
    p = Progress(EXPECTED, now=0.0)
    p.enter("loading_weights", 0.0)
    p.on_signal(sig.ShardProgress(1, 10), 1.0)  # 1 s for the first tenth: set-up, not the real rate
    weights_left = p.snapshot(1.0).eta_s - EXPECTED["initializing"] - EXPECTED["warming_up"]
    # By rate alone 9 s would be left; history says 5.4 s. The blend stays near history.
    assert 5.4 < weights_left < 6.0
    p.on_signal(sig.ShardProgress(9, 10), 5.0)  # now the rate is measured over most of the phase
    weights_left = p.snapshot(5.0).eta_s - EXPECTED["initializing"] - EXPECTED["warming_up"]
    assert 0.5 <= round(weights_left, 1) <= 0.6


def test_slow_load_says_it_may_take_a_while() -> None:
    p = Progress(EXPECTED, now=0.0)
    snap = p.snapshot(60.0)
    assert snap.slow and "this may take a while" in snap.message
    assert snap.percent < 100


def test_finish_reports_measured_durations() -> None:
    p = Progress(EXPECTED, now=0.0)
    p.enter("loading_weights", 1.0)
    p.enter("warming_up", 5.0)
    durations = p.finish(7.0)
    assert durations == {"starting": 1.0, "loading_weights": 4.0, "initializing": 0.0, "warming_up": 2.0}


signals = st.lists(st.one_of(
    st.builds(sig.ShardProgress, st.integers(0, 10), st.just(10)),
    st.just(sig.LoadStarted()), st.just(sig.WeightsLoaded(1.0)), st.just(sig.KVCache(tokens=5)),
    st.just(sig.GraphCapture(False)), st.just(sig.ServerUp()),
    st.builds(sig.CheckpointSize, st.integers(1, 10**12)),
), max_size=30)


@given(signals, st.lists(st.floats(0, 5), min_size=30, max_size=30))
def test_percent_never_goes_backwards(events, gaps) -> None:
    p = Progress({"unloading": 2.0, **EXPECTED}, now=0.0)
    now, last = 0.0, 0
    for i, event in enumerate(events):
        now += gaps[i]
        p.on_signal(event, now)
        snap = p.snapshot(now)
        assert last <= snap.percent <= 99
        assert snap.eta_s is not None and snap.eta_s >= 0
        last = snap.percent


def test_a_known_log_milestone_anchors_the_eta_to_this_models_past_loads() -> None:
    # In past loads, "Worker default_loader.py:501" came 3 s after the start and 2 s before ready;
    # the phases alone say about 9 s.
    learned = {"Worker default_loader.py:501": (3.0, 2.0)}
    p = Progress(EXPECTED, now=0.0, milestones=learned)
    p.on_signal(sig.Milestone("APIServer utils.py:12"), 0.5)  # never seen before: no anchor
    assert p.snapshot(0.5).eta_s == 9.5
    p.on_signal(sig.Milestone("Worker default_loader.py:501"), 3.0)
    snap = p.snapshot(3.5)
    assert snap.eta_s == 1.5
    assert snap.percent == 70  # 3.5 s of 5 s
    p.finish(5.2)
    timings = p.milestone_timings()
    assert timings["APIServer utils.py:12"] == pytest.approx((0.5, 4.7))
    assert timings["Worker default_loader.py:501"] == pytest.approx((3.0, 2.2))


def test_a_slower_start_than_usual_stretches_the_rest_of_the_eta_alike() -> None:
    p = Progress(EXPECTED, now=0.0, milestones={"Worker default_loader.py:501": (3.0, 2.0)})
    p.on_signal(sig.Milestone("Worker default_loader.py:501"), 4.5)  # 1.5 times slower so far
    assert p.snapshot(4.5).eta_s == 3.0
