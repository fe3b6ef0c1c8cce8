"""What the dashboard needs from an orchestrator: in this process (the port) or on a shared server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dashboard.client import SmartswitchClient
from dashboard.events import Event
from dashboard.orchestrator.core import OrchestratorPort


class LocalBackend:
    """The orchestrator of this process (``smartswitch serve``, or a notebook's own)."""

    def __init__(self, port: OrchestratorPort) -> None:
        self.port = port

    def status(self) -> dict[str, Any]:
        return self.port.status()

    def plan(self, target: str) -> dict[str, Any]:
        return self.port.plan(target)

    def switch(self, target: str, actor: str) -> str:
        return self.port.switch(target, actor)

    def cancel(self, actor: str) -> bool:
        return self.port.cancel(actor)

    def act(self, action: str, model_id: str, actor: str) -> None:
        if action in ("pin", "unpin"):
            self.port.set_pinned(model_id, action == "pin", actor)
        else:
            getattr(self.port, action)(model_id, actor)

    def audit_log(self) -> list[dict[str, Any]]:
        return self.port.audit_log()

    def load_history(self) -> list[dict[str, Any]]:
        return self.port.load_history()

    def last_used(self, actor: str) -> str | None:
        return self.port.last_used(actor)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None] | None:
        """Events as they happen (called on the orchestrator's thread); None where unsupported."""
        return self.port.subscribe(callback)

    def chat_target(self, model_id: str) -> tuple[str, dict[str, str]]:
        endpoint = self.status()["models"][model_id].get("endpoint")
        return f"{endpoint}/v1/chat/completions", {}


class RemoteBackend:
    """A shared ``smartswitch serve`` reached over HTTP with an API key."""

    def __init__(self, client: SmartswitchClient) -> None:
        self.client = client

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def plan(self, target: str) -> dict[str, Any]:
        return self.client.plan(target)

    def switch(self, target: str, actor: str) -> str:
        return self.client.switch(target)

    def cancel(self, actor: str) -> bool:
        return self.client.cancel()

    def act(self, action: str, model_id: str, actor: str) -> None:
        self.client.action(model_id, action)

    def audit_log(self) -> list[dict[str, Any]]:
        return self.client.audit_log()

    def load_history(self) -> list[dict[str, Any]]:
        return []

    def last_used(self, actor: str) -> str | None:
        return None

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None] | None:
        return None  # polling only: one SSE connection per session is not worth it

    def chat_target(self, model_id: str) -> tuple[str, dict[str, str]]:
        http = self.client.http
        return f"{http.base_url}/v1/chat/completions", dict(http.headers)
