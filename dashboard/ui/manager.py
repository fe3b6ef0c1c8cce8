"""The model manager tab: every model with status, memory and last load, and its actions in its own row.

One table widget for all rows (cheap per session): each action is a column whose cell holds the action's
name where it applies to that row's model (Load for a stopped one, Unload and Sleep for a running one...)
and nothing where it does not; a click on a filled cell runs it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from dashboard.orchestrator.states import ModelStatus
from dashboard.ui.bokeh_update import update_bokeh
from dashboard.ui.kit import SERVED, Kit
from dashboard.ui.state import DashboardState
from dashboard.ui.theme import model_colour, status_label, time_axis

S = ModelStatus
ACTIONS = ("load", "unload", "sleep", "wake", "pin", "unpin")
ACTION_CSS = """
.tabulator-cell[tabulator-field^="act_"] { cursor: pointer; color: #3f51b5; font-weight: 600; }
.tabulator-cell[tabulator-field^="act_"]:hover { text-decoration: underline; }
.tabulator-cell[tabulator-field="status"] { font-weight: 500; }
"""


def actions_for(model: dict[str, Any]) -> tuple[str, ...]:
    """What a person can do with a model now (pure): what its row offers."""
    status = model["status"]
    offered: list[str] = []
    if status in (S.STOPPED, S.FAILED):
        offered.append("load")
    if status == S.RUNNING:
        offered += ["unload", "sleep"] if model.get("sleep_capable") else ["unload"]
    if status == S.SLEEPING:
        offered += ["wake", "unload"]
    offered.append("unpin" if model.get("pinned") else "pin")
    return tuple(offered)


def newest_load(loads: list[dict[str, Any]]) -> float | None:
    """When the newest load happened (the history comes newest first, capped in length)."""
    return loads[0]["at"] if loads else None


class ModelManager(pn.viewable.Viewer):
    state = param.ClassSelector(class_=DashboardState)
    shown = param.Boolean(default=False, doc="Its tab is open: only then is the table kept current.")

    def __init__(self, act: Callable[[str, str], Awaitable[None]],
                 load_history: Callable[[], list[dict[str, Any]]], kit: Kit = SERVED, **params: Any) -> None:
        super().__init__(**params)
        self.kit = kit
        self._act = act
        self._load_history = load_history
        loads = self._load_history()
        self._table = self._new_table(self._frame(loads))
        self._slot = pn.Column(self._table, sizing_mode="stretch_width", margin=0)
        self._message = kit.alert("manager-message", visible=False, sizing_mode="stretch_width")
        self._busy = False
        self._plotted = newest_load(loads)
        self._source = ColumnDataSource(self._points(loads))
        self._plot_pane = pn.pane.Bokeh(self._plot(), sizing_mode="stretch_width")
        self.state.param.watch(self._refresh, "models")
        self.param.watch(self._refresh, "shown")

    def _new_table(self, frame: pd.DataFrame) -> pn.widgets.Tabulator:
        table = pn.widgets.Tabulator(
            frame, disabled=True, show_index=False, selectable=False, sizing_mode="stretch_width",
            css_classes=["model-table"], hidden_columns=["id", "error"], layout="fit_data_stretch",
            titles={f"act_{a}": "" for a in ACTIONS}, stylesheets=[ACTION_CSS], theme="simple",
            configuration={"columnDefaults": {"headerSort": False, "tooltip": True}})
        table.on_click(self._clicked)
        return table

    def _frame(self, loads: list[dict[str, Any]]) -> pd.DataFrame:
        history: dict[str, float] = {}
        for row in loads:
            if row["outcome"] == "success":
                history.setdefault(row["model_id"], row["total_s"])
        rows = []
        for m in self.state.models:
            gb = m.get("gpu_memory_used_gb", m.get("gpu_memory_required_gb"))
            offered = actions_for(m)
            rows.append({
                "id": m["id"], "model": m["name"],
                # A failed model says why here too (the cell's tooltip shows it whole).
                "status": f"failed: {m['error']}" if m["status"] == S.FAILED and m.get("error")
                else status_label(m) or "stopped",
                "GPU memory": f"{gb:.1f} GB" if gb is not None else "",
                "size": f"{m['size_gb']:g} GB",
                "last load": f"{history[m['id']]:.1f} s" if m["id"] in history else "",
                "pinned": "pinned" if m["pinned"] else "",
                "error": m.get("error") or "",
                **{f"act_{a}": a.capitalize() if a in offered else "" for a in ACTIONS},
            })
        return pd.DataFrame(rows)

    def _refresh(self, event: param.parameterized.Event | None = None) -> None:
        # A hidden tab's table is not kept current. Opening the tab brings a new table, made with the data
        # of now: data sent to a table not drawn yet (the tab opened by the same message, as "Open model
        # manager" does) can be lost, a table's first data cannot.
        if not self.shown:
            return
        loads = self._load_history()
        frame = self._frame(loads)
        if event is not None and event.name == "shown":
            if not frame.equals(self._table.value):
                self._table = self._new_table(frame)
                self._slot.objects = [self._table]
        elif not frame.equals(self._table.value):
            self._table.value = frame
        newest = newest_load(loads)
        if newest != self._plotted:  # a data patch on a new load: far cheaper than a new figure
            self._plotted = newest
            points = self._points(loads)
            update_bokeh(self._source, lambda: setattr(self._source, "data", points))

    def _points(self, loads: list[dict[str, Any]]) -> dict[str, list[Any]]:
        rows = [r for r in loads if r["outcome"] == "success" and r["total_s"] > 0]
        ids = sorted(m["id"] for m in self.state.models)  # the same colours as the GPU gauge
        return {"at": [r["at"] * 1000 for r in rows], "seconds": [r["total_s"] for r in rows],
                "model": [self.state.name_of(r["model_id"]) for r in rows],
                "colour": [model_colour(ids, r["model_id"]) for r in rows]}

    def _plot(self) -> Any:
        plot = figure(height=220, sizing_mode="stretch_width", x_axis_type="datetime", toolbar_location=None,
                      title="Past load times (s)")
        plot.scatter("at", "seconds", size=8, color="colour", legend_field="model", source=self._source)
        time_axis(plot)
        plot.add_layout(plot.legend[0], "right")  # beside the data, never over it
        plot.legend.label_text_font_size = "10px"
        plot.legend.border_line_color = None
        return plot

    async def _clicked(self, event: Any) -> None:
        column = getattr(event, "column", "") or ""
        if not column.startswith("act_") or event.row is None:
            return
        row = self._table.value.iloc[event.row]
        action = column[4:]
        if not row[column] or self._busy:
            return
        await self.run(action, row["id"])

    async def run(self, action: str, model_id: str) -> None:
        """One action, with what came of it shown under the table."""
        self._busy = True
        name = self.state.name_of(model_id)
        self._show(f"{action.capitalize()} {name}...", "info")
        try:
            started = time.monotonic()
            await self._act(action, model_id)
            self._show(f"{action.capitalize()} {name}: done in {time.monotonic() - started:.1f} s.", "success")
        except Exception as exc:  # shown to the user, who can act on it
            self._show(f"{action.capitalize()} {name} failed: {getattr(exc, 'message', None) or exc}", "error")
        finally:
            self._busy = False

    def _show(self, text: str, severity: str) -> None:
        self.kit.set_alert(self._message, text, severity)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self._slot, self._message, self._plot_pane, sizing_mode="stretch_width")
