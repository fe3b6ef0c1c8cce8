"""Running code in a browser session from any thread."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from panel.io.state import set_curdoc, state


class SoonInSession:
    """Calls ``action`` on a browser session's loop, once for however many asks come before it runs.

    Through the document's next-tick callback: Bokeh's one thread-safe way in. It runs holding the document's
    lock, as Panel's own callbacks do, so what it changes reaches the browser (changed from a plain loop
    callback, it would stay on the server).

    With ``gather_s``, asks made on a loop wait that long first, so that steps the loop takes right after
    one another reach the page together: an engine answering and its switch ending (a few ms later) make
    one refresh, not two that would each hold the GIL while the switch tries to end.
    """

    def __init__(self, action: Callable[[], Any], gather_s: float = 0.0) -> None:
        self.action = action
        self.gather_s = gather_s
        self.doc: Any = None  # the session's document, once the view is in one
        self._pending = False

    def __call__(self) -> None:
        doc = self.doc
        if doc is None or self._pending:
            return  # no session yet; or a burst of asks, one call is enough
        self._pending = True

        def run() -> None:
            self._pending = False
            with set_curdoc(doc):
                self.action()

        def schedule() -> None:
            try:
                doc.add_next_tick_callback(run)
            except Exception:  # the session is gone (its unsubscribe is on its way)
                self._pending = False
        if self.gather_s:
            try:  # asked on a loop (the orchestrator's): what that loop does next joins this call
                asyncio.get_running_loop().call_later(self.gather_s, schedule)
                return
            except RuntimeError:  # asked from a plain thread: at once
                pass
        schedule()


def forget_session(page: Any) -> Callable[[Any], None]:
    """What to run when the session showing ``page`` ends: drop what the libraries still keep of it.

    Each of these alone keeps the whole dashboard of a closed session alive, so every page view would leak
    a dashboard's worth of memory: Material UI's page binds its ``busy`` to Panel's process-wide state (a
    watcher there refers back to the page), and its notification area stays in Panel's registry of views.
    """
    def forget(session_context: Any) -> None:
        for watchers in state.param.watchers.values():
            for watcher in [w for group in watchers.values() for w in group]:
                if getattr(getattr(watcher.fn, "__self__", None), "self", None) is page:
                    state.param.unwatch(watcher)
        doc = session_context._document
        for ref, (view, root, view_doc, _) in list(state._views.items()):
            if view_doc is doc:
                view._cleanup(root)
                state._views.pop(ref, None)
    return forget
