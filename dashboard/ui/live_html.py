"""HTML that changes many times a second (the switch strip, the GPU figures): only its text travels, and
its buttons are part of it.

Panel's HTML pane re-sends all its properties on each new text, its stylesheets included, and a list of
stylesheet models set again makes Bokeh walk the whole document for new models (10-100 ms a time on
the dashboard, on the loop every page shares). Here an update is one string on the component's data
model, set into the element as it is. A button in it (``data-action="cancel"``) calls back by name: shown
and hidden with the text, with no widget whose ``visible`` would make the browser lay the page out anew.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import panel as pn
import param
from panel.custom import JSComponent


class LiveHTML(JSComponent):
    """An element whose inner HTML is ``object``; style it with ``stylesheets`` (sent once). A click on an
    element with ``data-action`` calls ``on_action(name)`` (once: the element is disabled until redrawn)."""

    object = param.String(default="", allow_refs=True,
                          doc="The HTML shown (trusted: made by the dashboard, escaped there); or a method giving it.")

    _esm = """
export function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "live-html";
  const draw = () => { box.innerHTML = model.object; };
  box.addEventListener("click", (event) => {
    const button = event.target.closest("[data-action]");
    if (button && !button.disabled) {
      button.disabled = true;
      model.send_msg({action: button.dataset.action});
    }
  });
  model.on("object", draw);
  draw();
  return box;
}
"""

    def __init__(self, on_action: Callable[[str], Awaitable[None] | None] | None = None, **params: Any) -> None:
        super().__init__(**params)
        self._on_action = on_action

    def _handle_msg(self, msg: Any) -> None:
        if self._on_action is not None and isinstance(msg, dict) and isinstance(msg.get("action"), str):
            pn.state.execute(partial(self._on_action, msg["action"]))
