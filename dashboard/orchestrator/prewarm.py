"""Pre-warming: while nothing runs and GPU memory has room, load the model most likely to be asked next.

The likelihood is a small pure function of this lab's own history (``likelihoods``): what people asked
for lately, how often over the last days, and at this time of day on other days. A pre-warm never unloads
anything: it only uses room that nobody asked for. It runs as its own operation in the one slot (kind and
audit actor ``prewarm``) and gives way at once to anything a person asks: a switch, a load, any manager
action, or a chat request queued for another model. Its half-loaded engine is then killed; a wake under
way is let finish (seconds), since killing it would lose the sleeping model. A pre-warmed model shows
``"warm": true`` in the status (and so in the events) until a person uses it. Sleeping models count:
waking one is the cheapest pre-warm.

A guess is made only where it pays on average (``choose``): a cold load saves a whole load for the cost of
a stop when wrong, so modest odds do; a wake saves about what putting the model back to sleep costs, so only
a model more likely than not is woken. A model a person has just unloaded or put to sleep is left alone,
and so is one whose pre-warm failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dashboard.errors import SmartswitchError
from dashboard.events import Event, StatusEvent
from dashboard.orchestrator.operations import Operation, OpKind
from dashboard.orchestrator.progress import LOAD_PHASES, Progress, expected_stop
from dashboard.orchestrator.states import ModelStatus

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
S = ModelStatus
ACTOR = "prewarm"
DAY_S = 86_400.0

# The scoring: three views of the same history, each normalised to shares and then mixed.
WEIGHTS = {"recency": 0.4, "frequency": 0.35, "time_of_day": 0.25}
RECENT_HALF_ASKS = 3.0  # recency: an ask counts half as much three asks later
FREQUENCY_HALF_LIFE_S = 3 * DAY_S  # frequency: what the lab has used over the last days
TIME_OF_DAY_WIDTH_H = 1.5  # time of day: asks on other days within about this many hours of now
LOOKBACK_S = 14 * DAY_S
MIN_SHARE = 0.1  # a model less likely than this is not worth a load
# vLLM wakes a 30B model from level-1 sleep in 2.9 s; falling asleep again takes about as long.
WAKE_S = 3.0

# The scheduler.
IDLE_S = 3.0  # quiet time after the last operation: a person who just switched may act again
LOOK_S = 0.5
RELOOK_S = 60.0  # look again after this long even if nothing changed (hold-offs expire, the hour turns)
RESPECT_S = 600.0  # a model a person unloaded or put to sleep is not brought back for this long
HOLD_SUPERSEDED_S = 60.0
HOLD_FAILED_S = 3600.0


# Pure: who is likely next ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Ask:
    """A person asked for ``model`` at ``at`` (epoch seconds): a switch, a load or a wake."""

    model: str
    at: float


@dataclass(frozen=True)
class Candidate:
    """A model that could be pre-warmed now: asleep (woken) or stopped (loaded), and whether it fits.

    ``saved_s``: what a person asking for it would otherwise wait (its load, or its wake). ``undo_s``: what
    it costs when another model needs its room first (it is stopped or put to sleep again).
    """

    model: str
    asleep: bool
    fits: bool
    saved_s: float = 1.0
    undo_s: float = 0.0


def _hours_apart(a: float, b: float) -> float:
    """Hours between two clock times of day (epoch seconds in local time), around midnight too."""
    gap = abs(a % DAY_S - b % DAY_S) / 3600.0
    return min(gap, 24.0 - gap)


def likelihoods(asks: Sequence[Ask], now: float, *, utc_offset_s: float = 0.0) -> dict[str, float]:
    """The chance each model is the next one asked for, from past asks (oldest first); shares sum to 1.

    Recency: the last few asks, by their order (a model just asked for is often asked again). Frequency:
    every ask, fading over days. Time of day: asks on earlier days near this hour. A view with no data
    (time of day on the first day) leaves its weight to the others. No asks: no shares.
    """
    views: dict[str, dict[str, float]] = {name: {} for name in WEIGHTS}
    for rank, ask in enumerate(reversed(asks)):
        age = max(now - ask.at, 0.0)
        fading = 0.5 ** (age / FREQUENCY_HALF_LIFE_S)
        _add(views["recency"], ask.model, 0.5 ** (rank / RECENT_HALF_ASKS))
        _add(views["frequency"], ask.model, fading)
        if age > DAY_S / 2:  # today's asks are recency's; this view is about other days
            hours = _hours_apart(ask.at + utc_offset_s, now + utc_offset_s)
            _add(views["time_of_day"], ask.model, fading * math.exp(-((hours / TIME_OF_DAY_WIDTH_H) ** 2)))
    shares: dict[str, float] = {}
    weight_used = 0.0
    for name, view in views.items():
        total = sum(view.values())
        if total <= 0:
            continue
        weight_used += WEIGHTS[name]
        for model, value in view.items():
            _add(shares, model, WEIGHTS[name] * value / total)
    return {model: share / weight_used for model, share in shares.items()} if weight_used else {}


def _add(table: dict[str, float], key: str, value: float) -> None:
    table[key] = table.get(key, 0.0) + value


def gain(share: float, candidate: Candidate) -> float:
    """Seconds of waiting a pre-warm saves on average: its chance of being asked for next times the wait it
    saves, less the chance of another model coming first times the cost of making room again."""
    return share * candidate.saved_s - (1.0 - share) * candidate.undo_s


def choose(shares: Mapping[str, float], candidates: Iterable[Candidate], min_share: float = MIN_SHARE) -> str | None:
    """The candidate that fits with the best gain, if any gains (a sleeping one first on a tie: it costs
    seconds). A cold load saves a whole load for the cost of a stop: worth it at modest odds. A wake saves
    what a sleep costs back: only a model more likely than not is woken."""
    scored = [(gain(shares[c.model], c), c.asleep, c.model) for c in candidates
              if c.fits and shares.get(c.model, 0.0) >= min_share]
    worth = [entry for entry in scored if entry[0] > 0]
    return max(worth)[2] if worth else None


# The shell: a scheduler task on the orchestrator's loop ----------------------------------------------
class Prewarmer:
    """Looks for a pre-warm whenever the orchestrator has been quiet for ``IDLE_S``; runs at most one."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        self.enabled = orch.config.switching.prewarm
        self.warm: dict[str, float] = {}  # model -> its last_used when pre-warmed (a person's use changes it)
        self.held_off: dict[str, float] = {}  # model -> monotonic time until which it is left alone
        self.state = "waiting" if self.enabled else "off"  # "idle" only once it has looked and found nothing
        self.model: str | None = None
        self.reason = "not looked yet" if self.enabled else "prewarm = false in [switching]"
        self.quiet_since = time.monotonic()
        self.looked_at = 0.0
        self.dirty = True
        self.clock = time.time  # what "now" and the time of day are read from
        self.idle_s, self.respect_s = IDLE_S, RESPECT_S
        self._wakeup: asyncio.Event | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        self._wakeup = asyncio.Event()
        self.orch.subscribe(self._on_event)
        self.orch.spawn(self._loop(), "prewarm")

    # Read by the snapshot ---------------------------------------------------------------------
    def warm_models(self) -> set[str]:
        return {m for m, mark in self.warm.items() if self._still_warm(m, mark)}

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "state": self.state, "model": self.model, "reason": self.reason}

    def _still_warm(self, model_id: str, mark: float) -> bool:
        state = self.orch.models[model_id]
        return state.status is S.RUNNING and state.engine is not None and state.last_used == mark

    # Scheduling -------------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if not isinstance(event, StatusEvent):
            return
        self.dirty = True
        op = self.orch.op
        if op is not None and op.running:
            self.quiet_since = time.monotonic()
            if op.kind is OpKind.PREWARM and not op.cancelling:
                waiting = next((w.lease.model for w in self.orch.traffic.pending() if w.lease.model != op.target),
                               None)
                if waiting is not None:  # a person's request for another model: give way now
                    op.cancelling = True
                    self.orch.spawn(self._give_way(op, waiting), f"prewarm-yield-{op.id}")
        if self._wakeup is not None:
            self._wakeup.set()

    async def _give_way(self, op: Operation, model_id: str) -> None:
        async with self.orch._slot_lock:
            if self.orch.op is op and op.running:
                op.superseded_by, op.restore = model_id, False
                await self.orch.end_operation(op)  # its end changes the status: the queue is served at once

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the shutdown's cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOOK_S):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._look()
            except Exception:  # one bad look must not end pre-warming for the life of the server
                log.exception("prewarm: look failed")

    async def _look(self) -> None:
        orch = self.orch
        self._forget_used()
        if orch.closing:
            return
        now = time.monotonic()
        op = orch.op
        if (op is not None and op.running) or orch.traffic.pending() or orch.traffic.starting is not None:
            self.quiet_since = now
            if op is None or op.kind is not OpKind.PREWARM:
                self._show("waiting", None, "an operation or a queued request goes first")
            return
        if now - self.quiet_since < self.idle_s:
            self._show("waiting", None, f"quiet for {self.idle_s:g} s first")
            return
        if not self.dirty and self.state == "idle" and now - self.looked_at < RELOOK_S:
            return
        self.dirty, self.looked_at = False, now
        pick, why = self.pick()
        if pick is None:
            self._show("idle", None, why)
            return
        op = Operation(OpKind.PREWARM, pick, ACTOR)
        running = await orch.begin(op, self._body, only_if_free=True)
        if running is op:
            self._show("warming", pick, "")

    def pick(self) -> tuple[str | None, str]:
        """The model to pre-warm now, or None and why not."""
        orch, now, mono = self.orch, self.clock(), time.monotonic()
        asked = orch.history.asks(now - LOOKBACK_S)
        shares = likelihoods([Ask(m, at) for _, m, _, at in asked if m in orch.models], now,
                             utc_offset_s=time.localtime(now).tm_gmtoff)
        if not shares:
            return None, "no history of what people ask for yet"
        taken_away = {m for _, m, _, _ in orch.history.asks(now - self.respect_s, ("unload", "sleep"))}
        candidates = []
        for model_id, state in orch.models.items():
            asleep = state.status is S.SLEEPING and state.engine is not None
            stopped = state.status is S.STOPPED and state.engine is None
            if not (asleep or stopped) or model_id in taken_away or self.held_off.get(model_id, 0.0) > mono:
                continue
            if shares.get(model_id, 0.0) < MIN_SHARE:
                continue
            fits = orch.plan(model_id, allow_unload=False).feasible
            if asleep:
                candidates.append(Candidate(model_id, True, fits, saved_s=WAKE_S, undo_s=WAKE_S))
            else:
                undo = WAKE_S if state.spec.sleep else expected_stop(orch.history.phase_history(model_id))
                candidates.append(Candidate(model_id, False, fits, saved_s=sum(orch.expected(model_id).values()),
                                            undo_s=undo))
        choice = choose(shares, candidates)
        if choice is None:
            if not candidates:
                return None, "the likely models are loaded"
            if not any(c.fits for c in candidates):
                return None, "the likely models do not fit without unloading"
            return None, "no likely model is worth it (a wrong guess would cost more than a right one saves)"
        log.info("prewarm: %s is the most likely next (%.0f %%)", choice, 100 * shares[choice])
        return choice, ""

    def _show(self, state: str, model: str | None, reason: str) -> None:
        if (state, model, reason) != (self.state, self.model, self.reason):
            self.state, self.model, self.reason = state, model, reason
            self.orch.changed()

    def _forget_used(self) -> None:
        used = [m for m, mark in self.warm.items() if not self._still_warm(m, mark)]
        for model_id in used:
            del self.warm[model_id]
        if used:
            self.orch.changed()

    # The operation ----------------------------------------------------------------------------
    async def _body(self, op: Operation) -> None:
        orch = self.orch
        state = orch.models[op.target or ""]
        used_before, active_before = state.last_used, orch.active
        asleep = state.status is S.SLEEPING
        op.stage = "prewarming"
        detail: dict[str, Any] = {"woken": asleep}
        try:
            if asleep:
                waking = asyncio.ensure_future(orch.wake_engine(state, "prewarm"))
                try:
                    await asyncio.shield(waking)
                except asyncio.CancelledError:
                    await waking  # killing it halfway would lose the sleeping model: it takes seconds
                    detail["superseded_by"] = op.superseded_by
            elif not await self._load(op):
                self._conclude(op, "no_room", detail)
                return
        except asyncio.CancelledError:
            if state.status is S.LOADING and state.engine is not None:
                orch.transition(state, S.UNLOADING, "prewarm superseded")
                await orch.discard_engine(state)
                orch.transition(state, S.STOPPED, "engine killed")
            self.held_off[state.id] = time.monotonic() + HOLD_SUPERSEDED_S
            self._conclude(op, "superseded", {**detail, "by": op.superseded_by})
            return
        except SmartswitchError as exc:
            self.held_off[state.id] = time.monotonic() + HOLD_FAILED_S
            self._conclude(op, "failed", {**detail, "error": exc.code, "message": exc.message})
            return
        in_use = orch.traffic.leases.get(state.id) or any(w.lease.model == state.id for w in orch.traffic.pending())
        if state.status is S.RUNNING and not in_use:
            # Nobody chose it: it must not look recently used (LRU keeps it last) nor become the active model.
            state.last_used = used_before
            self.warm[state.id] = used_before
            if active_before is None and orch.active == state.id:
                orch.active = None
                orch.save_desired()
        self._conclude(op, "success", detail)

    async def _load(self, op: Operation) -> bool:
        """Start the engine where it fits now; False when the room went meanwhile. Its load teaches the ETA."""
        orch = self.orch
        state = orch.models[op.target or ""]
        await orch.refresh_gpu()
        room = orch.plan(state.id, allow_unload=False)
        if not room.feasible or room.unload:
            return False
        op.progress = Progress(dict(orch.expected(state.id)), time.monotonic(),
                               orch.history.learned_milestones(state.id))
        op.loading = state.id
        op.progress.enter("starting", time.monotonic())
        await orch.start_engine(state, op, "prewarm", room.gpus)
        durations = op.progress.finish(time.monotonic())
        orch.tick(op)  # its 100 % goes out on the event stream like a switch's
        phases = {p: s for p, s in durations.items() if p in LOAD_PHASES}
        orch.history.record_load(state.id, phases, sum(phases.values()), "success", op.progress.bytes_total)
        orch.history.record_milestones(state.id, op.progress.milestone_timings())
        await orch.refresh_gpu()
        return True

    def _conclude(self, op: Operation, outcome: str, detail: dict[str, Any]) -> None:
        detail["total_time_seconds"] = op.elapsed()
        self.orch.audit(ACTOR, OpKind.PREWARM, op.target, outcome, detail)
        log.info("prewarm %s: %s in %.2f s", op.target, outcome, op.elapsed())
        self.state, self.model, self.reason = "waiting", None, f"last pre-warm: {op.target} {outcome}"
        self.orch.changed()
