"""smartswitch: switch a lab GPU box between vLLM models, with real progress and a dashboard.

In a notebook: ``from dashboard import connect``; ``lab = connect()`` (see ``dashboard.notebook``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dashboard.notebook import ConnectFailed, Lab, SwitchFailed, connect

__all__ = ["ConnectFailed", "Lab", "SwitchFailed", "connect"]


def __getattr__(name: str) -> Any:
    # Imported on first use: engines, the CLI and the API import this package too and must not pay for Panel.
    if name in __all__:
        from dashboard import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'dashboard' has no attribute {name!r}")
