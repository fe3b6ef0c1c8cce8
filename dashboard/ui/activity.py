"""The activity view: the audit log (who did what, when, and how it ended), newest first."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pandas as pd
import panel as pn
import param

from dashboard.ui.state import DashboardState


class ActivityLog(pn.viewable.Viewer):
    state = param.ClassSelector(class_=DashboardState)
    shown = param.Boolean(default=False, doc="Its tab is open: only then is the log kept current.")

    def __init__(self, audit_log: Callable[[], list[dict[str, Any]]], **params: Any) -> None:
        super().__init__(**params)
        self._audit_log = audit_log
        self._table = pn.widgets.Tabulator(self._frame(), disabled=True, show_index=False, height=420,
                                           sizing_mode="stretch_width", css_classes=["activity"], theme="simple",
                                           layout="fit_data_stretch", pagination=None,
                                           configuration={"columnDefaults": {"tooltip": True}})
        # Every operation changes the state; refreshing on change keeps the log current without polling it.
        self.state.param.watch(self._refresh, ["switching", "models"])
        self.param.watch(self._refresh, "shown")

    def _frame(self) -> pd.DataFrame:
        return pd.DataFrame([{
            "when": dt.datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S"),
            "who": e["actor"], "action": e["action"], "model": e["target"], "outcome": e["outcome"],
            "detail": e["detail"].get("message") or e["detail"].get("error") or "",
        } for e in self._audit_log()], columns=["when", "who", "action", "model", "outcome", "detail"])

    def _refresh(self, *_: Any) -> None:
        if not self.shown:  # read when its tab opens, not on every change while nobody looks
            return
        frame = self._frame()
        if not frame.equals(self._table.value):
            self._table.value = frame

    def __panel__(self) -> pn.viewable.Viewable:
        return self._table
