"""The model manager tab: every model with status, memory and last load; load/unload/sleep/pin actions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource
from bokeh.plotting import figure

from dashboard.ui.bokeh_update import update_bokeh
from dashboard.ui.state import DashboardState
from dashboard.ui.theme import model_colour, status_label

ACTIONS = ("load", "unload", "sleep", "wake", "pin", "unpin")


def newest_load(loads: list[dict[str, Any]]) -> float | None:
    """When the newest load happened (the history comes newest first, capped in length)."""
    return loads[0]["at"] if loads else None


class ModelManager(pn.viewable.Viewer):
    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, act: Callable[[str, str], Awaitable[None]],
                 load_history: Callable[[], list[dict[str, Any]]], **params: Any) -> None:
        super().__init__(**params)
        self._act = act
        self._load_history = load_history
        self._table = pn.widgets.Tabulator(self._frame(), disabled=True, show_index=False, selectable=1,
                                           sizing_mode="stretch_width", height=260, css_classes=["model-table"])
        self._message = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self._buttons = []
        for action in ACTIONS:
            button = pn.widgets.Button(name=action.capitalize(), css_classes=[f"action-{action}"], width=80)

            async def run(_: Any, action: str = action) -> None:
                await self._run(action)

            button.on_click(run)
            self._buttons.append(button)
        loads = self._load_history()
        self._plotted = newest_load(loads)
        self._source = ColumnDataSource(self._points(loads))
        self._plot_pane = pn.pane.Bokeh(self._plot(), sizing_mode="stretch_width")
        self.state.param.watch(self._refresh, "models")

    def _frame(self, loads: list[dict[str, Any]] | None = None) -> pd.DataFrame:
        history = {}
        for row in loads if loads is not None else self._load_history():
            if row["outcome"] == "success":
                history.setdefault(row["model_id"], row["total_s"])
        return pd.DataFrame([{
            "id": m["id"], "model": m["name"], "status": status_label(m),
            "GPU GB": m.get("gpu_memory_used_gb", m.get("gpu_memory_required_gb")),
            "size GB": m["size_gb"], "last load s": round(history[m["id"]], 1) if m["id"] in history else None,
            "pinned": m["pinned"], "sleep": m["sleep_capable"],
        } for m in self.state.models])

    def _refresh(self, *_: Any) -> None:
        loads = self._load_history()
        frame = self._frame(loads)
        if not frame.equals(self._table.value):
            selection = self._table.selection
            self._table.value = frame
            self._table.selection = selection
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
        plot.legend.location = "top_left"
        plot.legend.label_text_font_size = "10px"
        return plot

    async def _run(self, action: str) -> None:
        if not self._table.selection:
            self._show("Select a model in the table first.", "warning")
            return
        model_id = self._table.value.iloc[self._table.selection[0]]["id"]
        for button in self._buttons:
            button.disabled = True
        try:
            started = time.monotonic()
            await self._act(action, model_id)
            self._show(f"{action.capitalize()} {self.state.name_of(model_id)}: done in "
                       f"{time.monotonic() - started:.1f} s.", "success")
        except Exception as exc:  # shown to the user, who can act on it
            self._show(f"{action.capitalize()} {self.state.name_of(model_id)} failed: {exc}", "danger")
        finally:
            for button in self._buttons:
                button.disabled = False
            await asyncio.sleep(0)

    def _show(self, text: str, kind: str) -> None:
        self._message.param.update(object=text, alert_type=kind, visible=True)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self._table, pn.Row(*self._buttons), self._message, self._plot_pane,
                         sizing_mode="stretch_width")
