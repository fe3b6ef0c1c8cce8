"""Events survive the trip through SSE text unchanged (the client rebuilds the server's events)."""

from dashboard.client import parse_sse
from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    DroppedEvent,
    ErrorEvent,
    ProgressEvent,
    StageEvent,
    StatusEvent,
    from_sse,
    to_dict,
    to_sse,
)

EVENTS = [
    StageEvent("s1", "checking_memory", "Checking", "m", None),
    ProgressEvent("s1", "loading_target", 42, 12.5, "Loading weights", "m", "loading_weights", 10, 20),
    CompleteEvent("s1", "success", "m", 3.2),
    ErrorEvent("s1", "insufficient_memory", "Cannot free", "m", {"required_gb": 84, "available_gb": 11.9}),
    CancelledEvent("s1", "Cancelled", "m", "other"),
    StatusEvent({"models": {}, "active_model": None}),
    DroppedEvent("This subscriber fell behind and was dropped; reconnect to resume."),
]


def test_events_round_trip_through_sse() -> None:
    text = "".join(to_sse(e) for e in EVENTS) + ": keep-alive\n\n"
    frames = list(parse_sse(text.split("\n")))
    assert [from_sse(kind, data) for kind, data in frames] == EVENTS


def test_error_event_flattens_figures_like_the_contract() -> None:
    data = to_dict(EVENTS[3])
    assert data["error"] == "insufficient_memory" and data["required_gb"] == 84

