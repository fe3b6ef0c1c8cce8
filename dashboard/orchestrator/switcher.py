"""The state machine: one switch at a time, engines folded into model states, rollback on failure.

Runs on the orchestrator's own event loop; other threads reach it through ``core.OrchestratorPort``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from dashboard.config import Config, ModelSpec
from dashboard.engines import signals as sig
from dashboard.engines.base import Engine
from dashboard.errors import (
    Conflict,
    EngineFailed,
    InsufficientMemory,
    ModelNotRunning,
    SwitchInProgress,
    UnknownModel,
)
from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    Event,
    ProgressEvent,
    StageEvent,
    StatusEvent,
)
from dashboard.gpu.base import EngineMemory, GpuMonitor, GpuReading
from dashboard.orchestrator.history import EngineRecord, History
from dashboard.orchestrator.planner import SLEEP_RESIDUAL, LoadedModel, Plan, plan
from dashboard.orchestrator.progress import (
    LOAD_PHASES,
    PHASE_TEXT,
    Progress,
    expected_durations,
    expected_stop,
)

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec, int | None, str | None], Engine]
DRAIN_TIMEOUT_S = 30.0
TICK_S = 0.5
LOADED = ("loading", "running", "sleeping", "unloading")


@dataclass
class ModelState:
    spec: ModelSpec
    status: str = "stopped"
    health: str = "unknown"
    engine: Engine | None = None
    supervisor: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    ready: asyncio.Future[None] | None = None
    error: str | None = None
    fatal_lines: list[str] = field(default_factory=list)
    signal_gb: dict[str, float] = field(default_factory=dict)
    measured_gb: float | None = None
    last_used: float = 0.0

    @property
    def required_gb(self) -> float:
        return self.measured_gb or self.spec.gpu_memory_gb

    @property
    def declared_gb(self) -> float:
        if self.status == "sleeping":
            return round(self.required_gb * SLEEP_RESIDUAL, 2)
        return self.required_gb if self.status in LOADED or self.engine is not None else 0.0


@dataclass
class SwitchRun:
    id: str
    target: str
    from_model: str | None
    actor: str
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    stage: str = "checking_memory"
    task: asyncio.Task[None] | None = None
    progress: Progress | None = None
    unloaded: list[str] = field(default_factory=list)
    restore: bool = True
    superseded_by: str | None = None
    last: ProgressEvent | None = None
    finished: bool = False


class Orchestrator:
    """Owns the model states and the running switch; every change becomes an event."""

    def __init__(self, config: Config, gpu: GpuMonitor, history: History, engine_factory: EngineFactory,
                 sweep: Callable[[set[str]], list[str]] | None = None) -> None:
        self.config = config
        self.sweep = sweep  # removes labelled containers of ours that were not adopted
        self.gpu = gpu
        self.history = history
        self.engine_factory = engine_factory
        self.models = {mid: ModelState(spec) for mid, spec in config.models.items()}
        self.pinned = {m.id for m in config.models.values() if m.pinned} | set(config.switching.preserve_models)
        self.run: SwitchRun | None = None
        self.listeners: set[Callable[[Event], None]] = set()
        self.last_switch_error: dict[str, Any] | None = None
        self.waiting: dict[str, int] = {}
        self.inflight: dict[str, int] = {}  # proxied requests per model, drained before a sleep
        self.reading = GpuReading(gpu.source, 0.0, 0.0)
        self._expected: dict[str, dict[str, float]] = {}
        self._snapshot: dict[str, Any] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._switch_lock = asyncio.Lock()
        self._detaching: asyncio.Task[None] | None = None

    # Start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        for model_id, gb in self.history.measured_memory().items():
            if model_id in self.models:
                self.models[model_id].measured_gb = gb
        await self._recover_interrupted_switch()
        await self._adopt_engines()
        self._refresh_gpu()
        self._changed()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def shutdown(self, stop_engines: bool = True) -> None:
        """End the running switch and stop (or, for a restart, just let go of) every engine."""
        if self.run and self.run.task:
            self.run.restore = False
            self.run.task.cancel()
            await asyncio.gather(self.run.task, return_exceptions=True)
        if self._refresher:
            self._refresher.cancel()
        engines = [(mid, s) for mid, s in self.models.items() if s.engine is not None]
        if stop_engines:
            await asyncio.gather(*(self._stop(mid) for mid, _ in engines), return_exceptions=True)
            return
        for _, state in engines:
            if state.supervisor is not None:
                state.supervisor.cancel()
            await state.engine.detach()

    async def _recover_interrupted_switch(self) -> None:
        raw = self.history.get("switch_in_progress")
        if not raw:
            return
        info = json.loads(raw)
        message = "Interrupted: the orchestrator stopped in the middle of this switch."
        self.history.audit(info.get("actor", "unknown"), "switch", info.get("target"), "failed",
                           {"switch_id": info.get("id"), "error": "interrupted", "message": message})
        self.last_switch_error = {"switch_id": info.get("id"), "target_model": info.get("target"),
                                  "error": "interrupted", "message": message}
        self.history.set("switch_in_progress", None)

    async def _adopt_engines(self) -> None:
        for record in self.history.engines():
            state = self.models.get(record.model_id)
            if state is None:
                self.history.forget_engine(record.model_id)
                continue
            engine = self.engine_factory(state.spec, record.port, record.ref)
            if await engine.adopt():
                state.engine, state.status, state.health = engine, "running", "healthy"
                state.last_used = record.started_at
                state.supervisor = asyncio.create_task(self._supervise(state, engine))
                self.history.audit("orchestrator", "adopt", record.model_id, "running",
                                   {"runtime": record.runtime, "ref": record.ref})
                continue
            was_alive = engine.alive()
            await engine.stop(self.config.switching.stop_timeout_s)
            self.history.forget_engine(record.model_id)
            if was_alive:
                # It was still loading (or hung) when we went down: nobody is waiting for it now.
                state.status, state.error = "failed", "Load interrupted by an orchestrator restart."
            self.history.audit("orchestrator", "adopt", record.model_id,
                               "cleaned_up" if was_alive else "gone", {"ref": record.ref})
        if self.sweep is not None:
            adopted = {s.engine.ref for s in self.models.values() if s.engine is not None}
            for model_id in await asyncio.to_thread(self.sweep, adopted):
                self.history.audit("orchestrator", "adopt", model_id, "cleaned_up", {"reason": "unknown container"})

    # Reading ----------------------------------------------------------------------------------
    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self.listeners.add(listener)
        return lambda: self.listeners.discard(listener)

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def check_model(self, model_id: str) -> ModelState:
        if model_id not in self.models:
            raise UnknownModel(model_id, list(self.models))
        return self.models[model_id]

    def active_model(self) -> str | None:
        running = [s for s in self.models.values() if s.status == "running"]
        return max(running, key=lambda s: s.last_used).spec.id if running else None

    def plan(self, target: str) -> Plan:
        state = self.check_model(target)
        loaded = [LoadedModel(mid, self.reading.per_model.get(mid, s.declared_gb), s.last_used,
                              can_sleep=s.spec.sleep and s.status == "running", host_gb=s.spec.size_gb)
                  for mid, s in self.models.items() if s.engine is not None and mid != target]
        if state.engine is not None and state.status in ("running", "loading"):
            loaded.append(LoadedModel(target, state.declared_gb, state.last_used))
        # A sleeping target already holds its residual; waking needs only the rest.
        required = state.required_gb - (state.declared_gb if state.status == "sleeping" else 0.0)
        # Memory held by processes that are not ours counts as used and cannot be freed.
        return plan(loaded, self.reading.free_gb, target, required,
                    strategy=self.config.switching.strategy, pinned=self.pinned,
                    allow_unload=self.config.switching.auto_unload, host_free_gb=self.host_free_gb())

    def host_free_gb(self) -> float:
        """Host RAM left for sleeping models' weights: the configured budget, else what is available."""
        asleep = sum(s.spec.size_gb for s in self.models.values() if s.status == "sleeping")
        budget = self.config.switching.host_ram_gb
        if budget is not None:
            return max(budget - asleep, 0.0)
        try:
            with open("/proc/meminfo") as meminfo:
                fields = dict(line.split(":", 1) for line in meminfo)
            return int(fields["MemAvailable"].split()[0]) * 1024 / 1e9
        except (OSError, KeyError, ValueError):
            return 0.0

    def expected(self, model_id: str) -> dict[str, float]:
        if model_id not in self._expected:
            spec = self.models[model_id].spec
            self._expected[model_id] = expected_durations(
                self.history.phase_history(model_id), spec.size_gb, self.history.throughput_gbps())
        return self._expected[model_id]

    # Switching --------------------------------------------------------------------------------
    async def switch(self, target: str, actor: str) -> str:
        """Start a switch to ``target`` (cancelling a running one) and return its id."""
        self.check_model(target)
        async with self._switch_lock:
            run = self.run
            if run is not None and run.task is not None and not run.task.done():
                if run.target == target:
                    return run.id  # the same request twice joins the switch already under way
                run.restore, run.superseded_by = False, target
                await self._cancel_task(run)
            new = SwitchRun(uuid.uuid4().hex[:12], target, self.active_model(), actor)
            self.run = new
            self.history.set("switch_in_progress", json.dumps(
                {"id": new.id, "target": target, "actor": actor, "started_at": new.started_at}))
            new.task = asyncio.create_task(self._switch(new), name=f"switch-{new.id}")
            self._changed()
            return new.id

    async def cancel(self, actor: str) -> bool:
        run = self.run
        if run is None or run.task is None or run.task.done():
            return False
        run.restore = True
        await self._cancel_task(run)
        self.history.audit(actor, "cancel", run.target, "cancelled", {"switch_id": run.id})
        return True

    async def _cancel_task(self, run: SwitchRun) -> None:
        assert run.task is not None
        run.task.cancel()
        await asyncio.gather(run.task, return_exceptions=True)
        if not run.finished:  # cancelled before its first step: the body never ran, so end it here
            self._finish(run, await self._abort(run))

    async def _switch(self, run: SwitchRun) -> None:
        target = self.models[run.target]
        outcome: Event
        try:
            self._stage(run, "checking_memory", f"Checking GPU memory for {target.spec.name}")
            if target.status == "running":
                outcome = CompleteEvent(run.id, "already_loaded", run.target, self._elapsed(run))
            else:
                outcome = await self._switch_to_cold(run)
        except asyncio.CancelledError:
            outcome = await self._abort(run)
        except EngineFailed as exc:
            outcome = await self._fail(run, exc)
        except Exception as exc:  # a bug must still end the switch with an error event
            log.exception("switch %s failed", run.id)
            outcome = await self._fail(run, EngineFailed(f"internal error: {exc}"))
        self._finish(run, outcome)

    async def _switch_to_cold(self, run: SwitchRun) -> Event:
        target = self.models[run.target]
        waking = target.status == "sleeping"
        if target.engine is not None and not waking:  # a failed engine still holding memory
            await self._stop(run.target)
        self._refresh_gpu()
        the_plan = self.plan(run.target)
        if not the_plan.feasible:
            return ErrorEvent(run.id, "insufficient_memory", the_plan.reason, run.target,
                              {"required_gb": round(the_plan.required_gb, 2),
                               "available_gb": round(the_plan.free_gb_before, 2),
                               "can_free_gb": round(the_plan.can_free_gb, 2),
                               "suggestions": self._smaller_fits(the_plan)})
        expected = dict(self.expected(run.target))
        if the_plan.unload:
            expected["unloading"] = sum(expected_stop(self.history.phase_history(mid)) for mid in the_plan.unload)
        run.progress = Progress(expected, time.monotonic(), self.history.learned_milestones(run.target))
        if the_plan.unload:
            names = ", ".join(self.models[m].spec.name + (" (to sleep)" if m in the_plan.sleep else "")
                              for m in the_plan.unload)
            self._stage(run, "unloading_models", f"Unloading {names}")
            for victim in the_plan.unload:
                started = time.monotonic()
                run.unloaded.append(victim)  # before the stop: a cancel mid-stop must still restore it
                if victim in the_plan.sleep:
                    await self._put_to_sleep(victim)
                    self._tick(run)
                    continue
                await self._stop(victim)
                self.history.record_load(victim, {"stopping": time.monotonic() - started}, 0, "unloaded")
                self._tick(run)
            await self._await_memory(run, the_plan.required_gb)
        if waking:  # seconds instead of a cold load: no load history is recorded for it
            self._stage(run, "loading_target", f"Waking {target.spec.name}")
            await self._wake(run.target, run.actor)
            run.progress.finish(time.monotonic())
            self._tick(run)
            return CompleteEvent(run.id, "success", run.target, self._elapsed(run))
        self._stage(run, "loading_target", f"Loading {target.spec.name}")
        run.progress.enter("starting", time.monotonic())
        await self._load(run.target, run)
        durations = run.progress.finish(time.monotonic())
        load_durations = {p: s for p, s in durations.items() if p in LOAD_PHASES}
        self.history.record_load(run.target, load_durations, sum(load_durations.values()), "success",
                                 run.progress.bytes_total)
        self.history.record_milestones(run.target, run.progress.milestone_timings())
        self._expected.pop(run.target, None)
        self._tick(run)
        return CompleteEvent(run.id, "success", run.target, self._elapsed(run))

    def _smaller_fits(self, the_plan: Plan) -> list[str]:
        reachable = the_plan.free_gb_before + the_plan.can_free_gb
        return [s.spec.id for s in sorted(self.models.values(), key=lambda s: -s.required_gb)
                if s.spec.id != the_plan.target and s.required_gb <= reachable]

    async def _await_memory(self, run: SwitchRun, required_gb: float) -> None:
        """After a stop, wait until the GPU has really given the memory back."""
        deadline = time.monotonic() + self.config.switching.memory_release_timeout_s
        while True:
            self._refresh_gpu()
            if self.reading.free_gb + 1e-6 >= required_gb:
                return
            if time.monotonic() > deadline:
                raise EngineFailed(
                    f"GPU memory was not released: {self.reading.free_gb:.1f} GB free, "
                    f"{required_gb:g} GB needed after unloading.", error="memory_not_released")
            self._tick(run, f"Waiting for GPU memory to be released ({self.reading.free_gb:.1f} GB free, "
                            f"{required_gb:g} GB needed)")
            await asyncio.sleep(TICK_S)

    async def _abort(self, run: SwitchRun) -> Event:
        target = self.models[run.target]
        if target.engine is not None and target.status in ("loading", "failed"):
            await self._stop(run.target)
        for state in self.models.values():
            if state.stop_task is not None:
                await asyncio.shield(state.stop_task)
        if run.superseded_by is not None:
            message = f"Superseded by a switch to {self.models[run.superseded_by].spec.name}."
        else:
            await self._rollback(run)
            message = "Switch cancelled; the previous models were restored." if run.unloaded \
                else "Switch cancelled."
        return CancelledEvent(run.id, message, run.target, run.superseded_by)

    async def _fail(self, run: SwitchRun, exc: EngineFailed) -> Event:
        target = self.models[run.target]
        if target.engine is not None:
            await self._stop(run.target)
        target.status, target.error = "failed", exc.message
        restored = await self._rollback(run)
        details: dict[str, Any] = {"rolled_back": restored, **exc.details}
        code = details.pop("error", "engine_failed")
        message = exc.message + (f" Restored: {', '.join(restored)}." if restored else "")
        return ErrorEvent(run.id, code, message, run.target, details)

    async def _rollback(self, run: SwitchRun) -> list[str]:
        """Bring back what was unloaded for this switch, so the user is not left with nothing."""
        restored = []
        if run.unloaded:
            self._stage(run, "rolling_back", "Restoring " + ", ".join(
                self.models[m].spec.name for m in run.unloaded))
        for model_id in run.unloaded:
            try:
                self._refresh_gpu()
                if self.models[model_id].status == "sleeping":
                    await self._wake(model_id)
                    restored.append(model_id)
                    continue
                if self.reading.free_gb + 1e-6 < self.models[model_id].required_gb:
                    continue
                await self._load(model_id, None)
                restored.append(model_id)
            except EngineFailed as exc:
                self.models[model_id].status, self.models[model_id].error = "failed", exc.message
        return restored

    def _finish(self, run: SwitchRun, outcome: Event) -> None:
        run.finished = True
        if isinstance(outcome, CompleteEvent):
            self.models[run.target].last_used = time.time()
            self.history.set(f"last_used:{run.actor}", run.target)
            self.last_switch_error = None
        elif isinstance(outcome, ErrorEvent):
            self.last_switch_error = {"switch_id": run.id, "target_model": run.target,
                                      "error": outcome.error, "message": outcome.message, **outcome.details}
        result = {CompleteEvent: "success", ErrorEvent: "failed", CancelledEvent: "cancelled"}[type(outcome)]
        detail: dict[str, Any] = {"switch_id": run.id, "from": run.from_model,
                                  "total_time_seconds": self._elapsed(run)}
        if isinstance(outcome, ErrorEvent):
            detail.update(error=outcome.error, message=outcome.message)
        if isinstance(outcome, CompleteEvent):
            detail["status"] = outcome.status
        self.history.audit(run.actor, "switch", run.target, result, detail)
        self.history.set("switch_in_progress", None)
        if self.run is run:
            self.run = None
        self._emit(outcome)
        self._changed()

    def _stage(self, run: SwitchRun, stage: str, message: str) -> None:
        run.stage = stage
        self._emit(StageEvent(run.id, stage, message, run.target, run.from_model))
        self._tick(run, message)

    def _tick(self, run: SwitchRun, message: str | None = None) -> None:
        """Emit a progress event from the run's progress model (also used as the ETA clock)."""
        if run.progress is None:
            event = ProgressEvent(run.id, run.stage, 0, None, message or PHASE_TEXT["checking_memory"],
                                  run.target, "checking_memory")
        else:
            snap = run.progress.snapshot(time.monotonic())
            event = ProgressEvent(run.id, run.stage, snap.percent, snap.eta_s, message or snap.message,
                                  run.target, snap.phase, snap.bytes_loaded, snap.bytes_total, snap.slow)
        if run.last is not None and event.progress < run.last.progress:
            event = replace(event, progress=run.last.progress)
        run.last = event
        self._snapshot = self._build_snapshot()  # pollers see progress without a status event each tick
        self._emit(event)

    @staticmethod
    def _elapsed(run: SwitchRun) -> float:
        return round(time.monotonic() - run.started, 3)

    # Engines ----------------------------------------------------------------------------------
    async def _load(self, model_id: str, run: SwitchRun | None) -> None:
        """Start the model's engine and wait until it is ready; raises EngineFailed."""
        state = self.models[model_id]
        engine = self.engine_factory(state.spec, None, None)
        state.engine, state.status, state.health, state.error = engine, "loading", "unknown", None
        state.fatal_lines, state.signal_gb = [], {}
        state.ready = asyncio.get_running_loop().create_future()
        try:
            await engine.start()
        except Exception as exc:
            state.engine, state.status = None, "failed"
            raise EngineFailed(f"{state.spec.name} could not start: {exc}") from exc
        self.history.save_engine(EngineRecord(model_id, engine.runtime, engine.ref, engine.port,
                                              state.required_gb, time.time()))
        state.supervisor = asyncio.create_task(self._supervise(state, engine), name=f"supervise-{model_id}")
        self._changed()
        while True:
            done, _ = await asyncio.wait({state.ready}, timeout=TICK_S)
            if run is not None:
                self._tick(run)
            if done:
                break
        state.ready.result()

    async def _stop(self, model_id: str) -> None:
        state = self.models[model_id]
        if state.stop_task is None:
            state.stop_task = asyncio.create_task(self._stop_engine(state))
        # Shielded: a cancelled switch must not leave a half-stopped engine behind.
        await asyncio.shield(state.stop_task)

    async def _stop_engine(self, state: ModelState) -> None:
        try:
            engine = state.engine
            if engine is None:
                return
            if state.status != "failed":
                state.status = "unloading"
            self._changed()
            await engine.stop(self.config.switching.stop_timeout_s)
            if state.supervisor is not None:
                state.supervisor.cancel()
            if state.ready is not None and not state.ready.done():
                state.ready.cancel()
            state.engine, state.supervisor = None, None
            if state.status != "failed":
                state.status, state.health = "stopped", "unknown"
            self.history.forget_engine(state.spec.id)
            self._refresh_gpu()
            self._changed()
        finally:
            state.stop_task = None

    async def _supervise(self, state: ModelState, engine: Engine) -> None:
        while True:
            signal = await engine.queue.get()
            self._on_signal(state, engine, signal)
            if isinstance(signal, sig.Exited):
                return

    def _on_signal(self, state: ModelState, engine: Engine, signal: sig.EngineSignal) -> None:
        if state.engine is not engine or state.stop_task is not None:
            return  # an engine we are stopping: its exit is expected
        run = self.run
        if run is not None and run.target == state.spec.id and run.progress is not None:
            phase = run.progress.phase
            run.progress.on_signal(signal, time.monotonic())
            if isinstance(signal, sig.ShardProgress | sig.CheckpointSize) or run.progress.phase != phase:
                self._tick(run)  # real signals show at once, not on the next half-second tick
        match signal:
            case sig.ModelMemory(gib=gib):
                state.signal_gb["weights"] = gib * 1.073741824
            case sig.KVCache(gib=float() as gib):
                state.signal_gb["kv_cache"] = gib * 1.073741824
            case sig.GraphCapture(finished=True, gib=float() as gib):
                state.signal_gb["graphs"] = gib * 1.073741824
            case sig.EngineError(message=message):
                if state.status == "loading":
                    if message not in state.fatal_lines:
                        state.fatal_lines.append(message)
                else:
                    state.health, state.status = "unhealthy", "failed"
                    state.error = f"{state.spec.name} is not answering: {message}"
                    self._changed()
            case sig.Ready():
                self._became_ready(state)
            case sig.Stalled(seconds=seconds):
                self._fail_load(state, f"{state.spec.name} stalled: no output for {seconds:g} s.",
                                "engine_stalled")
            case sig.Exited(returncode=code):
                # The engine's own words: its first fatal lines, else its last meaningful ones.
                why = "; ".join(state.fatal_lines[:3]) or " | ".join(signal.last_lines[-3:]) or "no output"
                if state.status == "loading":
                    self._fail_load(state, f"{state.spec.name} exited with code {code} while loading: {why}",
                                    "engine_failed")
                else:
                    state.status, state.health = "failed", "unhealthy"
                    state.error = f"{state.spec.name} exited unexpectedly (code {code}): {why}"
                    state.engine = None
                    self._detaching = asyncio.create_task(engine.detach())  # stop its watchers
                    self.history.forget_engine(state.spec.id)
                    self.history.audit("orchestrator", "engine_exit", state.spec.id, "failed",
                                       {"returncode": code, "message": why})
                    self._refresh_gpu()
                    self._changed()

    def _fail_load(self, state: ModelState, message: str, code: str) -> None:
        if state.ready is not None and not state.ready.done():
            state.ready.set_exception(EngineFailed(message, error=code))

    def _became_ready(self, state: ModelState) -> None:
        state.status, state.health, state.last_used = "running", "healthy", time.time()
        self._refresh_gpu()
        measured, source = self.reading.per_model.get(state.spec.id), "nvml"
        if self.gpu.source != "nvml" or not measured:
            measured, source = sum(state.signal_gb.values()) or None, "engine_logs"
        if measured:
            state.measured_gb = round(measured, 1)
            self.history.record_memory(state.spec.id, state.measured_gb, source)
            self._refresh_gpu()  # the virtual GPU counts what the engine really declared
        if state.ready is not None and not state.ready.done():
            state.ready.set_result(None)
        self._changed()

    async def ensure_running(self, model_id: str, actor: str) -> None:
        """Switch to ``model_id`` if needed and wait for it (requests queue visibly meanwhile)."""
        state = self.check_model(model_id)
        if state.status == "running":
            return
        self.waiting[model_id] = self.waiting.get(model_id, 0) + 1
        self._changed()
        try:
            if self.run is None or self.run.target != model_id:
                await self.switch(model_id, actor)
            run = self.run
            if run is not None and run.task is not None:
                await asyncio.shield(run.task)
            if state.status != "running":
                raise ModelNotRunning(f"{state.spec.name} could not be started: {state.error or 'cancelled'}",
                                      requested_model=model_id)
        finally:
            self.waiting[model_id] -= 1
            self._changed()

    def request_started(self, model_id: str) -> None:
        self.inflight[model_id] = self.inflight.get(model_id, 0) + 1

    def request_finished(self, model_id: str) -> None:
        self.inflight[model_id] = max(self.inflight.get(model_id, 0) - 1, 0)

    # Model manager actions --------------------------------------------------------------------
    def _idle_or_raise(self) -> None:
        if self.run is not None:
            raise SwitchInProgress(f"A switch to {self.run.target} is in progress; cancel it or wait.",
                                   target_model=self.run.target)

    async def load(self, model_id: str, actor: str) -> None:
        state = self.check_model(model_id)
        self._idle_or_raise()
        if state.status in ("running", "loading"):
            return
        if state.status == "sleeping":
            return await self._wake(model_id, actor)
        self._refresh_gpu()
        if state.engine is not None:
            await self._stop(model_id)
        the_plan = self.plan(model_id)
        if the_plan.unload or not the_plan.feasible:
            raise InsufficientMemory(
                f"{state.spec.name} needs {the_plan.required_gb:g} GB and {the_plan.free_gb_before:.1f} GB "
                "are free: unload a model first, or switch to it.", **the_plan.as_dict())
        try:
            await self._load(model_id, None)
            self.history.audit(actor, "load", model_id, "success")
        except EngineFailed as exc:
            state.status, state.error = "failed", exc.message
            if state.engine is not None:
                await self._stop(model_id)
            self.history.audit(actor, "load", model_id, "failed", {"message": exc.message})
            raise

    async def unload(self, model_id: str, actor: str) -> None:
        state = self.check_model(model_id)
        self._idle_or_raise()
        if state.engine is None and state.status != "failed":
            return
        await self._stop(model_id)
        state.status, state.error = "stopped", None
        self._changed()
        self.history.audit(actor, "unload", model_id, "success")

    async def sleep(self, model_id: str, actor: str) -> None:
        state = self.check_model(model_id)
        self._idle_or_raise()
        if not state.spec.sleep:
            raise Conflict(f"{state.spec.name} is not sleep-capable (set sleep = true in the catalog).")
        if state.status != "running" or state.engine is None:
            raise ModelNotRunning(f"{state.spec.name} is {state.status}; only a running model can sleep.")
        await self._put_to_sleep(model_id)
        self.history.audit(actor, "sleep", model_id, "success")

    async def _put_to_sleep(self, model_id: str) -> None:
        """Level-1 sleep (weights to host RAM), after the requests in flight have finished."""
        state = self.models[model_id]
        assert state.engine is not None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.inflight.get(model_id, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # sleeping with requests in flight has crashed engines
        try:
            async with httpx.AsyncClient(timeout=120.0) as client:
                (await client.post(f"{state.engine.base_url}/sleep", params={"level": 1})).raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineFailed(f"{state.spec.name} could not be put to sleep: {exc}") from exc
        state.status = "sleeping"
        self._refresh_gpu()
        self._changed()

    async def _wake(self, model_id: str, actor: str = "orchestrator") -> None:
        """Wake, then prove readiness: /is_sleeping false and a one-token request answered."""
        state = self.models[model_id]
        if state.engine is None:
            raise ModelNotRunning(f"{state.spec.name} has no engine to wake.")
        base = state.engine.base_url
        try:
            async with httpx.AsyncClient(timeout=120.0) as client:
                (await client.post(f"{base}/wake_up")).raise_for_status()
                if (await client.get(f"{base}/is_sleeping")).json().get("is_sleeping"):
                    raise EngineFailed(f"{state.spec.name} did not wake up.")
                probe = await client.post(f"{base}/v1/chat/completions", json={
                    "model": model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]})
                probe.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineFailed(f"{state.spec.name} did not come back from sleep: {exc}") from exc
        state.status, state.last_used = "running", time.time()
        self._refresh_gpu()
        self._changed()
        self.history.audit(actor, "wake", model_id, "success")

    async def wake(self, model_id: str, actor: str) -> None:
        state = self.check_model(model_id)
        self._idle_or_raise()
        if state.status != "sleeping":
            raise ModelNotRunning(f"{state.spec.name} is {state.status}, not sleeping.")
        await self._wake(model_id, actor)

    def set_pinned(self, model_id: str, pinned: bool, actor: str) -> None:
        self.check_model(model_id)
        (self.pinned.add if pinned else self.pinned.discard)(model_id)
        self.history.audit(actor, "pin" if pinned else "unpin", model_id, "success")
        self._changed()

    # State out --------------------------------------------------------------------------------
    def _refresh_gpu(self) -> None:
        engines = [EngineMemory(mid, s.engine.pids() if self.gpu.source == "nvml" and s.engine else (),
                                s.declared_gb)
                   for mid, s in self.models.items() if s.engine is not None]
        self.reading = self.gpu.read(engines)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            before = (self.reading.used_gb, self.reading.per_model)
            self._refresh_gpu()
            if (self.reading.used_gb, self.reading.per_model) != before:
                self._changed()

    def _emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def _changed(self) -> None:
        self._snapshot = self._build_snapshot()
        self._emit(StatusEvent(self._snapshot))

    def _build_snapshot(self) -> dict[str, Any]:
        run = self.run
        models = {}
        for mid, state in self.models.items():
            entry: dict[str, Any] = {
                "id": mid,
                "name": state.spec.name,
                "status": state.status,
                "health": state.health,
                "size_gb": state.spec.size_gb,
                "load_progress": 100 if state.status == "running" else 0,
                "estimated_load_time_seconds": round(sum(self.expected(mid).values()), 1),
                "pinned": mid in self.pinned,
                "sleep_capable": state.spec.sleep,
                "engine": state.spec.engine,
                "runtime": state.spec.runtime,
                "error": state.error,
                "last_used": state.last_used or None,
            }
            if state.engine is not None:
                entry["gpu_memory_used_gb"] = round(self.reading.per_model.get(mid, state.declared_gb), 2)
                entry["endpoint"] = state.engine.base_url
            else:
                entry["gpu_memory_required_gb"] = round(state.required_gb, 2)
            if run is not None and run.target == mid and run.last is not None and state.status == "loading":
                entry["load_progress"] = run.last.progress
            models[mid] = entry
        reading = self.reading
        return {
            "models": models,
            "gpu": {"total_memory_gb": round(reading.total_gb, 2), "used_memory_gb": round(reading.used_gb, 2),
                    "available_memory_gb": round(reading.free_gb, 2),
                    "per_model_gb": {k: round(v, 2) for k, v in reading.per_model.items()},
                    "name": reading.name},
            "source": reading.source,
            "active_model": self.active_model(),
            "switch": None if run is None else {
                "id": run.id, "from_model": run.from_model, "target_model": run.target, "stage": run.stage,
                "actor": run.actor, "started_at": run.started_at,
                "progress": run.last.progress if run.last else 0,
                "eta_seconds": run.last.eta_seconds if run.last else None,
                "message": run.last.message if run.last else "",
                "bytes_loaded": run.last.bytes_loaded if run.last else None,
                "bytes_total": run.last.bytes_total if run.last else None,
                "slow": run.last.slow if run.last else False,
            },
            "last_switch_error": self.last_switch_error,
            "request_queue": {mid: n for mid, n in self.waiting.items() if n},
            "strategy": self.config.switching.strategy,
            "confirm_before_unload": self.config.switching.confirm_before_unload,
        }
