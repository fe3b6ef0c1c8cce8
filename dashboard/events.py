"""Switch and state events: one set of frozen dataclasses, serialised in one place (dicts and SSE)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

STAGES = ("checking_memory", "unloading_models", "loading_target", "rolling_back")


@dataclass(frozen=True)
class StageEvent:
    kind: ClassVar[str] = "stage"
    switch_id: str
    stage: str
    message: str
    target_model: str
    from_model: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    kind: ClassVar[str] = "progress"
    switch_id: str
    stage: str
    progress: int
    eta_seconds: float | None
    message: str
    target_model: str
    phase: str = ""
    bytes_loaded: int | None = None
    bytes_total: int | None = None
    slow: bool = False


@dataclass(frozen=True)
class CompleteEvent:
    kind: ClassVar[str] = "complete"
    switch_id: str
    status: str  # success | already_loaded
    target_model: str
    total_time_seconds: float


@dataclass(frozen=True)
class ErrorEvent:
    kind: ClassVar[str] = "error"
    switch_id: str
    error: str
    message: str
    target_model: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CancelledEvent:
    kind: ClassVar[str] = "cancelled"
    switch_id: str
    message: str
    target_model: str
    superseded_by: str | None = None


@dataclass(frozen=True)
class StatusEvent:
    """The whole status snapshot after a state change (keeps every tab and notebook in sync)."""

    kind: ClassVar[str] = "status"
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class DroppedEvent:
    """The last event of a ``/v1/events`` subscriber that fell too far behind: reconnect to resume."""

    kind: ClassVar[str] = "dropped"
    message: str


Event = StageEvent | ProgressEvent | CompleteEvent | ErrorEvent | CancelledEvent | StatusEvent | DroppedEvent
SwitchEvent = StageEvent | ProgressEvent | CompleteEvent | ErrorEvent | CancelledEvent
TERMINAL = (CompleteEvent, ErrorEvent, CancelledEvent)
_BY_KIND: dict[str, type[Any]] = {cls.kind: cls for cls in
                                  (StageEvent, ProgressEvent, CompleteEvent, ErrorEvent, CancelledEvent,
                                   StatusEvent, DroppedEvent)}


def is_terminal(event: Event) -> bool:
    return isinstance(event, TERMINAL)


def to_dict(event: Event) -> dict[str, Any]:
    """The JSON body of an event; error events flatten their details as DESIGN.md shows."""
    if isinstance(event, StatusEvent):
        return event.snapshot
    data = asdict(event)
    if isinstance(event, ErrorEvent):
        data.update(data.pop("details"))
    return data


def to_sse(event: Event) -> str:
    return f"event: {event.kind}\ndata: {json.dumps(to_dict(event))}\n\n"


def from_sse(kind: str, data: str) -> Event:
    """Rebuild an event from an SSE frame (used by the HTTP client)."""
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ValueError(f"unknown event {kind!r}")
    payload = json.loads(data)
    if cls is StatusEvent:
        return StatusEvent(payload)
    if cls is ErrorEvent:
        base = {k: payload.pop(k) for k in ("switch_id", "error", "message", "target_model")}
        return ErrorEvent(**base, details=payload)
    return cls(**payload)
