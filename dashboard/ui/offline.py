"""Panel's own stylesheets for a notebook cell from the cell itself, never from a CDN.

GPU nodes often have no internet. Panel inlines its stylesheets (theme, loading spinner, chat, markdown) when
a cell first renders and when a layout gains a child, but a part updated in place later (a pane's text, a
streamed chat reply) re-sends the CDN addresses of its sheets, and the browser asks the internet for them.
Panel takes those sheets from a per-document cache keyed by address: filling that cache with the same sheets
as ``data:`` addresses makes every later update carry the sheet's text instead.
"""

from __future__ import annotations

import base64
import functools
import weakref
from typing import Any

from bokeh.document import Document
from bokeh.models import ImportedStyleSheet
from panel.io.resources import CDN_DIST, DIST_DIR, JS_VERSION, LOCAL_DIST
from panel.io.state import state
from panel.viewable import Viewable

SHEET_FOLDERS = ("css", "bundled/theme")  # every sheet Panel's widgets, panes and themes name

_filled: weakref.WeakSet[Document] = weakref.WeakSet()  # the documents whose cache holds the data sheets


@functools.cache
def data_sheets() -> list[tuple[str, tuple[str, ...]]]:
    """Each of Panel's sheets as a data: address, with every address Panel gives it (on its CDN or its
    server, with and without the version suffix)."""
    sheets = []
    for folder in SHEET_FOLDERS:
        for path in sorted((DIST_DIR / folder).glob("*.css")):
            data = f"data:text/css;base64,{base64.b64encode(path.read_bytes()).decode()}"
            urls = [f"{dist}{folder}/{path.name}" for dist in (CDN_DIST, LOCAL_DIST)]
            sheets.append((data, (*urls, *(f"{url}?v={JS_VERSION}" for url in urls))))
    return sheets


def fill_cache(doc: Document) -> None:
    """Make Panel's sheets of ``doc`` data: addresses: one model per sheet, whichever address names it (a
    Bokeh model belongs to one document: new ones for each)."""
    cache = state._stylesheets.setdefault(doc, {})
    for data, urls in data_sheets():
        cache.update(dict.fromkeys(urls, ImportedStyleSheet(url=data)))
    _filled.add(doc)


def _on_render(viewable: Viewable, root: Any, *_: Any) -> None:
    """Panel's hook on every render. A cell's root is not in its document yet when it runs, but rendering it
    has opened the document's cache: each notebook document (no server session) gets the data sheets once."""
    for doc in list(state._stylesheets):
        if doc.session_context is None and doc not in _filled:
            fill_cache(doc)


def keep_sheets_inline() -> None:
    """From now on, every Panel object rendered in this kernel keeps its sheets in the notebook's output."""
    if _on_render not in Viewable._preprocessing_hooks:
        Viewable._preprocessing_hooks.append(_on_render)
