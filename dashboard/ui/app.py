"""The dashboard layout factory: one fresh set of views per browser session or notebook cell."""

from __future__ import annotations

import panel as pn


def create_app() -> pn.viewable.Viewable:
    from dashboard.orchestrator.core import get_orchestrator

    port = get_orchestrator()
    return pn.pane.JSON(port.status(), depth=2)
