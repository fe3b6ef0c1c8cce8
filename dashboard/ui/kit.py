"""The few components every view uses, for the two places a dashboard shows.

A served page uses Material UI (``panel-material-ui``): its page, buttons, alerts, tabs and chat, with its
icons and fonts served by this server. A notebook cell uses Panel's own widgets: on a GPU node with no
internet the output must carry its scripts inline, and a Material UI component inline carries its whole
1.7 MB bundle in every component's output. Views ask the kit, never the libraries, for these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import panel as pn
import panel_material_ui as pmui
from panel.io.resources import DIST_DIR

SEVERITY_TO_ALERT = {"error": "danger", "warning": "warning", "info": "info", "success": "success"}
VARIANT_TO_STYLE = {"contained": "solid", "outlined": "outline", "text": "outline"}
COLOR_TO_TYPE = {"primary": "primary", "error": "danger", "default": "default"}


def _svg(*paths: str) -> str:
    """A Tabler outline icon drawn from its paths: Panel names its icons from a web font on a CDN."""
    return ("<svg xmlns='http://www.w3.org/2000/svg' width='24' height='24' viewBox='0 0 24 24' fill='none' "
            "stroke='currentColor' stroke-width='2' stroke-linecap='round' stroke-linejoin='round'>"
            + "".join(f"<path d='{d}'/>" for d in paths) + "</svg>")


SEND_ICON = _svg("M10 14l11 -11", "M21 3l-6.5 18a.55 .55 0 0 1 -1 0l-3.5 -7l-7 -3.5a.55 .55 0 0 1 0 -1l18 -6.5")
EDIT_ICON = _svg("M7 7h-1a2 2 0 0 0 -2 2v9a2 2 0 0 0 2 2h9a2 2 0 0 0 2 -2v-1",
                 "M20.385 6.585a2.1 2.1 0 0 0 -2.97 -2.97l-8.415 8.385v3h3l8.385 -8.415z", "M16 5l3 3")
CLOSE_ICON = _svg("M18 6l-12 12", "M6 6l12 12")
# The chat's buttons, hidden ones included: a hidden button's icon is drawn (and its font fetched) all the same.
CHAT_BUTTON_ICONS = {
    "send": SEND_ICON,
    "stop": _svg("M5 7a2 2 0 0 1 2 -2h10a2 2 0 0 1 2 2v10a2 2 0 0 1 -2 2h-10a2 2 0 0 1 -2 -2z"),
    "rerun": _svg("M4 12v-3a3 3 0 0 1 3 -3h13m-3 -3l3 3l-3 3", "M20 12v3a3 3 0 0 1 -3 3h-13m3 3l-3 -3l3 -3"),
    "undo": _svg("M9 11l-4 4l4 4m-4 -4h11a4 4 0 0 0 0 -8h-1"),
    "clear": _svg("M4 7l16 0", "M10 11l0 6", "M14 11l0 6", "M5 7l1 12a2 2 0 0 0 2 2h8a2 2 0 0 0 2 -2l1 -12",
                  "M9 7v-3a1 1 0 0 1 1 -1h4a1 1 0 0 1 1 1v3"),
}


def _chat_interface_css() -> str:
    """Panel's chat stylesheet with the feed's sheet it imports: inlined, the import's relative address would
    resolve against the notebook's own page."""
    css = DIST_DIR / "css"
    own = (css / "chat_interface.css").read_text(encoding="utf-8")
    return (css / "chat_feed.css").read_text(encoding="utf-8") + own.replace("@import url('chat_feed.css');", "")


class InlineChatMessage(pn.chat.ChatMessage):
    """Panel's chat message with its icons drawn inline (no reactions: the dashboard has none)."""

    def __init__(self, object: Any = None, **params: Any) -> None:
        params.setdefault("reaction_icons", {})
        params.setdefault("show_reaction_icons", False)
        super().__init__(object, **params)
        self.edit_icon.param.update(icon=EDIT_ICON, active_icon=CLOSE_ICON)


class InlineChatInterface(pn.chat.ChatInterface):
    """Panel's chat for a notebook cell, every sheet and icon inline."""

    _message_type: ClassVar[type[pn.chat.ChatMessage]] = InlineChatMessage
    _stylesheets: ClassVar[list[str]] = [_chat_interface_css()]

    def __init__(self, *objects: Any, **params: Any) -> None:
        params.setdefault("button_properties", {name: {"icon": icon} for name, icon in CHAT_BUTTON_ICONS.items()})
        super().__init__(*objects, **params)


@dataclass(frozen=True)
class Kit:
    material: bool  # True in a served page; False inline in a notebook

    def button(self, label: str, css: str, *, variant: str = "contained", color: str = "primary",
               **params: Any) -> Any:
        if self.material:
            return pmui.Button(label=label, variant=variant, color=color, size="small", css_classes=[css],
                               **params)
        return pn.widgets.Button(label=label, color=COLOR_TO_TYPE.get(color, "default"),
                                 variant=VARIANT_TO_STYLE[variant], css_classes=[css], **params)

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
        buttons = {name: False for name in ("show_stop", "show_rerun", "show_undo", "show_clear")}
        return InlineChatInterface(show_button_name=True, **{**buttons, **params})

    def message(self, **params: Any) -> pn.chat.ChatMessage:
        return (pmui.ChatMessage if self.material else InlineChatMessage)(**params)


SERVED = Kit(material=True)
INLINE = Kit(material=False)
