"""A switch: plan, unload, load, with cancel; and the rollback that follows a failed or cancelled one.

A switch ends with exactly one terminal event the moment its outcome is known. When it unloaded
models and did not finish, a rollback takes the slot straight after it as its own operation, with its
own progress, restoring exactly what was there before (the active model included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from dashboard.errors import EngineFailed, SmartswitchError
from dashboard.events import CancelledEvent, CompleteEvent, ErrorEvent, Event
from dashboard.orchestrator.operations import Operation, OpKind
from dashboard.orchestrator.planner import Plan
from dashboard.orchestrator.progress import LOAD_PHASES, Progress, expected_stop
from dashboard.orchestrator.states import ModelStatus

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
MEMORY_POLL_S = 0.5
S = ModelStatus


class Switching:
    """Mixed into ``Orchestrator``: switch, cancel, rollback."""

    async def switch(self: Orchestrator, target: str, actor: str, *, only_if_free: bool = False) -> str:
        """Start a switch to ``target`` (superseding a running switch, load or rollback); returns its id.
        ``only_if_free`` (a switch for queued requests): with the slot busy, nothing starts and the running
        operation's id is returned."""
        self.check_model(target)
        op = Operation(OpKind.SWITCH, target, actor)
        running = await self.begin(op, self._switch_body, only_if_free=only_if_free)
        if running is op:
            op.from_model = self.active  # read inside the slot: what a cancel must bring back
            self.save_desired()
        return running.id

    async def cancel(self: Orchestrator, actor: str) -> bool:
        """End the running switch, load or rollback; what a switch unloaded is restored afterwards."""
        async with self._slot_lock:
            op = self.op
            if op is None or not op.running or op.kind not in (OpKind.SWITCH, OpKind.LOAD, OpKind.ROLLBACK):
                return False
            op.cancelling, op.restore = True, op.kind is OpKind.SWITCH
            if op.kind is OpKind.SWITCH:
                back = [self.models[m].spec.name for m in self._to_restore(op)]
                self.stage(op, "cancelling", "Cancelling" + (f" — restoring {', '.join(back)}" if back else ""))
            self.audit(actor, "cancel", op.target, "cancelled", {"operation": op.kind.value, "switch_id": op.id})
            await self.end_operation(op)
            return True

    # The switch itself ------------------------------------------------------------------------
    async def _switch_body(self: Orchestrator, op: Operation) -> None:
        target = self.models[op.target or ""]
        outcome: Event
        try:
            self.stage(op, "checking_memory", f"Checking GPU memory for {target.spec.name}")
            if target.status is S.RUNNING:
                outcome = CompleteEvent(op.id, "already_loaded", target.id, op.elapsed())
            else:
                outcome = await self._switch_steps(op)
        except asyncio.CancelledError:
            outcome = await self._abandon(op)
        except SmartswitchError as exc:
            outcome = await self._failed(op, exc)
        except Exception as exc:  # a bug must still end the switch with an error event
            log.exception("switch %s failed", op.id)
            outcome = await self._failed(op, EngineFailed(f"internal error: {exc}"))
        self.conclude(op, outcome)
        self._hand_over_to_rollback(op, outcome)

    async def _switch_steps(self: Orchestrator, op: Operation) -> Event:
        target = self.models[op.target or ""]
        waking = target.status is S.SLEEPING
        if target.engine is not None and not waking:  # a failed engine still holding memory
            await self.discard_engine(target)
        await self.refresh_gpu()
        the_plan = self.plan(target.id)
        if not the_plan.feasible:
            return ErrorEvent(op.id, "insufficient_memory", the_plan.reason, target.id,
                              {"required_gb": round(the_plan.required_gb, 2),
                               "available_gb": round(the_plan.free_gb_before, 2),
                               "can_free_gb": round(the_plan.can_free_gb, 2),
                               "gpus": list(the_plan.gpus),
                               # Pinned by a person (preserve_models is the catalog's): the banner offers Unpin.
                               "unpinnable": [m for m in the_plan.kept
                                              if m not in self.config.switching.preserve_models],
                               "suggestions": self._smaller_fits(the_plan)})
        expected = dict(self.expected(target.id))
        if the_plan.unload:
            expected["unloading"] = sum(expected_stop(self.history.phase_history(m)) for m in the_plan.unload)
        op.progress = Progress(expected, time.monotonic(), self.history.learned_milestones(target.id))
        if the_plan.unload:
            await self._unload_victims(op, the_plan)
        if waking:  # seconds instead of a cold load: no load history is recorded for it
            self.stage(op, "loading_target", f"Waking {target.spec.name}")
            await self.wake_engine(target, "switch")
            self.audit(op.actor, "wake", target.id, "success", {"switch_id": op.id})
            op.progress.finish(time.monotonic())
            self.tick(op)
            return CompleteEvent(op.id, "success", target.id, op.elapsed())
        self.stage(op, "loading_target", f"Loading {target.spec.name}")
        op.progress.enter("starting", time.monotonic())
        op.loading = target.id
        await self.start_engine(target, op, "switch", the_plan.gpus)
        durations = op.progress.finish(time.monotonic())
        load_durations = {p: s for p, s in durations.items() if p in LOAD_PHASES}
        self.history.record_load(target.id, load_durations, sum(load_durations.values()), "success",
                                 op.progress.bytes_total)
        self.history.record_milestones(target.id, op.progress.milestone_timings())
        self._expected.pop(target.id, None)
        # The engine answers: the switch ends now. The memory it holds is read by the refresh its supervisor
        # starts on ready; awaited here too, that read (a thread) would wait behind every page's refresh of
        # the ready status before the chat could unlock. The next switch reads the GPU again before it plans.
        self.tick(op)
        return CompleteEvent(op.id, "success", target.id, op.elapsed())

    async def _unload_victims(self: Orchestrator, op: Operation, the_plan: Plan) -> None:
        names = ", ".join(self.models[m].spec.name + (" (to sleep)" if m in the_plan.sleep else "")
                          for m in the_plan.unload)
        self.stage(op, "unloading_models", f"Unloading {names}")
        # Every victim stops taking requests now, so each one's drain below waits only for what it has.
        self.begin_drain(list(the_plan.unload))
        try:
            for victim in the_plan.unload:
                state = self.models[victim]
                started = time.monotonic()
                op.unloaded.append(victim)  # before the stop: a cancel mid-stop must still restore it
                self.save_desired()  # a crash from here on restores it at the next start
                if victim in the_plan.sleep:
                    await self.sleep_engine(state, "switch")
                else:
                    await self.stop_engine(state, "switch")
                    self.history.record_load(victim, {"stopping": time.monotonic() - started}, 0, "unloaded")
                self.tick(op)
        finally:  # called off midway: the victims not reached serve again
            self.end_drain(list(the_plan.unload))
        await self._await_memory(op, the_plan)

    def _smaller_fits(self: Orchestrator, the_plan: Plan) -> list[str]:
        """Models not running that would fit (by their own plans: a footprint may fit the sum and no device
        set); a running one is no suggestion, it needs no room."""
        return [s.id for s in sorted(self.models.values(), key=lambda s: -s.required_gb)
                if s.id != the_plan.target and s.status is not S.RUNNING and self.plan(s.id).feasible]

    async def _await_memory(self: Orchestrator, op: Operation, the_plan: Plan) -> None:
        """After a stop, wait until each device of the target's set has really given the memory back."""
        deadline = time.monotonic() + self.config.switching.memory_release_timeout_s
        need = the_plan.required_per_device_gb
        while True:
            await self.refresh_gpu()
            short = [(d, free) for d in the_plan.gpus
                     if (free := device.free_gb if (device := self.reading.device(d)) else 0.0) + 1e-6 < need]
            if not short:
                return
            if len(self.reading.by_device()) == 1:
                what = f"{short[0][1]:.1f} GB free, {need:g} GB needed"
            else:
                what = "; ".join(f"GPU {d}: {free:.1f} GB free, {need:g} GB needed" for d, free in short)
            if time.monotonic() > deadline:
                raise EngineFailed(f"GPU memory was not released: {what} after unloading.",
                                   error="memory_not_released")
            self.tick(op, f"Waiting for GPU memory to be released ({what})")
            await asyncio.sleep(MEMORY_POLL_S)

    # Endings ----------------------------------------------------------------------------------
    def _to_restore(self: Orchestrator, op: Operation) -> list[str]:
        """What this switch took away and is not back yet, in the order it went."""
        return [m for m in op.unloaded if self.models[m].status is not S.RUNNING]

    async def _abandon(self: Orchestrator, op: Operation) -> Event:
        """Cancelled or superseded: the half-loaded target goes; the victims come back in a rollback."""
        target = self.models[op.target or ""]
        if target.engine is not None and target.status in (S.LOADING, S.FAILED):
            if target.status is S.LOADING:
                self.transition(target, S.UNLOADING, "switch abandoned")
            await self.discard_engine(target)
            if target.status is S.UNLOADING:
                self.transition(target, S.STOPPED, "engine killed")
        if op.superseded_by is not None:
            name = self.models[op.superseded_by].spec.name if op.superseded_by in self.models else op.superseded_by
            return CancelledEvent(op.id, f"Superseded by a switch to {name}.", target.id, op.superseded_by)
        back = [self.models[m].spec.name for m in self._to_restore(op)] if op.restore else []
        message = "Switch cancelled" + (f"; restoring {', '.join(back)}." if back else ".")
        return CancelledEvent(op.id, message, target.id)

    async def _failed(self: Orchestrator, op: Operation, exc: SmartswitchError) -> Event:
        target = self.models[op.target or ""]
        if target.engine is not None:  # stalled, or never released: it is not coming back
            await self.discard_engine(target)
        if target.status is S.UNLOADING:
            self.transition(target, S.STOPPED, "switch failed")
        if target.status is not S.FAILED:
            self.transition(target, S.FAILED, "switch failed", error=exc.message)
        back = self._to_restore(op)
        details: dict[str, Any] = {"restoring": back, **exc.details}
        code = details.pop("error", exc.code)
        names = ", ".join(self.models[m].spec.name for m in back)
        message = exc.message.rstrip(". ") + "." + (f" Restoring {names}." if back else "")
        return ErrorEvent(op.id, code, message, target.id, details)

    async def abandoned_before_start(self: Orchestrator, op: Operation) -> None:
        """An operation cancelled before its body ran still ends: event, audit, and the slot freed."""
        if op.kind is OpKind.SWITCH:
            self.conclude(op, await self._abandon(op))
        elif op.kind is OpKind.ROLLBACK:
            self.conclude(op, CancelledEvent(op.id, "Rollback superseded.", op.target or "", op.superseded_by))
        else:
            self.audit(op.actor, op.kind, op.target, "superseded", {"by": op.superseded_by})

    def conclude(self: Orchestrator, op: Operation, outcome: Event) -> None:
        """The one ending of a switch or rollback: audit, remember, then the terminal event."""
        target = op.target or ""
        if isinstance(outcome, CompleteEvent) and op.kind is OpKind.SWITCH:
            self.models[target].last_used = time.time()
            self.active = target
            self.history.set(f"last_used:{op.actor}", target)
            self.last_switch_error = None
        elif isinstance(outcome, ErrorEvent) and op.kind is OpKind.SWITCH:
            self.last_switch_error = {"switch_id": op.id, "target_model": target, "error": outcome.error,
                                      "message": outcome.message, **outcome.details}
        result = {CompleteEvent: "success", ErrorEvent: "failed", CancelledEvent: "cancelled"}[type(outcome)]
        detail: dict[str, Any] = {"switch_id": op.id, "from": op.from_model, "total_time_seconds": op.elapsed()}
        if isinstance(outcome, ErrorEvent):
            detail.update(error=outcome.error, message=outcome.message)
        if isinstance(outcome, CompleteEvent):
            detail["status"] = outcome.status
        if op.kind is OpKind.ROLLBACK:
            detail["restoring"] = op.restoring
        self.audit(op.actor, op.kind, target, result, detail)
        log.info("%s %s by %s: %s in %.2f s%s", op.kind, target, op.actor, result, op.elapsed(),
                 f" ({outcome.message})" if isinstance(outcome, ErrorEvent | CancelledEvent) else "")
        op.concluded = True
        self.emit(outcome)
        if self.op is op and op.kind is OpKind.SWITCH:
            self.save_desired()
        self.changed()

    def _hand_over_to_rollback(self: Orchestrator, op: Operation, outcome: Event) -> None:
        """Give the slot straight to a rollback when this switch took something away and did not finish."""
        if isinstance(outcome, CompleteEvent) or not op.restore or self.closing or self.op is not op:
            if self.op is op:
                self.op = None
                self.save_desired()
            return
        back = self._to_restore(op)
        if not back:
            self.op = None
            self.save_desired()
            return
        target = self.models[op.target or ""].spec.name
        reason = "Cancelled" if isinstance(outcome, CancelledEvent) else f"Load of {target} failed"
        rollback = Operation(OpKind.ROLLBACK, back[0], op.actor, from_model=op.target, restoring=back,
                             restore_active=op.from_model, reason=reason)
        self.op = rollback
        self.save_rollback(rollback)
        rollback.task = asyncio.ensure_future(self._run(rollback, self._rollback_body))
        rollback.task.set_name(f"rollback-{rollback.id}")
        self.changed()

    def save_rollback(self: Orchestrator, rollback: Operation) -> None:
        """A rollback in flight is remembered like a switch: a restart finishes it."""
        self.history.set("rollback_in_progress", json.dumps({"restoring": rollback.restoring,
                                                              "active": rollback.restore_active}))

    async def _rollback_body(self: Orchestrator, op: Operation) -> None:
        names = ", ".join(self.models[m].spec.name for m in op.restoring)
        restored: list[str] = []
        skipped: dict[str, str] = {}
        outcome: Event
        try:
            self.stage(op, "rolling_back", f"{op.reason} — restoring {names}")
            for index, model_id in enumerate(op.restoring):
                op.step = (index, len(op.restoring))
                why = await self._restore_one(op, model_id)
                if why is None:
                    restored.append(model_id)
                else:
                    skipped[model_id] = why
                    log.warning("rollback: %s not restored: %s", model_id, why)
            wanted = op.restore_active
            if wanted is not None and self.models[wanted].status is S.RUNNING:
                self.active = wanted  # exactly the model in use before the switch, not the last one loaded
            if skipped:
                outcome = ErrorEvent(op.id, "rollback_incomplete", "Not restored: " + "; ".join(
                    f"{self.models[m].spec.name}: {why}" for m, why in skipped.items()), op.target or "",
                    {"restored": restored, "skipped": list(skipped)})
            else:
                outcome = CompleteEvent(op.id, "success", op.target or "", op.elapsed())
        except asyncio.CancelledError:
            for model_id in op.restoring:  # a model half-restored when superseded is abandoned
                state = self.models[model_id]
                if state.status is S.LOADING and state.engine is not None:
                    self.transition(state, S.UNLOADING, "rollback superseded")
                    await self.discard_engine(state)
                    self.transition(state, S.STOPPED, "engine killed")
            outcome = CancelledEvent(op.id, "Rollback ended early: " + (
                f"superseded by a switch to {op.superseded_by}." if op.superseded_by else "cancelled."),
                op.target or "", op.superseded_by)
        self.history.set("rollback_in_progress", None)
        self.conclude(op, outcome)
        self.save_desired()

    async def _restore_one(self: Orchestrator, op: Operation, model_id: str) -> str | None:
        """Bring one model back (wake a sleeper, else start it when it fits); the reason when not."""
        state = self.models[model_id]
        if state.status is S.RUNNING:
            return None
        op.target = op.loading = model_id
        op.progress = Progress(dict(self.expected(model_id)), time.monotonic(),
                               self.history.learned_milestones(model_id))
        try:
            if state.status is S.SLEEPING:
                await self.wake_engine(state, "rollback")
                return None
            if state.engine is not None:
                await self.discard_engine(state)
            await self.refresh_gpu()
            room = self.plan(model_id, allow_unload=False)  # a rollback never unloads anything
            if not room.feasible:
                if len(self.reading.by_device()) == 1:
                    return f"needs {state.required_gb:g} GB, {self.reading.free_gb:.1f} GB free"
                return room.reason
            op.progress.enter("starting", time.monotonic())
            await self.start_engine(state, op, "rollback", room.gpus)
            return None
        except EngineFailed as exc:
            return exc.message
