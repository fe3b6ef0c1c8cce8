"""The model selector: every model with size, status colour and icon; picking one switches to it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import panel as pn
import param

from dashboard.orchestrator.states import ModelStatus
from dashboard.ui.state import DashboardState
from dashboard.ui.theme import BUTTON_TYPE, STATUS_STYLE, status_label

CSS = """
:host { width: 100%; }
.bk-btn { text-align: left; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
"""


class ModelSelector(pn.viewable.Viewer):
    """One button per model, grouped by status; widgets are kept and updated, never rebuilt."""

    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, on_pick: Callable[[str], Awaitable[None]], **params: Any) -> None:
        super().__init__(**params)
        self._on_pick = on_pick
        self._buttons: dict[str, pn.widgets.Button] = {}
        self._column = pn.Column(sizing_mode="stretch_width", margin=0)
        self.state.param.watch(self._render, ["models", "selected_model"])
        self._render()

    def _button(self, model_id: str) -> pn.widgets.Button:
        if model_id not in self._buttons:
            button = pn.widgets.Button(sizing_mode="stretch_width", stylesheets=[CSS], margin=(2, 0))

            async def pick(_: Any, model_id: str = model_id) -> None:
                await self._on_pick(model_id)

            button.on_click(pick)
            self._buttons[model_id] = button
        return self._buttons[model_id]

    def _render(self, *_: Any) -> None:
        ordered = []
        for model in self.state.models:
            icon, _colour = STATUS_STYLE.get(model["status"], ("?", "#999"))
            label = status_label(model)
            selected = "▸ " if model["id"] == self.state.selected_model else ""
            button = self._button(model["id"])
            button.param.update(
                name=f"{selected}{icon} {model['name']} · {model['size_gb']:g} GB"
                     + (f" · {label}" if label else ""),
                button_type=BUTTON_TYPE.get(model["status"], "default"),
                button_style="solid" if model["status"] != ModelStatus.STOPPED else "outline",
                css_classes=["model-option", f"status-{model['status']}"],
            )
            ordered.append(button)
        if [id(o) for o in self._column.objects] != [id(b) for b in ordered]:
            self._column.objects = ordered

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(pn.pane.Markdown("#### Models", margin=(0, 5)), self._column,
                         sizing_mode="stretch_width")
