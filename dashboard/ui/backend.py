"""What the dashboard needs from an orchestrator: in this process (the port) or on a shared server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from dashboard.client import SmartswitchClient
from dashboard.conversations import MEMORY, ConversationStore, store_for
from dashboard.events import Event
from dashboard.orchestrator.core import OrchestratorPort
from dashboard.ui.chat import stream_reply


class LocalBackend:
    """The orchestrator of this process (``smartswitch serve``, or a notebook's own)."""

    def __init__(self, port: OrchestratorPort) -> None:
        self.port = port
        # Made per session: the data dir's one store is shared by them all.
        self.conversations: ConversationStore = store_for(port.data_dir)

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

    async def chat(self, model_id: str, messages: list[dict[str, str]], actor: str) -> AsyncIterator[str]:
        """The reply as it grows, through the same gate as the API's: counted on its model (refused when it
        does not serve), and ended with the reason when a drain cuts it or the engine fails."""
        async with self.port.lease(model_id, actor) as lease:
            async for text in stream_reply(f"{lease.endpoint}/v1/chat/completions", lease.headers, model_id,
                                           messages, guard=lease.guard,
                                           stall_s=self.port.config.switching.stall_timeout_s):
                yield text


class RemoteBackend:
    """A shared ``smartswitch serve`` reached over HTTP with an API key."""

    def __init__(self, client: SmartswitchClient) -> None:
        self.client = client
        # The server keeps no chat of ours: conversations last as long as this backend.
        self.conversations = ConversationStore(MEMORY)

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

    async def chat(self, model_id: str, messages: list[dict[str, str]], actor: str) -> AsyncIterator[str]:
        """Through the server's proxy, which gates it (the request is its API key's)."""
        http = self.client.http
        async for text in stream_reply(f"{http.base_url}/v1/chat/completions", dict(http.headers), model_id,
                                       messages):
            yield text
