"""Changing raw Bokeh models from Panel callbacks."""

from __future__ import annotations

from collections.abc import Callable

from bokeh.model import Model


def update_bokeh(model: Model, change: Callable[[], None]) -> None:
    """Apply ``change`` to ``model`` now, or on the next tick of its served document.

    Raw Bokeh models (unlike Panel's) may only change under the document lock, which the next-tick
    callback holds; a model not yet in a served document can change at once.
    """
    doc = model.document
    if doc is not None and doc.session_context is not None:
        doc.add_next_tick_callback(change)
    else:
        change()
