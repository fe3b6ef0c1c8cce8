"""Model manager actions: load, unload, sleep, wake, pin.

Each action takes the operation slot: while another operation runs it is refused with a 409 that
names it (a person's switch may supersede a load; the load then answers that it was superseded).
A model is drained before it is stopped or put to sleep (``traffic``: the chat requests' gate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dashboard.errors import Conflict, EngineFailed, InsufficientMemory, ModelNotRunning, SmartswitchError
from dashboard.orchestrator.operations import Operation, OpKind
from dashboard.orchestrator.states import ModelState, ModelStatus
from dashboard.orchestrator.traffic import TrafficControl

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
S = ModelStatus


class Superseded(Conflict):
    code = "superseded"


class ModelManager(TrafficControl):
    """Mixed into ``Orchestrator``: one model at a time, on a person's request."""

    async def _manage(self: Orchestrator, kind: OpKind, model_id: str, actor: str,
                      body: Callable[[ModelState], Awaitable[str]]) -> None:
        """Run ``body`` in the slot; audit its outcome whatever it is; a supersede answers 409."""
        state = self.check_model(model_id)
        op = Operation(kind, model_id, actor)

        async def run(_: Operation) -> None:
            try:
                outcome = await body(state)
            except asyncio.CancelledError:
                if state.status is S.LOADING and state.engine is not None:
                    self.transition(state, S.UNLOADING, f"{kind} superseded")
                    await self.discard_engine(state)
                    self.transition(state, S.STOPPED, "engine killed")
                self.audit(actor, kind, model_id, "superseded", {"by": op.superseded_by})
                log.info("%s %s by %s: superseded in %.2f s", kind, model_id, actor, op.elapsed())
                name = self.models[op.superseded_by].spec.name if op.superseded_by in self.models else "another"
                raise Superseded(f"{VERB_ING[kind]} {state.spec.name} was superseded by a switch to {name}.",
                                 target_model=op.superseded_by) from None
            except SmartswitchError as exc:
                self.audit(actor, kind, model_id, "failed", {"error": exc.code, "message": exc.message})
                log.info("%s %s by %s: failed in %.2f s (%s)", kind, model_id, actor, op.elapsed(), exc.message)
                raise
            self.audit(actor, kind, model_id, outcome)
            log.info("%s %s by %s: %s in %.2f s", kind, model_id, actor, outcome, op.elapsed())

        await self.begin(op, run)
        task = op.task
        assert task is not None
        await asyncio.wait({task})  # the caller going away does not stop the operation
        if task.cancelled():  # superseded before its first step
            raise Superseded(f"{VERB_ING[kind]} {state.spec.name} was superseded.", target_model=op.superseded_by)
        task.result()

    async def load(self: Orchestrator, model_id: str, actor: str) -> None:
        async def body(state: ModelState) -> str:
            if state.status in (S.RUNNING, S.LOADING):
                return "already_loaded"
            if state.status is S.SLEEPING:
                await self.wake_engine(state, "load")
                return "success"
            if state.engine is not None:
                await self.discard_engine(state)
            await self.refresh_gpu()
            the_plan = self.plan(state.id)
            if the_plan.unload or not the_plan.feasible:
                raise InsufficientMemory(
                    f"{state.spec.name} needs {the_plan.required_gb:g} GB and {the_plan.free_gb_before:.1f} GB "
                    "are free: unload a model first, or switch to it.", **the_plan.as_dict())
            await self.start_engine(state, None, "load")
            await self.refresh_gpu()
            self.changed()
            return "success"
        await self._manage(OpKind.LOAD, model_id, actor, body)

    async def unload(self: Orchestrator, model_id: str, actor: str) -> None:
        async def body(state: ModelState) -> str:
            if state.engine is None and state.status is not S.FAILED:
                return "not_loaded"
            if state.engine is not None:
                await self.stop_engine(state, "unload")
            if state.status is S.FAILED:
                self.transition(state, S.STOPPED, "unload")
            return "success"
        await self._manage(OpKind.UNLOAD, model_id, actor, body)

    async def sleep(self: Orchestrator, model_id: str, actor: str) -> None:
        async def body(state: ModelState) -> str:
            if not state.spec.sleep:
                raise Conflict(f"{state.spec.name} is not sleep-capable (set sleep = true in the catalog).")
            if state.status is not S.RUNNING or state.engine is None:
                raise ModelNotRunning(f"{state.spec.name} is {state.status}; only a running model can sleep.")
            await self.sleep_engine(state, "sleep")
            return "success"
        await self._manage(OpKind.SLEEP, model_id, actor, body)

    async def wake(self: Orchestrator, model_id: str, actor: str) -> None:
        async def body(state: ModelState) -> str:
            if state.status is not S.SLEEPING:
                raise ModelNotRunning(f"{state.spec.name} is {state.status}, not sleeping.")
            await self.wake_engine(state, "wake")
            return "success"
        await self._manage(OpKind.WAKE, model_id, actor, body)

    async def set_pinned(self: Orchestrator, model_id: str, pinned: bool, actor: str) -> None:
        self.check_model(model_id)
        kind = OpKind.PIN if pinned else OpKind.UNPIN
        await self.check_slot(Operation(kind, model_id, actor))
        self.pin_overrides[model_id] = pinned
        self.save_desired()  # operator intent outlives the process
        self.audit(actor, kind, model_id, "success")
        log.info("%s %s by %s: success", kind, model_id, actor)
        self.changed()

    # Sleep and wake (the engine speaks the protocol; here: drain, status, memory) -------------
    async def sleep_engine(self: Orchestrator, state: ModelState, cause: str) -> None:
        """Level-1 sleep (weights to host RAM), once drained: sleeping with requests in flight has crashed
        engines. An engine that exited meanwhile is left to supervision (it is failed, its memory free)."""
        try:
            await self.drain(state, cause, to_sleep=True)
            if state.engine is None:
                return
            # Shielded, and waited for when cancelled: the engine goes to sleep once asked, and a rollback must
            # find it sleeping (to wake it), not serving in our eyes while it sleeps.
            sleeping = asyncio.ensure_future(state.engine.sleep(1))
            try:
                await asyncio.shield(sleeping)
            finally:
                if not sleeping.done():
                    await asyncio.wait({sleeping})
                if not sleeping.cancelled() and sleeping.exception() is None:
                    self.transition(state, S.SLEEPING, cause)
        finally:
            self.end_drain([state.id])
        await self.refresh_gpu()
        self.changed()

    async def wake_engine(self: Orchestrator, state: ModelState, cause: str) -> None:
        """Wake, then prove readiness (the engine checks /is_sleeping and answers a one-token probe)."""
        if state.engine is None:
            raise ModelNotRunning(f"{state.spec.name} has no engine to wake.")
        self.transition(state, S.LOADING, cause)
        try:
            await state.engine.wake()
        except EngineFailed as exc:
            self.transition(state, S.FAILED, "did not wake", error=exc.message)
            raise
        state.last_used = time.time()
        self.transition(state, S.RUNNING, "awake")
        if self.active is None:
            self.active = state.id
        await self.refresh_gpu()
        self.changed()


VERB_ING: dict[OpKind, str] = {OpKind.LOAD: "Loading", OpKind.UNLOAD: "Unloading", OpKind.SLEEP: "Putting to sleep",
                               OpKind.WAKE: "Waking"}
