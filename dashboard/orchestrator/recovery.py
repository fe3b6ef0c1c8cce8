"""What a start finds: engines to adopt or clean up, intent to restore, a switch a crash interrupted.

A process is only ever signalled after the engine layer has confirmed it is ours (same start time and
this data dir's marker, or our container label): a bare pid from the database is never enough.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from dashboard.orchestrator.operations import Operation, OpKind
from dashboard.orchestrator.states import ModelStatus

if TYPE_CHECKING:
    from dashboard.orchestrator.machine import Orchestrator

log = logging.getLogger("smartswitch.orchestrator")
S = ModelStatus
LEGACY_SWITCH_KEY = "switch_in_progress"


class Recovery:
    """Mixed into ``Orchestrator``: reconcile with what is there toward what was asked for."""

    async def recover(self: Orchestrator) -> None:
        for model_id, gb in self.history.measured_memory().items():
            if model_id in self.models:
                self.models[model_id].measured_gb = gb
        desired = self.load_desired()
        pins = desired.get("pins") or {}
        self.pin_overrides = {m: bool(v) for m, v in pins.items() if m in self.models}
        await self._adopt_engines()
        if self.sweep is not None:
            adopted = {s.engine.ref for s in self.models.values() if s.engine is not None}
            for model_id in await asyncio.to_thread(self.sweep, adopted):
                self.audit("orchestrator", "adopt", model_id, "cleaned_up", {"reason": "no record of this engine"})
                log.warning("recovery: %s had an engine of this data dir with no record; stopped it", model_id)
        running = [s for s in self.models.values() if s.status is S.RUNNING]
        wanted = desired.get("active")
        if wanted in self.models and self.models[wanted].status is S.RUNNING:
            self.active = wanted
        elif running:
            self.active = max(running, key=lambda s: s.last_used).id
        await self._resume(desired.get("switch"), self.history.get("rollback_in_progress"))

    async def _adopt_engines(self: Orchestrator) -> None:
        for record in self.history.engines():
            state = self.models.get(record.model_id)
            if state is None or record.ref == "pending":
                self.history.forget_engine(record.model_id)  # a pending one is found by the sweep
                continue
            engine = self.engine_factory(state.spec, record.port, record.ref)
            if await engine.adopt():
                state.engine, state.last_used = engine, record.started_at
                asleep = state.spec.sleep and await engine.is_sleeping()
                self.transition(state, S.SLEEPING if asleep else S.RUNNING, "adopted after a restart")
                state.supervisor = self.spawn(self._supervise(state, engine), f"supervise-{state.id}")
                self.audit("orchestrator", "adopt", record.model_id, state.status.value,
                           {"runtime": record.runtime, "ref": record.ref})
                continue
            was_alive = engine.alive()  # identity-checked: a reused pid is not "alive" for us
            if was_alive:
                await engine.kill()  # it was still loading (or hung) when we went down
                self.transition(state, S.FAILED, "engine from before the restart was not serving",
                                error="Load interrupted by an orchestrator restart.")
            self.history.forget_engine(record.model_id)
            self.audit("orchestrator", "adopt", record.model_id, "cleaned_up" if was_alive else "gone",
                       {"ref": record.ref})

    async def _resume(self: Orchestrator, switch: dict[str, Any] | None, rollback_raw: str | None) -> None:
        """A switch cut by a crash completes (its target serves) or what it unloaded comes back."""
        legacy = self.history.get(LEGACY_SWITCH_KEY)
        if legacy:
            switch = switch or json.loads(legacy)
            self.history.set(LEGACY_SWITCH_KEY, None)
        back: list[str] = []
        active: str | None = None
        if isinstance(switch, dict) and switch.get("target") in self.models:
            target = switch["target"]
            if self.models[target].status is S.RUNNING:
                self.active = target
                self.audit(switch.get("actor", "unknown"), "switch", target, "success",
                           {"switch_id": switch.get("id"), "resumed_after_restart": True})
            else:
                message = "Interrupted: the orchestrator stopped in the middle of this switch."
                self.audit(switch.get("actor", "unknown"), "switch", target, "failed",
                           {"switch_id": switch.get("id"), "error": "interrupted", "message": message})
                self.last_switch_error = {"switch_id": switch.get("id"), "target_model": target,
                                          "error": "interrupted", "message": message}
                back = [m for m in switch.get("unloaded", []) if m in self.models]
                active = switch.get("from")
        if rollback_raw:
            pending = json.loads(rollback_raw)
            back += [m for m in pending.get("restoring", []) if m in self.models and m not in back]
            active = active or pending.get("active")
            self.history.set("rollback_in_progress", None)
        back = [m for m in back if self.models[m].status is not S.RUNNING]
        self.save_desired()
        if back:
            log.info("recovery: restoring %s after an interrupted switch", ", ".join(back))
            op = Operation(OpKind.ROLLBACK, back[0], "orchestrator", restoring=back,
                           restore_active=active if active in self.models else None,
                           reason="Interrupted by a restart")
            await self.begin(op, self._rollback_body)
