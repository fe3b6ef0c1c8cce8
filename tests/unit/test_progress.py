"""Overall progress never goes backwards; the ETA comes from this model's history, else from this box's."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard.engines import signals as sig
from dashboard.orchestrator.history import History
from dashboard.orchestrator.progress import (
    LOAD_PHASES,
    PRIOR_READ_BPS,
    BoxProfile,
    LoadSample,
    Progress,
    expected_durations,
    learn_box,
)

EXPECTED = {"starting": 1.0, "loading_weights": 6.0, "initializing": 1.5, "warming_up": 1.5}


def test_eta_uses_this_models_own_history() -> None:
    history = {"starting": [1.0, 1.2, 1.1], "loading_weights": [8.0, 9.0, 10.0],
               "initializing": [2.0], "warming_up": [1.0]}
    expected = expected_durations(history, size_gb=183)
    assert expected["loading_weights"] == 9.0
    assert round(sum(expected.values()), 1) == 13.1


def test_eta_without_history_comes_from_size_and_the_boxs_measured_read_rate() -> None:
    fast = expected_durations({}, size_gb=100, box=BoxProfile(read_bps={("vllm", 1): 10e9}))
    slow = expected_durations({}, size_gb=100, box=BoxProfile(read_bps={("vllm", 1): 1e9}))
    assert round(fast["loading_weights"], 6) == 10.0
    assert round(slow["loading_weights"], 6) == 100.0
    assert set(fast) == set(LOAD_PHASES)
    # A fresh box has only its prior, never the size of a different model's load.
    assert expected_durations({}, size_gb=100)["loading_weights"] == 100e9 / PRIOR_READ_BPS["vllm"]


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
    p = Progress(EXPECTED, now=0.0, own_history=True)
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


# A first ETA from this box -----------------------------------------------------------------------------
def test_a_box_that_loaded_one_model_estimates_a_never_loaded_one_from_its_rate_and_start_costs(
        tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    # The box loaded a 60 GB model once: 30 s reading (2 GB/s), 12 s process start, 6 s KV cache, 4 s graphs.
    history.record_load("qwen-32b", {"starting": 12.0, "loading_weights": 30.0, "initializing": 6.0,
                                     "warming_up": 4.0}, 52.0, "success", bytes_total=60 * 10**9)
    kinds = {"qwen-32b": ("vllm", 1), "llama-8b": ("vllm", 1)}
    box = learn_box([LoadSample(*kinds[m], phases, size) for m, size, phases in history.load_samples()])
    assert box.rate("vllm", 1) == pytest.approx(2e9)
    # Llama has never loaded here: its 16 GB at the box's rate, plus the engine's own start costs.
    llama = expected_durations(history.phase_history("llama-8b"), size_gb=16, box=box, kind="vllm", gpus=1)
    assert llama == pytest.approx({"starting": 12.0, "loading_weights": 8.0, "initializing": 6.0,
                                   "warming_up": 4.0})
    assert sum(llama.values()) == pytest.approx(30.0)
    history.close()


def test_the_box_learns_per_engine_kind_and_gpu_count() -> None:
    samples = [LoadSample("vllm", 1, {"starting": 10.0, "loading_weights": 10.0, "initializing": 5.0,
                                      "warming_up": 5.0}, 20 * 10**9),
               LoadSample("vllm", 4, {"starting": 20.0, "loading_weights": 5.0, "initializing": 15.0,
                                      "warming_up": 25.0}, 40 * 10**9),
               LoadSample("sim", 1, {"starting": 0.5, "loading_weights": 1.0, "initializing": 0.5,
                                     "warming_up": 0.5}, 10**6)]  # too small to say anything about the disk
    box = learn_box(samples)
    assert box.fixed("vllm", 4) == {"starting": 20.0, "initializing": 15.0, "warming_up": 25.0}
    assert box.fixed("vllm", 2) == box.fixed("vllm", 1)  # the nearest count (ties go to the smaller)
    assert box.rate("vllm", 4) == pytest.approx(8e9) and box.rate("vllm", 1) == pytest.approx(2e9)
    assert box.rate("sim", 1) == pytest.approx(5e9)  # no sim rate: the disk is the box's (median of the others)
    assert box.fixed("docker-only-engine", 1) is None


def test_a_never_loaded_model_follows_the_read_rate_it_shows() -> None:
    # The box says 30 s of weights; this disk (or cache) reads three times faster for this model.
    expected = {"starting": 2.0, "loading_weights": 30.0, "initializing": 3.0, "warming_up": 3.0}
    p = Progress(expected, now=0.0)
    p.on_signal(sig.CheckpointSize(60 * 10**9), 2.0)
    p.on_signal(sig.ShardProgress(0, 10), 2.0)
    p.on_signal(sig.ShardProgress(1, 10), 3.0)
    p.on_signal(sig.ShardProgress(2, 10), 4.0)
    snap = p.snapshot(4.0)
    # 8 shards left at one a second, then the fixed costs: the box's 30 s no longer counts.
    assert snap.eta_s == pytest.approx(8.0 + 6.0, abs=0.5)
    assert snap.bytes_loaded == 12 * 10**9
    # Between shards the ETA counts down instead of waiting for the next one.
    assert p.snapshot(4.5).eta_s < snap.eta_s
    # The bar is the share of the time so far: about 4 s of 18.
    assert 20 <= snap.percent <= 25


def test_a_slow_start_makes_the_rest_of_the_fixed_costs_slower_too_but_less_than_in_proportion() -> None:
    expected = {"starting": 10.0, "loading_weights": 1.0, "initializing": 5.0, "warming_up": 5.0}
    p = Progress(expected, now=0.0)
    assert p.snapshot(15.0).eta_s == pytest.approx(0.2 * 15 + 1 + 10)  # overrunning: only this phase grows
    p.on_signal(sig.LoadStarted(), 20.0)  # the process start took twice the usual: a busy box
    p.on_signal(sig.WeightsLoaded(1.0), 21.0)
    assert p.pace() == pytest.approx(2**0.5)
    assert p.snapshot(21.0).eta_s == pytest.approx(10 * 2**0.5, abs=0.1)
    # A phase that runs past its (scaled) end is given a share of its time so far again, never zero.
    assert p.snapshot(40.0).eta_s > 5.0
    very = Progress(expected, now=0.0)
    very.on_signal(sig.LoadStarted(), 60.0)  # six times the prior: the prior's split was off, not the box
    very.on_signal(sig.WeightsLoaded(1.0), 61.0)
    assert very.pace() == 1.5


def test_the_read_rate_seen_beats_a_milestone_printed_before_the_read_began() -> None:
    expected = {"starting": 2.0, "loading_weights": 60.0, "initializing": 1.0, "warming_up": 1.0}
    p = Progress(expected, now=0.0, milestones={"Worker weight_utils.py:1108": (2.0, 62.0)})
    p.on_signal(sig.Milestone("Worker weight_utils.py:1108"), 4.0)  # this start runs twice as slow so far
    assert p.snapshot(4.0).eta_s == pytest.approx(124.0)
    p.on_signal(sig.ShardProgress(1, 10), 10.0)
    p.on_signal(sig.ShardProgress(2, 10), 16.0)  # it reads at the usual rate all the same
    assert p.snapshot(16.0).eta_s == pytest.approx(48.0 + 2.0, abs=1.0)


def test_a_tiny_checkpoint_never_says_the_disk_is_slow() -> None:
    p = Progress({"starting": 20.0, "loading_weights": 0.05, "initializing": 3.0, "warming_up": 2.0}, now=0.0)
    p.on_signal(sig.CheckpointSize(2 * 10**6), 20.0)
    p.on_signal(sig.ShardProgress(10, 10), 21.0)  # a second for 2 MB: set-up, not the disk
    assert not p.snapshot(21.0).slow


def test_this_may_take_a_while_with_bytes_when_a_minute_is_left_or_the_disk_reads_slowly() -> None:
    quick = Progress({"starting": 2.0, "loading_weights": 10.0, "initializing": 2.0, "warming_up": 2.0}, now=0.0)
    assert not quick.snapshot(1.0).slow
    long = Progress({"starting": 10.0, "loading_weights": 80.0, "initializing": 10.0, "warming_up": 10.0}, now=0.0)
    assert long.snapshot(1.0).slow and "this may take a while" in long.snapshot(1.0).message
    # The usual rate reads the checkpoint in 10 s; this load has read a fifth of it in 6 s.
    slow_disk = Progress({"starting": 1.0, "loading_weights": 10.0, "initializing": 1.0, "warming_up": 1.0}, now=0.0)
    slow_disk.on_signal(sig.CheckpointSize(20 * 10**9), 1.0)
    slow_disk.on_signal(sig.ShardProgress(1, 10), 4.0)
    slow_disk.on_signal(sig.ShardProgress(2, 10), 7.0)
    snap = slow_disk.snapshot(7.0)
    assert snap.eta_s < 60 and snap.slow
    assert "this may take a while: 4.0 of 20.0 GB read" in snap.message
    assert (snap.bytes_loaded, snap.bytes_total) == (4 * 10**9, 20 * 10**9)


async def test_a_tqdm_bar_counts_when_it_is_drawn_not_when_the_next_one_ends_its_line() -> None:
    from collections.abc import AsyncIterator

    from dashboard.config import ModelSpec
    from tests.unit.fake_engine import FakeEngine, FakeFactory

    bar = "Loading safetensors checkpoint shards: {p:3d}% Completed | {n}/10 [00:0{n}<00:05, 1.00it/s]"
    chunks = [bar.format(p=0, n=0), "\r" + bar.format(p=10, n=1), "\r" + bar.format(p=20, n=2)[:30],
              bar.format(p=20, n=2)[30:], "\r" + bar.format(p=100, n=10) + "\n"]

    class Drawn(FakeEngine):
        async def _output(self, from_start: bool) -> AsyncIterator[str]:
            for chunk in chunks:
                yield chunk
                seen.append([s for s in drain(self) if isinstance(s, sig.ShardProgress)])

    def drain(engine: FakeEngine) -> list[sig.EngineSignal]:
        out = []
        while not engine.queue.empty():
            out.append(engine.queue.get_nowait())
        return out

    seen: list[list[sig.ShardProgress]] = []
    engine = Drawn(ModelSpec("m", "M", 1, 1), 1, FakeFactory())
    await engine._pump(True)
    # Each bar as soon as it is whole (a half-written one waits), each once.
    assert seen == [[sig.ShardProgress(0, 10)], [sig.ShardProgress(1, 10)], [], [sig.ShardProgress(2, 10)],
                    [sig.ShardProgress(10, 10)]]
