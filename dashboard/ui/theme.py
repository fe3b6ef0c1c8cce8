"""Status colours and icons, shared by every view (one place to change the look)."""

from __future__ import annotations

from typing import Any

from bokeh.models import DatetimeTickFormatter

from dashboard.orchestrator.states import ModelStatus

S = ModelStatus

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


def time_axis(plot: Any) -> None:
    """HH:MM:SS ticks, few of them, no minor ticks: a time axis people read at a glance."""
    clock = "%H:%M:%S"
    plot.xaxis.formatter = DatetimeTickFormatter(microseconds=clock, milliseconds=clock, seconds=clock,
                                                 minsec=clock, minutes="%H:%M", hourmin="%H:%M", hours="%H:%M",
                                                 days="%d %b", months="%b %Y", years="%Y")
    plot.xaxis.ticker.desired_num_ticks = 4
    for axis in (plot.xaxis, plot.yaxis):
        axis.minor_tick_line_color = None
        axis.major_label_text_font_size = "10px"
    plot.outline_line_color = None
    plot.xgrid.grid_line_color = None
