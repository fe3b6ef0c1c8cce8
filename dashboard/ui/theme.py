"""Status colours and icons, shared by every view (one place to change the look)."""

from __future__ import annotations

from typing import Any

from dashboard.orchestrator.states import ModelStatus

S = ModelStatus

# Keyed by the enum; a status string from a snapshot finds its entry too (ModelStatus is a StrEnum).
STATUS_STYLE: dict[ModelStatus, tuple[str, str]] = {
    S.RUNNING: ("●", "#2e7d32"),
    S.LOADING: ("◐", "#1565c0"),
    S.UNLOADING: ("◑", "#ef6c00"),
    S.SLEEPING: ("☾", "#6d4c41"),
    S.FAILED: ("✖", "#c62828"),
    S.STOPPED: ("○", "#9e9e9e"),
}
BUTTON_TYPE: dict[ModelStatus, str] = {S.RUNNING: "success", S.LOADING: "primary", S.UNLOADING: "warning",
                                       S.SLEEPING: "light", S.FAILED: "danger", S.STOPPED: "default"}
MODEL_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def status_label(model: dict[str, Any]) -> str:
    """The words beside a model: its status (and % while loading); a stopped model gets none."""
    status = model["status"]
    if status == S.STOPPED:
        return ""
    if status == S.LOADING:
        return f"{S.LOADING} {model.get('load_progress', 0)}%"
    return str(status)


def model_colour(model_ids: list[str], model_id: str) -> str:
    return MODEL_COLOURS[model_ids.index(model_id) % len(MODEL_COLOURS)] if model_id in model_ids else "#999"


def format_bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f} GB"
