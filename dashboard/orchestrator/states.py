"""Model status as a type, and the table of the transitions the orchestrator may make.

The vocabulary is used everywhere (API, UI, CLI, OpenAPI document): nothing else spells these strings.
The table is drawn in ``docs/state-machine.md``; the two must agree (a unit test reads both).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum

from dashboard.config import ModelSpec
from dashboard.engines.base import Engine
from dashboard.orchestrator.planner import SLEEP_RESIDUAL


class ModelStatus(StrEnum):
    """Where one model is, as every client sees it."""

    STOPPED = "stopped"  # no engine, no memory
    LOADING = "loading"  # an engine is starting (cold start or waking from sleep)
    RUNNING = "running"  # serving requests
    SLEEPING = "sleeping"  # weights in host RAM; the engine keeps a small GPU residual
    UNLOADING = "unloading"  # draining, then stopping its engine
    FAILED = "failed"  # the last load or the engine failed; the reason is kept

    @property
    def holds_memory(self) -> bool:
        """Statuses whose engine (if any) is counted on the GPU."""
        return self in (ModelStatus.LOADING, ModelStatus.RUNNING, ModelStatus.SLEEPING, ModelStatus.UNLOADING)


S = ModelStatus

# new status -> the statuses it may be reached from, with who causes it.
TRANSITIONS: dict[ModelStatus, dict[ModelStatus, str]] = {
    S.LOADING: {
        S.STOPPED: "switch, load, rollback: an engine is started",
        S.FAILED: "switch, load, rollback: a failed model is started again",
        S.SLEEPING: "switch, wake, rollback: the engine is woken",
    },
    S.RUNNING: {
        S.LOADING: "engine: ready (health 200 and /v1/models, or awake and a 1-token probe answered)",
        S.STOPPED: "recovery: an engine from before a restart is adopted",
        S.SLEEPING: "engine: found awake by the health poller (woken outside smartswitch)",
    },
    S.SLEEPING: {
        S.RUNNING: "switch (planned victim), sleep: drained, then level-1 sleep; engine: found asleep by the "
                   "health poller (put to sleep outside smartswitch)",
        S.STOPPED: "recovery: an engine from before a restart is adopted asleep",
    },
    S.UNLOADING: {
        S.RUNNING: "switch (planned victim), unload, shutdown: drained, then stopped",
        S.SLEEPING: "switch (planned victim), unload, shutdown",
        S.LOADING: "cancel, supersede, shutdown: the load is abandoned",
        S.FAILED: "switch, unload, load: a failed engine still holding memory is cleaned up",
    },
    S.STOPPED: {
        S.UNLOADING: "engine: its process (group) is gone",
        S.FAILED: "unload: the failure is acknowledged",
    },
    S.FAILED: {
        S.LOADING: "engine: exited, stalled or reported a fatal error while loading",
        S.RUNNING: "engine: exited or stopped answering while serving",
        S.SLEEPING: "engine: exited while asleep, or did not wake",
        S.STOPPED: "recovery: an engine from before a restart was still loading and was cleaned up",
    },
}


class InvalidTransition(RuntimeError):
    """A transition the table does not allow: a bug in the orchestrator, never a user error."""


def check_transition(model_id: str, old: ModelStatus, new: ModelStatus) -> None:
    if old != new and old not in TRANSITIONS[new]:
        raise InvalidTransition(f"{model_id}: {old} -> {new} is not a transition of the state machine")


@dataclass(eq=False)
class ModelState:
    """One model as the orchestrator holds it: its status (changed only by ``Orchestrator.transition``),
    its engine and what the engine told us."""

    spec: ModelSpec
    status: ModelStatus = ModelStatus.STOPPED
    health: str = "unknown"
    engine: Engine | None = None
    supervisor: asyncio.Task[None] | None = None
    stopping: bool = False  # its engine is being stopped on purpose: an exit is expected
    ready: asyncio.Future[None] | None = None
    error: str | None = None
    fatal_lines: list[str] = field(default_factory=list)
    signal_gb: dict[str, float] = field(default_factory=dict)
    measured_gb: float | None = None
    last_used: float = 0.0
    placement: tuple[int, ...] = ()  # the device set its engine was started on (set with the engine)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def devices(self) -> tuple[int, ...]:
        """The devices it occupies now: its placement while it has an engine, none once that is gone."""
        return self.placement if self.engine is not None else ()

    @property
    def required_gb(self) -> float:
        return self.measured_gb or self.spec.gpu_memory_gb

    @property
    def declared_gb(self) -> float:
        """What its engine holds on the GPU now (a sleeper keeps a residual)."""
        if self.engine is None:
            return 0.0
        if self.status is ModelStatus.SLEEPING:
            return round(self.required_gb * SLEEP_RESIDUAL, 2)
        return self.required_gb
