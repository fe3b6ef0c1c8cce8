"""Status colours and icons, shared by every view (one place to change the look)."""

from __future__ import annotations

STATUS_STYLE: dict[str, tuple[str, str]] = {
    "running": ("●", "#2e7d32"),
    "loading": ("◐", "#1565c0"),
    "unloading": ("◑", "#ef6c00"),
    "sleeping": ("☾", "#6d4c41"),
    "failed": ("✖", "#c62828"),
    "stopped": ("○", "#9e9e9e"),
}
BUTTON_TYPE = {"running": "success", "loading": "primary", "unloading": "warning", "sleeping": "light",
               "failed": "danger", "stopped": "default"}
MODEL_COLOURS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def status_label(model: dict) -> str:
    """The words beside a model: its status (and % while loading); a stopped model gets none."""
    status = model["status"]
    if status == "stopped":
        return ""
    if status == "loading":
        return f"loading {model.get('load_progress', 0)}%"
    return status


def model_colour(model_ids: list[str], model_id: str) -> str:
    return MODEL_COLOURS[model_ids.index(model_id) % len(MODEL_COLOURS)] if model_id in model_ids else "#999"


def format_bytes(n: int | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f} GB"
