"""The orchestrator: model states, the one operation slot, events out. Runs on its own event loop.

Its parts live beside it, one concern each: ``supervision`` (engines -> signals -> model states),
``switching`` (a switch, its cancel and the rollback after it), ``manager`` (load, unload, sleep, wake,
pin), ``recovery`` (what a restart finds). Other threads reach it through ``core.OrchestratorPort``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import psutil

from dashboard.api.ratelimit import RateLimiter
from dashboard.config import Config, ModelSpec
from dashboard.engines.base import Engine
from dashboard.errors import OperationInProgress, UnknownModel
from dashboard.events import Event, ProgressEvent, StageEvent, StatusEvent
from dashboard.gpu.base import EngineMemory, GpuMonitor, GpuReading
from dashboard.orchestrator.history import History
from dashboard.orchestrator.manager import ModelManager
from dashboard.orchestrator.operations import CANCELLABLE, Operation, OpKind, supersedes
from dashboard.orchestrator.planner import Device, LoadedModel, Plan, place
from dashboard.orchestrator.prewarm import Prewarmer
from dashboard.orchestrator.progress import PHASE_TEXT, BoxProfile, LoadSample, expected_durations, learn_box
from dashboard.orchestrator.recovery import Recovery
from dashboard.orchestrator.snapshot import build_snapshot
from dashboard.orchestrator.states import ModelState, ModelStatus, check_transition
from dashboard.orchestrator.supervision import Supervision
from dashboard.orchestrator.switching import Switching
from dashboard.orchestrator.traffic import Traffic

log = logging.getLogger("smartswitch.orchestrator")


class EngineFactory(Protocol):
    """Makes a model's engine: a new one on ``devices`` (``port``, ``ref`` None), or one to adopt."""

    def __call__(self, spec: ModelSpec, port: int | None, ref: str | None,
                 devices: tuple[int, ...] | None = None) -> Engine: ...


Sweep = Callable[[set[str]], list[str]]
DESIRED_KEY = "desired_state"
PLACEMENT_KEY = "placement:"  # + model id: the devices its engine was started on, for adoption after a restart
GPU_REFRESH_S = 1.0


class Orchestrator(Supervision, Switching, ModelManager, Recovery):
    """Owns the model states and the operation slot; every change becomes an event."""

    def __init__(self, config: Config, gpu: GpuMonitor, history: History, engine_factory: EngineFactory,
                 sweep: Sweep | None = None) -> None:
        self.config = config
        self.gpu = gpu
        self.history = history
        self.engine_factory = engine_factory
        self.sweep = sweep  # stops engines of this data dir that no record knows (processes, containers)
        self.models = {mid: ModelState(spec) for mid, spec in config.models.items()}
        self.base_pinned = {m.id for m in config.models.values() if m.pinned} | set(config.switching.preserve_models)
        self.pin_overrides: dict[str, bool] = {}
        self.active: str | None = None
        self.op: Operation | None = None
        self.closing = False
        self.listeners: set[Callable[[Event], None]] = set()
        self.last_switch_error: dict[str, Any] | None = None
        self.traffic = Traffic()  # chat requests: in flight, draining, queued
        self.limiter = RateLimiter(config.server.switches_per_minute)  # engine starts per actor
        self.listeners.add(self.on_traffic_event)
        self.reading = GpuReading(gpu.source, 0.0, 0.0)
        self._expected: dict[str, dict[str, float]] = {}
        self._learned_at = -1  # the history's load count the estimates were made at
        self._box: BoxProfile | None = None
        self.prewarmer = Prewarmer(self)
        self._snapshot: dict[str, Any] = {}
        self._slot_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None

    @property
    def pinned(self) -> set[str]:
        preserved = set(self.config.switching.preserve_models)
        chosen = {m for m in self.base_pinned if self.pin_overrides.get(m, True)}
        return chosen | preserved | {m for m, pin in self.pin_overrides.items() if pin}

    # Start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A history write that gave up after its retries shows in the status at once.
        self.history.on_write_error = lambda _message: loop.call_soon_threadsafe(self.changed)
        await self.recover()
        self.settle_placement()
        await self.refresh_gpu()
        self.changed()
        self._refresher = self.spawn(self._refresh_loop(), "gpu-refresh")
        self.prewarmer.start()

    async def shutdown(self, stop_engines: bool = True) -> None:
        """End the running operation without restoring anything, then stop (or let go of) every engine."""
        self.closing = True
        self.kick_queue()  # queued requests end now, with the reason
        async with self._slot_lock:
            if self.op is not None:
                self.op.restore = False
                await self.end_operation(self.op)
            self.op = Operation(OpKind.SHUTDOWN, None, "orchestrator")
        if self._refresher is not None:
            self._refresher.cancel()
        started = time.monotonic()
        holders = [s for s in self.models.values() if s.engine is not None]
        if stop_engines:
            await asyncio.gather(*(self.stop_engine(s, "shutdown") for s in holders), return_exceptions=True)
        else:
            for state in holders:
                await self.let_go(state)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        log.info("shutdown: %d engine(s) %s in %.1f s", len(holders),
                 "stopped" if stop_engines else "left for the next start", time.monotonic() - started)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A background task that is kept (not garbage collected) and cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # Model status: the one place it changes ---------------------------------------------------
    def transition(self, state: ModelState, new: ModelStatus, cause: str, *, error: str | None = None) -> None:
        """Validate against the table, log, and publish. ``error`` is kept only for a failure."""
        old = state.status
        check_transition(state.id, old, new)
        state.status = new
        state.error = error if new is ModelStatus.FAILED else None
        if new is ModelStatus.RUNNING:
            state.health = "healthy"
        elif new is ModelStatus.FAILED:
            state.health = "unhealthy"
        elif new is ModelStatus.STOPPED:
            state.health = "unknown"
        if new is not ModelStatus.RUNNING and self.active == state.id:
            self.active = None
            self.save_desired()
        if old is not new:
            log.info("%s: %s -> %s (%s)%s", state.id, old, new, cause, f": {error}" if error else "")
        self.changed()

    # The operation slot -----------------------------------------------------------------------
    async def begin(self, op: Operation, body: Callable[[Operation], Awaitable[Any]], *,
                    only_if_free: bool = False) -> Operation:
        """Take the slot for ``op`` (superseding or refused by the running one) and start its body;
        ``only_if_free``: never supersede, return the running operation instead."""
        async with self._slot_lock:
            running = self.op
            if running is not None and running.running:
                if (op.kind is OpKind.SWITCH and running.kind is OpKind.SWITCH and running.target == op.target
                        and not running.cancelling):
                    return running  # the same request twice joins the switch already under way
                if only_if_free and not self.closing:
                    return running  # a switch for queued requests waits for the slot instead
                if not supersedes(op.kind, running.kind) or self.closing:
                    self.refuse(op, running)
                running.superseded_by, running.restore = op.target, False
                await self.end_operation(running)
            self.op = op
            op.task = asyncio.ensure_future(self._run(op, body))
            op.task.set_name(f"{op.kind}-{op.target}-{op.id}")
            log.info("%s %s by %s: started", op.kind, op.target or "", op.actor)
            self.changed()
            return op

    def refuse(self, op: Operation, running: Operation) -> None:
        names = {mid: s.spec.name for mid, s in self.models.items()}
        what = running.describe(names)
        hint = "cancel it or wait" if running.kind in CANCELLABLE else "wait a moment"
        message = (f"{what} is in progress; {hint}." if not self.closing
                   else "The orchestrator is shutting down.")
        self.audit(op.actor, op.kind, op.target, "refused", {"running": running.kind.value,
                                                               "running_target": running.target})
        log.info("%s %s by %s: refused (%s)", op.kind, op.target or "", op.actor, message)
        raise OperationInProgress(message, operation=running.kind.value, target_model=running.target)

    async def check_slot(self, op: Operation) -> None:
        """For instant operations (pin): refused while another one runs (a pre-warm gives way), else done on
        the spot."""
        async with self._slot_lock:
            running = self.op
            if running is not None and running.running:
                if not supersedes(op.kind, running.kind) or self.closing:
                    self.refuse(op, running)
                running.superseded_by, running.restore = op.target, False
                await self.end_operation(running)

    async def _run(self, op: Operation, body: Callable[[Operation], Awaitable[Any]]) -> Any:
        try:
            return await body(op)
        finally:
            op.concluded = True
            if self.op is op:  # a switch that handed over to its rollback has already moved on
                self.op = None
            self.changed()

    async def end_operation(self, op: Operation) -> None:
        """Cancel ``op``'s task and wait until it has concluded (its events sent, its audit written)."""
        task = op.task
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not op.concluded:  # cancelled before its first step: its body never ran, so end it here
            op.concluded = True
            await self.abandoned_before_start(op)
            if self.op is op:
                self.op = None
        self.changed()

    # Persistence of what was asked for --------------------------------------------------------
    def save_desired(self) -> None:
        op = self.op
        switch = None
        if op is not None and op.kind is OpKind.SWITCH and op.running:
            switch = {"id": op.id, "target": op.target, "from": op.from_model, "actor": op.actor,
                      "unloaded": list(op.unloaded), "started_at": op.started_at}
        self.history.set(DESIRED_KEY, json.dumps({"active": self.active, "pins": self.pin_overrides,
                                                  "switch": switch}))

    def load_desired(self) -> dict[str, Any]:
        raw = self.history.get(DESIRED_KEY)
        try:
            value = json.loads(raw) if raw else {}
        except ValueError:
            value = {}
        return value if isinstance(value, dict) else {}

    def audit(self, actor: str, action: str, target: str | None, outcome: str,
              detail: dict[str, Any] | None = None) -> None:
        self.history.audit(actor, str(action), target, outcome, detail)

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
        return self.active

    def plan(self, target: str, *, allow_unload: bool | None = None) -> Plan:
        """Where ``target`` would go and what would be unloaded for it (``allow_unload=False``: only where
        it fits now); nothing is changed."""
        state = self.check_model(target)
        loaded = [LoadedModel(mid, self.reading.per_model.get(mid, s.declared_gb), s.last_used,
                              can_sleep=s.spec.sleep and s.status is ModelStatus.RUNNING, host_gb=s.spec.size_gb,
                              devices=self.devices_of(s))
                  for mid, s in self.models.items() if s.engine is not None and mid != target]
        if state.engine is not None and state.status in (ModelStatus.RUNNING, ModelStatus.LOADING):
            loaded.append(LoadedModel(target, state.declared_gb, state.last_used, devices=self.devices_of(state)))
        sleeping = state.status is ModelStatus.SLEEPING and state.engine is not None
        # A sleeping target already holds its residual where it sleeps; waking needs only the rest, there.
        required = state.required_gb - (state.declared_gb if sleeping else 0.0)
        # Memory held by processes that are not ours counts as used on its device and cannot be freed.
        devices = [Device(d.index, d.free_gb) for d in self.reading.by_device()]
        return place(loaded, devices, target, required, tp=state.spec.tensor_parallel_size,
                     gpus=self.devices_of(state) if sleeping else state.spec.gpus,
                     strategy=self.config.switching.strategy, pinned=self.pinned,
                     preserved=self.config.switching.preserve_models,
                     allow_unload=self.config.switching.auto_unload if allow_unload is None else allow_unload,
                     host_free_gb=self.host_free_gb())

    # Placement --------------------------------------------------------------------------------
    def devices_of(self, state: ModelState) -> tuple[int, ...]:
        """Where a model's engine sits: its placement, else where the GPU sees it, else its pinned or first set."""
        return (state.devices or self.reading.models_on().get(state.id) or state.spec.gpus
                or tuple(range(state.spec.tensor_parallel_size)))

    def placement_for(self, state: ModelState) -> tuple[int, ...]:
        """The devices to start ``state`` on now: the plan's set where it fits, else the emptiest devices."""
        the_plan = self.plan(state.id, allow_unload=False)
        if the_plan.feasible and the_plan.gpus:
            return the_plan.gpus
        if state.spec.gpus is not None:
            return state.spec.gpus
        emptiest = sorted(self.reading.by_device(), key=lambda d: (-d.free_gb, d.index))
        return tuple(sorted(d.index for d in emptiest[:state.spec.tensor_parallel_size]))

    def remember_placement(self, state: ModelState, devices: tuple[int, ...]) -> None:
        state.placement = devices
        self.history.set_json(PLACEMENT_KEY + state.id, list(devices))

    def settle_placement(self) -> None:
        """After recovery: adopted engines get the devices they were started on (else where they are seen),
        and each model the footprint measured at its own device count."""
        counts = {mid: s.spec.tensor_parallel_size for mid, s in self.models.items()}
        measured = self.history.measured_memory(counts)
        for mid, state in self.models.items():
            state.measured_gb = measured.get(mid)
            if state.engine is None:
                continue
            remembered = self.history.get_json(PLACEMENT_KEY + mid)
            if isinstance(remembered, list) and remembered and all(isinstance(d, int) for d in remembered):
                state.placement = tuple(remembered)
            else:
                state.placement = self.devices_of(state)
            log.info("%s: adopted on GPU(s) %s", mid, ", ".join(map(str, state.placement)))

    def host_free_gb(self) -> float:
        """Host RAM left for sleeping models' weights: the configured budget, else what is available."""
        asleep = sum(s.spec.size_gb for s in self.models.values() if s.status is ModelStatus.SLEEPING)
        budget = self.config.switching.host_ram_gb
        if budget is not None:
            return max(budget - asleep, 0.0)
        return psutil.virtual_memory().available / 1e9

    def expected(self, model_id: str) -> dict[str, float]:
        """Seconds per load phase: this model's history, else what every load on this box taught."""
        if self.history.loads_recorded != self._learned_at:  # any load teaches every never-loaded model
            self._expected, self._learned_at, self._box = {}, self.history.loads_recorded, None
        if model_id not in self._expected:
            spec = self.models[model_id].spec
            self._expected[model_id] = expected_durations(
                self.history.phase_history(model_id), spec.size_gb, self.box_profile(), spec.engine,
                spec.tensor_parallel_size)
        return self._expected[model_id]

    def box_profile(self) -> BoxProfile:
        """The disk's read rate and each engine kind's start costs, from every recent load on this box."""
        if self._box is None:
            kinds = {mid: (s.spec.engine, s.spec.tensor_parallel_size) for mid, s in self.models.items()}
            self._box = learn_box([LoadSample(*kinds[m], phases, size)
                                   for m, size, phases in self.history.load_samples() if m in kinds])
        return self._box

    # GPU memory (read off the loop: NVML and process scans take milliseconds) ----------------
    async def refresh_gpu(self) -> None:
        holders = [(mid, s) for mid, s in self.models.items() if s.engine is not None]
        nvml = self.gpu.source == "nvml"

        def read() -> GpuReading:
            return self.gpu.read([EngineMemory(mid, s.engine.pids() if nvml and s.engine else (), s.declared_gb,
                                               s.devices) for mid, s in holders])
        self.reading = await asyncio.to_thread(read)

    async def refresh_and_publish(self) -> None:
        await self.refresh_gpu()
        self.changed()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(GPU_REFRESH_S)
            before = self.reading
            await self.refresh_gpu()
            if self.reading != before:  # totals, each model's share, or any device's figures
                self.changed()

    # Events out -------------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def changed(self) -> None:
        self._snapshot = self._build_snapshot()
        self.emit(StatusEvent(self._snapshot))

    def _build_snapshot(self) -> dict[str, Any]:
        failures = getattr(self.history, "last_write_error", None)
        return build_snapshot(self.config, self.models, self.reading, active=self.active, op=self.op,
                              pinned=self.pinned, expected_s=lambda mid: sum(self.expected(mid).values()),
                              last_switch_error=self.last_switch_error, queue=self.traffic.by_model(),
                              bookkeeping_error=failures, warm=self.prewarmer.warm_models(),
                              prewarm=self.prewarmer.status())

    def stage(self, op: Operation, stage: str, message: str) -> None:
        op.stage = stage
        self.emit(StageEvent(op.id, stage, message, op.target or "", op.from_model))
        self.tick(op, message)

    def tick(self, op: Operation, message: str | None = None) -> None:
        """Emit a progress event from the operation's progress model (also the ETA clock)."""
        if op.concluded:
            return  # a failed or cancelled load never shows progress after its end
        if op.progress is None:
            event = ProgressEvent(op.id, op.stage, 0, None, message or PHASE_TEXT["checking_memory"],
                                  op.target or "", "checking_memory")
        else:
            snap = op.progress.snapshot(time.monotonic())
            percent, eta = snap.percent, snap.eta_s
            done, total = op.step
            if total > 1:  # a rollback of several models: each one is a share of the bar
                percent = int((100 * done + snap.percent) / total)
            event = ProgressEvent(op.id, op.stage, percent, eta, message or snap.message, op.target or "",
                                  snap.phase, snap.bytes_loaded, snap.bytes_total, snap.slow)
        if op.last is not None and event.progress < op.last.progress:
            event = replace(event, progress=op.last.progress)
        op.last = event
        self._snapshot = self._build_snapshot()  # pollers see progress without a status event each tick
        self.emit(event)
