"""Overall switch progress and ETA from phases and engine signals: pure, the clock is passed in."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dashboard.engines import signals as sig

LOAD_PHASES = ("starting", "loading_weights", "initializing", "warming_up")
PHASES = ("unloading", *LOAD_PHASES)

# Share of a cold load spent in each phase when a model has no history yet (vLLM on GPU boxes).
FALLBACK_SHARES = {"starting": 0.10, "loading_weights": 0.60, "initializing": 0.15, "warming_up": 0.15}
DEFAULT_THROUGHPUT_GBPS = 2.0  # used only until a first load has been measured
FALLBACK_UNLOAD_S = 2.0
HISTORY_WINDOW = 5
PACE_BOUNDS = (0.5, 2.0)

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


def expected_durations(
    history: Mapping[str, Sequence[float]],
    size_gb: float,
    throughput_gbps: float | None,
) -> dict[str, float]:
    """Expected seconds per load phase: this model's recent median, else size / throughput."""
    cold_total = size_gb / (throughput_gbps or DEFAULT_THROUGHPUT_GBPS) / FALLBACK_SHARES["loading_weights"]
    expected = {}
    for phase in LOAD_PHASES:
        past = list(history.get(phase, ()))[-HISTORY_WINDOW:]
        expected[phase] = statistics.median(past) if past else cold_total * FALLBACK_SHARES[phase]
    return {phase: max(seconds, 0.05) for phase, seconds in expected.items()}


def expected_stop(history: Mapping[str, Sequence[float]]) -> float:
    """Expected seconds to stop a model: its recent median stop time, else a small default."""
    past = list(history.get("stopping", ()))[-HISTORY_WINDOW:]
    return statistics.median(past) if past else FALLBACK_UNLOAD_S


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
    """Folds phases and signals into a percentage that never goes backwards, and an ETA."""

    def __init__(self, expected: Mapping[str, float], now: float,
                 milestones: Mapping[str, tuple[float, float]] | None = None) -> None:
        self.expected = dict(expected)
        # Per log milestone, from this model's past loads: (seconds after the start, seconds before ready).
        self.learned = dict(milestones or {})
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
                # This start's pace against the usual one (bounded: one odd start must not swing it far).
                pace = min(max((now - self.load_started) / into, PACE_BOUNDS[0]), PACE_BOUNDS[1]) if into > 1 else 1.0
                self.anchor = (now, left * pace)
            return
        phase = phase_of(signal)
        if phase is not None:
            self.enter(phase, now)
        match signal:
            case sig.CheckpointSize(bytes_total=total):
                self.bytes_total = total
            case sig.ShardProgress(done=done, total=total) if total > 0 and self.phase == "loading_weights":
                self.fraction = min(done / total, 1.0)
                self.shards = (done, total)

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

    def snapshot(self, now: float) -> ProgressSnapshot:
        if self.finished:
            return ProgressSnapshot("ready", 100, 0.0, PHASE_TEXT["ready"], self.bytes_total, self.bytes_total)
        index = self.order.index(self.phase)
        expected_here = self.expected[self.phase]
        elapsed_here = now - self.phase_started
        if self.fraction is not None:
            fraction = self.fraction
            # Trust the measured rate as much as the share of the phase it was measured over: early
            # shards are too few (and include the phase's set-up) to extrapolate from alone.
            by_rate = elapsed_here * (1 - fraction) / fraction if fraction > 0 else expected_here
            remaining_here = fraction * by_rate + (1 - fraction) * expected_here * (1 - fraction)
        else:
            fraction = min(elapsed_here / expected_here, 0.95)
            remaining_here = max(expected_here - elapsed_here, 0.05 * expected_here)
        after = sum(self.expected[p] for p in self.order[index + 1:])
        done = sum(self.expected[p] for p in self.order[:index]) + expected_here * fraction
        total = sum(self.expected.values())
        eta, share_done = remaining_here + after, done / total
        if self.anchor is not None:
            # A milestone this model always prints a known time before ready beats the phase model.
            at, left = self.anchor
            eta = max(left - (now - at), 0.0)
            elapsed = now - self.started
            share_done = elapsed / (elapsed + eta) if elapsed + eta > 0 else 1.0
        self._percent = max(self._percent, min(99, int(100 * share_done)))
        slow = elapsed_here > 2 * expected_here + 5 or (now - self.started) > 1.5 * total + 5
        bytes_loaded = None
        if self.bytes_total is not None:
            weights_done = (1.0 if index > self.order.index("loading_weights")
                            else (self.fraction or 0.0) if self.phase == "loading_weights" else 0.0)
            bytes_loaded = int(self.bytes_total * weights_done)
        return ProgressSnapshot(
            phase=self.phase,
            percent=self._percent,
            eta_s=round(eta, 1),
            message=PHASE_TEXT[self.phase]
            + (f" (shard {self.shards[0]}/{self.shards[1]})" if self.shards and self.phase == "loading_weights" else "")
            + (" (this may take a while)" if slow else ""),
            bytes_loaded=bytes_loaded,
            bytes_total=self.bytes_total,
            slow=slow,
        )
