"""The few components every view uses, for the two places a dashboard shows.

A served page uses Material UI (``panel-material-ui``): its page, buttons, alerts, tabs and chat, with its
icons and fonts served by this server. A notebook cell uses Panel's own widgets: on a GPU node with no
internet the output must carry its scripts inline, and a Material UI component inline carries its whole
1.7 MB bundle in every component's output. Views ask the kit, never the libraries, for these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import panel as pn
import panel_material_ui as pmui

SEVERITY_TO_ALERT = {"error": "danger", "warning": "warning", "info": "info", "success": "success"}
VARIANT_TO_STYLE = {"contained": "solid", "outlined": "outline", "text": "outline"}
COLOR_TO_TYPE = {"primary": "primary", "error": "danger", "default": "default"}


@dataclass(frozen=True)
class Kit:
    material: bool  # True in a served page; False inline in a notebook

    def button(self, label: str, css: str, *, variant: str = "contained", color: str = "primary",
               **params: Any) -> Any:
        if self.material:
            return pmui.Button(label=label, variant=variant, color=color, size="small", css_classes=[css],
                               **params)
        return pn.widgets.Button(name=label, button_type=COLOR_TO_TYPE.get(color, "default"),
                                 button_style=VARIANT_TO_STYLE[variant], css_classes=[css], **params)

    def relabel(self, button: Any, label: str) -> None:
        button.param.update(**{"label" if self.material else "name": label})

    def alert(self, css: str, *, object: Any = "", title: Any = None, severity: str = "info",
              **params: Any) -> Any:
        if self.material:
            return pmui.Alert(object=object, title=title, severity=severity, css_classes=[css], **params)
        return pn.pane.Alert(object, alert_type=SEVERITY_TO_ALERT[severity], css_classes=[css], **params)

    def set_alert(self, alert: Any, text: str, severity: str) -> None:
        if self.material:
            alert.param.update(object=text, severity=severity, visible=True)
        else:
            alert.param.update(object=text, alert_type=SEVERITY_TO_ALERT[severity], visible=True)

    def tabs(self, *tabs: tuple[str, Any], **params: Any) -> Any:
        return (pmui.Tabs if self.material else pn.Tabs)(*tabs, **params)

    def card(self, *objects: Any, css: str, **params: Any) -> Any:
        if self.material:
            return pmui.Paper(*objects, elevation=3, css_classes=[css], **params)
        return pn.Column(*objects, css_classes=[css], styles={"border": "1px solid #ffb74d", "border-radius": "8px",
                                                              "padding": "6px"}, **params)

    def chat(self, **params: Any) -> pn.chat.ChatInterface:
        if self.material:
            return pmui.ChatInterface(**params)
        # Panel's chat buttons draw icons from a web font on a CDN: inline there are none, the names say it.
        buttons = {name: False for name in ("show_stop", "show_rerun", "show_undo", "show_clear")}
        return pn.chat.ChatInterface(show_button_name=True, **{**buttons, **params})


SERVED = Kit(material=True)
INLINE = Kit(material=False)
