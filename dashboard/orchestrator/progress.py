"""Overall switch progress and ETA from phases and engine signals: pure, the clock is passed in.

Before a load, each phase is expected to take what it took in this model's last loads. A model that has
never loaded here is estimated from what every load on this box taught (``BoxProfile``): the disk's read
rate for its checkpoint, and the engine's fixed start costs (process start, KV cache, graph capture, server
up) for its engine kind and GPU count. During a load the estimate follows what it sees: the read rate
observed over the shards so far for the bytes left, how the phases so far compared with what was expected
(a slow start makes the rest slower too), and log lines this model printed before at a known distance to
ready. The bar is the share of the time so far in the time so far plus the ETA, never going backwards.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dashboard.engines import signals as sig

LOAD_PHASES = ("starting", "loading_weights", "initializing", "warming_up")
PHASES = ("unloading", *LOAD_PHASES)
FIXED_PHASES = ("starting", "initializing", "warming_up")  # what an engine costs whatever the model's size

# A fresh box's first guess, replaced by what its first load measures. vLLM on a GPU box: imports and
# config, then KV cache profiling and graph capture; weights at an NVMe's rate. The sim runs at the demo's
# scale (seconds).
PRIOR_FIXED_S = {"vllm": {"starting": 15.0, "initializing": 8.0, "warming_up": 8.0},
                 "sim": {"starting": 1.0, "initializing": 1.0, "warming_up": 1.0}}
PRIOR_READ_BPS = {"vllm": 2e9, "sim": 10e9}
MIN_RATE_BYTES = 256e6  # a smaller checkpoint loads in its set-up time: it says nothing about the disk
BOX_WINDOW = 20  # recent loads per engine kind and GPU count that the box's figures come from
FALLBACK_UNLOAD_S = 2.0
HISTORY_WINDOW = 5
PACE_BOUNDS = (0.67, 1.5)  # this load's finished fixed phases against the expected ones
MILESTONE_PACE_BOUNDS = (0.5, 2.0)  # one odd start must not swing a milestone's anchor far
OVERRUN_SHARE = 0.2  # a phase past its expected end is given this share of its time so far again
SLOW_ETA_S = 60.0  # more than this left: "this may take a while"
SLOW_READ = 0.5  # reading at under half the usual rate: "this may take a while"
SLOW_READ_MIN_S = 2.0  # a read expected to take less is mostly set-up: its rate says nothing
GB = 1e9

PHASE_TEXT = {
    "checking_memory": "Checking GPU memory",
    "unloading": "Unloading models",
    "starting": "Starting engine",
    "loading_weights": "Loading weights",
    "initializing": "Initializing GPU (KV cache)",
    "warming_up": "Warming up",
    "ready": "Ready",
}


def phase_of(signal: sig.EngineSignal) -> str | None:
    """The load phase an engine signal proves we have reached."""
    match signal:
        case sig.LoadStarted() | sig.CheckpointSize() | sig.ShardProgress():
            return "loading_weights"
        case sig.WeightsLoaded() | sig.ModelMemory() | sig.KVCache():
            return "initializing"
        case sig.GraphCapture() | sig.EngineInitialized() | sig.ServerUp():
            return "warming_up"
    return None


# What the box has learned ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSample:
    """One successful load on this box: its engine, its GPU count, seconds per phase, checkpoint bytes."""

    kind: str
    gpus: int
    phases: Mapping[str, float]
    bytes_total: int | None = None


@dataclass(frozen=True)
class BoxProfile:
    """The disk's read rate (bytes/s) and the fixed start costs (seconds per phase), per (engine kind, GPUs)."""

    read_bps: Mapping[tuple[str, int], float] = field(default_factory=dict)
    fixed_s: Mapping[tuple[str, int], Mapping[str, float]] = field(default_factory=dict)

    def rate(self, kind: str, gpus: int) -> float | None:
        """This kind on this many GPUs; else the same kind on the nearest count; else any engine (one disk)."""
        found = _nearest(self.read_bps, kind, gpus)
        if found is None and self.read_bps:
            found = statistics.median(self.read_bps.values())
        return found

    def fixed(self, kind: str, gpus: int) -> Mapping[str, float] | None:
        """Fixed costs are the engine's own: another kind's say nothing."""
        return _nearest(self.fixed_s, kind, gpus)


def _nearest(table: Mapping[tuple[str, int], Any], kind: str, gpus: int) -> Any:
    counts = sorted((abs(g - gpus), g) for k, g in table if k == kind)
    return table[(kind, counts[0][1])] if counts else None


def learn_box(samples: Sequence[LoadSample], window: int = BOX_WINDOW) -> BoxProfile:
    """The box's figures from its recent successful loads (oldest first), each engine kind and GPU count apart.

    Read rate: bytes over seconds of the weights phase summed over the loads big enough to measure a disk.
    Fixed costs: each phase's median.
    """
    groups: dict[tuple[str, int], list[LoadSample]] = {}
    for sample in samples:
        groups.setdefault((sample.kind, sample.gpus), []).append(sample)
    rates: dict[tuple[str, int], float] = {}
    fixed: dict[tuple[str, int], dict[str, float]] = {}
    for key, group in groups.items():
        recent = group[-window:]
        read = [(s.bytes_total, s.phases["loading_weights"]) for s in recent
                if s.bytes_total and s.bytes_total >= MIN_RATE_BYTES and s.phases.get("loading_weights", 0) > 0]
        if read:
            rates[key] = sum(b for b, _ in read) / sum(t for _, t in read)
        costs = {phase: statistics.median(values) for phase in FIXED_PHASES
                 if (values := [s.phases[phase] for s in recent if phase in s.phases])}
        if costs:
            fixed[key] = costs
    return BoxProfile(rates, fixed)


def expected_durations(
    history: Mapping[str, Sequence[float]],
    size_gb: float,
    box: BoxProfile | None = None,
    kind: str = "vllm",
    gpus: int = 1,
) -> dict[str, float]:
    """Expected seconds per load phase: this model's recent medians; for a phase it has no history of, the
    box's: its checkpoint at the box's read rate, the engine's fixed costs learned on this box (a fresh
    box's prior until its first load)."""
    box = box or BoxProfile()
    rate = box.rate(kind, gpus) or PRIOR_READ_BPS.get(kind, PRIOR_READ_BPS["vllm"])
    fixed = {**PRIOR_FIXED_S.get(kind, PRIOR_FIXED_S["vllm"]), **(box.fixed(kind, gpus) or {})}
    expected = {}
    for phase in LOAD_PHASES:
        past = list(history.get(phase, ()))[-HISTORY_WINDOW:]
        if past:
            expected[phase] = statistics.median(past)
        elif phase == "loading_weights":
            expected[phase] = size_gb * GB / rate
        else:
            expected[phase] = fixed[phase]
    return {phase: max(seconds, 0.05) for phase, seconds in expected.items()}


def expected_stop(history: Mapping[str, Sequence[float]]) -> float:
    """Expected seconds to stop a model: its recent median stop time, else a small default."""
    past = list(history.get("stopping", ()))[-HISTORY_WINDOW:]
    return statistics.median(past) if past else FALLBACK_UNLOAD_S


# One load ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProgressSnapshot:
    phase: str
    percent: int
    eta_s: float | None
    message: str
    bytes_loaded: int | None = None
    bytes_total: int | None = None
    slow: bool = False


class Progress:
    """Folds phases and signals into a percentage that never goes backwards, and an ETA.

    ``own_history``: the expectations come from this model's own past loads (then one slow first shard
    barely moves them); else from the box, and the read rate seen in this load takes over quickly. When
    not given, a model with learned milestones is taken to have a history.
    """

    def __init__(self, expected: Mapping[str, float], now: float,
                 milestones: Mapping[str, tuple[float, float]] | None = None, *,
                 own_history: bool | None = None) -> None:
        self.expected = dict(expected)
        # Per log milestone, from this model's past loads: (seconds after the start, seconds before ready).
        self.learned = dict(milestones or {})
        self.own_history = bool(self.learned) if own_history is None else own_history
        self.seen: dict[str, float] = {}
        self.anchor: tuple[float, float] | None = None  # (when, seconds left then) of the last known milestone
        self.order = [p for p in PHASES if p in self.expected]
        self.load_started: float | None = now if self.order[0] in LOAD_PHASES else None
        self.phase = self.order[0]
        self.phase_started = now
        self.started = now
        self.fraction: float | None = None
        self.bytes_total: int | None = None
        self.shards: tuple[int, int] | None = None
        self.first_shard: tuple[float, float] | None = None  # (when, fraction) of the first shard read
        self.last_shard: tuple[float, float] | None = None
        self.durations: dict[str, float] = {}
        self._percent = 0
        self.finished = False
        self.finished_at = now

    def enter(self, phase: str, now: float) -> None:
        """Move forward to ``phase``; phases already passed are ignored."""
        if phase not in self.order or self.order.index(phase) <= self.order.index(self.phase):
            return
        self.durations[self.phase] = now - self.phase_started
        if self.load_started is None and phase in LOAD_PHASES:
            self.load_started = now
        for skipped in self.order[self.order.index(self.phase) + 1:self.order.index(phase)]:
            self.durations[skipped] = 0.0
        self.phase, self.phase_started, self.fraction = phase, now, None

    def on_signal(self, signal: sig.EngineSignal, now: float) -> None:
        if isinstance(signal, sig.Milestone):
            self.seen.setdefault(signal.key, now)
            if signal.key in self.learned and self.load_started is not None:
                into, left = self.learned[signal.key]
                # This start's pace against the usual one.
                low, high = MILESTONE_PACE_BOUNDS
                pace = min(max((now - self.load_started) / into, low), high) if into > 1 else 1.0
                self.anchor = (now, left * pace)
            return
        phase = phase_of(signal)
        if phase is not None:
            self.enter(phase, now)
        match signal:
            case sig.CheckpointSize(bytes_total=total):
                self.bytes_total = total
            case sig.ShardProgress(done=done, total=total) if total > 0 and self.phase == "loading_weights":
                # The read rate seen now beats an anchor from a line printed before the read began.
                self.anchor = None
                self.fraction = min(done / total, 1.0)
                self.shards = (done, total)
                if done > 0 and (self.last_shard is None or self.fraction > self.last_shard[1]):
                    self.first_shard = self.first_shard or (now, self.fraction)
                    self.last_shard = (now, self.fraction)

    def finish(self, now: float) -> dict[str, float]:
        """Close the current phase; returns measured seconds per phase (for history)."""
        self.durations[self.phase] = now - self.phase_started
        self._percent, self.finished = 100, True
        self.finished_at = now
        return dict(self.durations)

    def milestone_timings(self) -> dict[str, tuple[float, float]]:
        """Each milestone's (seconds after the start, seconds before ready) in this finished load, for history."""
        start = self.load_started if self.load_started is not None else self.started
        return {key: (at - start, self.finished_at - at) for key, at in self.seen.items()}

    # The estimate -------------------------------------------------------------------------------
    def pace(self) -> float:
        """How much slower (> 1) or faster than expected the rest of this load's fixed costs will run, from
        the fixed phases finished so far (a phase skipped in no time proves nothing).

        Half-trusted and bounded: a slow process start means a busy box, which slows the rest less than
        in proportion, and an expectation's split between phases may be off (a fresh box's prior).
        """
        spent = expected = 0.0
        for phase, seconds in self.durations.items():
            if phase in FIXED_PHASES and seconds > 1e-3:
                spent, expected = spent + seconds, expected + self.expected[phase]
        if expected <= 0:
            return 1.0
        return min(max((spent / expected) ** 0.5, PACE_BOUNDS[0]), PACE_BOUNDS[1])

    def weights_left(self, now: float) -> float:
        """Seconds of weights still to read: the observed rate for the fraction left, blended with the
        expectation by how much the observed rate can be trusted."""
        expected = self.expected["loading_weights"]
        here = now - self.phase_started
        if self.last_shard is None:
            return max(expected - here, OVERRUN_SHARE * here)
        last_at, done = self.last_shard
        first_at, first = self.first_shard or self.last_shard
        if last_at > first_at:  # between shards: the phase's own set-up is not in it
            rate, signals = (done - first) / (last_at - first_at), 2
        else:
            rate, signals = done / max(last_at - self.phase_started, 1e-3), 1
        left = 1.0 - done
        by_rate = max(left / rate - (now - last_at), OVERRUN_SHARE * left / rate) if rate > 0 else expected * left
        prior = expected * left
        # History is good: the rate must be measured over a real share of the phase before it counts. A box
        # estimate may be far off for this model: the rate seen here soon counts most.
        trust = done if self.own_history else 0.5 if signals == 1 else min(1.0, 0.8 + done)
        return trust * by_rate + (1 - trust) * prior

    def read_slow(self, now: float) -> bool:
        """Reading well under the usual rate (measured over at least two shards or a fifth of the weights;
        never for a read too short or small to measure a disk by)."""
        if self.phase != "loading_weights" or self.last_shard is None:
            return False
        expected = self.expected["loading_weights"]
        if expected < SLOW_READ_MIN_S or (self.bytes_total is not None and self.bytes_total < MIN_RATE_BYTES):
            return False
        done = self.last_shard[1]
        if done < 0.2 and self.first_shard == self.last_shard:
            return False
        seen = done / max(now - self.phase_started, 1e-3)  # fraction per second
        return seen < SLOW_READ / expected

    def remaining(self, now: float) -> float:
        """Seconds to ready as the phases see it (before any milestone anchor)."""
        pace = self.pace()
        index = self.order.index(self.phase)
        here = now - self.phase_started
        if self.phase == "loading_weights":
            left_here = self.weights_left(now)
        else:
            scaled = self.expected[self.phase] * (pace if self.phase in FIXED_PHASES else 1.0)
            left_here = max(scaled - here, OVERRUN_SHARE * here)
        after = sum(self.expected[p] * (pace if p in FIXED_PHASES else 1.0) for p in self.order[index + 1:])
        return left_here + after

    def snapshot(self, now: float) -> ProgressSnapshot:
        if self.finished:
            return ProgressSnapshot("ready", 100, 0.0, PHASE_TEXT["ready"], self.bytes_total, self.bytes_total)
        eta = self.remaining(now)
        if self.anchor is not None:
            # A milestone this model always prints a known time before ready beats the phase model.
            at, left = self.anchor
            eta = max(left - (now - at), 0.0)
        elapsed = now - self.started
        share_done = elapsed / (elapsed + eta) if elapsed + eta > 0 else 0.0
        self._percent = max(self._percent, min(99, int(100 * share_done)))
        total = sum(self.expected.values())
        overrun = (now - self.phase_started > 2 * self.expected[self.phase] + 5) or elapsed > 1.5 * total + 5
        slow = eta > SLOW_ETA_S or self.read_slow(now) or overrun
        index = self.order.index(self.phase)
        bytes_loaded = None
        if self.bytes_total is not None:
            weights_done = (1.0 if index > self.order.index("loading_weights")
                            else (self.fraction or 0.0) if self.phase == "loading_weights" else 0.0)
            bytes_loaded = int(self.bytes_total * weights_done)
        message = PHASE_TEXT[self.phase]
        if self.shards and self.phase == "loading_weights":
            message += f" (shard {self.shards[0]}/{self.shards[1]})"
        if slow:
            size = (f": {bytes_loaded / GB:.1f} of {self.bytes_total / GB:.1f} GB read"
                    if self.bytes_total is not None and bytes_loaded is not None and self.phase == "loading_weights"
                    else "")
            message += f" (this may take a while{size})"
        return ProgressSnapshot(self.phase, self._percent, round(eta, 1), message, bytes_loaded, self.bytes_total,
                                slow)
