"""Operations and the rules of the one operation slot: what may replace what, what is refused.

Every mutating request becomes an ``Operation``; the orchestrator holds at most one at a time. A new
operation either supersedes the running one (``SUPERSEDES``) or is refused with a 409 naming it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from dashboard.events import ProgressEvent
from dashboard.orchestrator.progress import Progress


class OpKind(StrEnum):
    SWITCH = "switch"
    ROLLBACK = "rollback"
    LOAD = "load"
    UNLOAD = "unload"
    SLEEP = "sleep"
    WAKE = "wake"
    PIN = "pin"
    UNPIN = "unpin"
    SHUTDOWN = "shutdown"
    PREWARM = "prewarm"  # the orchestrator's own load of the model most likely asked next (``prewarm.py``)


# The running operations a new one replaces (a person's switch wins over a switch, a load started from
# the model manager and a rollback: all three only bring a model up, and the new plan starts from
# what is loaded when it begins). Everything else that collides is refused.
# A pre-warm gives way to anything a person asks, at once: it only ever uses room nobody asked for.
SUPERSEDES: dict[OpKind, frozenset[OpKind]] = {
    OpKind.SWITCH: frozenset({OpKind.SWITCH, OpKind.ROLLBACK, OpKind.LOAD, OpKind.PREWARM}),
    OpKind.SHUTDOWN: frozenset(OpKind),
    **{kind: frozenset({OpKind.PREWARM}) for kind in (OpKind.ROLLBACK, OpKind.LOAD, OpKind.UNLOAD, OpKind.SLEEP,
                                                       OpKind.WAKE, OpKind.PIN, OpKind.UNPIN)},
}
# Operations that a cancel request ends (the others take a second or two and cannot be undone halfway).
CANCELLABLE = frozenset({OpKind.SWITCH, OpKind.ROLLBACK, OpKind.LOAD})
# Operations shown as a banner with progress (``switch`` in the status, events on the stream).
WITH_PROGRESS = frozenset({OpKind.SWITCH, OpKind.ROLLBACK})

VERB = {OpKind.SWITCH: "A switch to", OpKind.ROLLBACK: "Restoring", OpKind.LOAD: "Loading",
        OpKind.UNLOAD: "Unloading", OpKind.SLEEP: "Putting to sleep", OpKind.WAKE: "Waking",
        OpKind.PIN: "Pinning", OpKind.UNPIN: "Unpinning", OpKind.SHUTDOWN: "Shutting down",
        OpKind.PREWARM: "Pre-warming"}


def supersedes(new: OpKind, running: OpKind) -> bool:
    return running in SUPERSEDES.get(new, frozenset())


@dataclass(eq=False)
class Operation:
    """One mutating request while it holds the slot (a switch's run carries its progress too)."""

    kind: OpKind
    target: str | None
    actor: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    from_model: str | None = None
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    task: asyncio.Task[object] | None = None
    stage: str = "checking_memory"
    progress: Progress | None = None
    last: ProgressEvent | None = None
    unloaded: list[str] = field(default_factory=list)  # victims of a switch, in the order they went
    restore: bool = True  # a failed or cancelled switch brings back what it unloaded
    superseded_by: str | None = None
    cancelling: bool = False
    concluded: bool = False
    # A rollback: what it brings back, which switch it ends, and how far it got.
    restoring: list[str] = field(default_factory=list)
    restore_active: str | None = None
    reason: str = ""
    loading: str | None = None  # the model whose engine signals feed ``progress`` now
    step: tuple[int, int] = (0, 0)

    @property
    def running(self) -> bool:
        return not self.concluded

    def describe(self, name_of: dict[str, str]) -> str:
        what = ", ".join(name_of.get(m, m) for m in self.restoring) if self.kind is OpKind.ROLLBACK \
            else name_of.get(self.target or "", self.target or "")
        return f"{VERB[self.kind]} {what}".strip()

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)
