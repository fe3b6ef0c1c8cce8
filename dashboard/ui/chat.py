"""The chat: streams from the selected model through the backend's gate; locked while not ready."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import httpx
import panel as pn
import param

from dashboard.errors import SmartswitchError
from dashboard.ui.state import DashboardState

T = TypeVar("T")
# (model id, messages, actor) -> the assistant's text so far, growing as the reply streams
ChatSource = Callable[[str, list[dict[str, str]], str], AsyncIterator[str]]


class Guard(Protocol):
    """A lease's ``guard``: awaits, unless the request is cut first (a drain ran out of time)."""

    def __call__(self, awaitable: Awaitable[T]) -> Awaitable[T]: ...


class ChatError(RuntimeError):
    """The reply could not be had, or ended early; the message says why."""


async def _unguarded(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def stream_reply(url: str, headers: dict[str, str], model: str, messages: list[dict[str, str]], *,
                       guard: Guard = _unguarded, stall_s: float = 300.0) -> AsyncIterator[str]:
    """The assistant's text so far, growing as the OpenAI-style stream arrives; ``ChatError`` when the
    reply is refused, cut (an error chunk), stalls for ``stall_s`` or ends without ``[DONE]``."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": 256}
    text = ""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=stall_s)) as client:
        request = client.build_request("POST", url, json=body, headers=headers)
        response = await guard(client.send(request, stream=True))
        try:
            if response.status_code != 200:
                await guard(response.aread())
                raise ChatError(f"{response.status_code}: {error_message(response.content)}")
            lines = response.aiter_lines()
            while True:
                try:
                    line = await guard(anext(lines))
                except StopAsyncIteration:
                    raise ChatError("the reply ended before it was finished") from None
                if not line.startswith("data:"):
                    continue  # blank lines, and ": loading ..." notes while the model loads
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if isinstance(chunk.get("error"), dict):
                    raise ChatError(chunk["error"].get("message") or "the engine reported an error")
                for choice in chunk.get("choices", []):
                    text += choice.get("delta", {}).get("content") or ""
                yield text
        finally:
            await response.aclose()


def error_message(data: bytes) -> str:
    """The message of an error body in OpenAI's shape or smartswitch's own."""
    try:
        body = json.loads(data)
    except ValueError:
        return data.decode(errors="replace")[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(body.get("message") or body) if isinstance(body, dict) else str(body)


class ChatPanel(pn.viewable.Viewer):
    """A ChatInterface bound to the state's lock; the conversation outlives switches."""

    state = param.ClassSelector(class_=DashboardState)
    actor = param.String(default="dashboard:anonymous", doc="Who chats (the gate counts the request for them).")

    def __init__(self, target: ChatSource, **params: Any) -> None:
        super().__init__(**params)
        self._target = target
        self.chat = pn.chat.ChatInterface(
            callback=self._respond, callback_user="Assistant", show_rerun=False, show_undo=False,
            sizing_mode="stretch_both", min_height=400, css_classes=["chat"],
        )
        self.state.param.watch(self._apply_lock, ["chat_locked", "lock_reason"])
        # The feed restores `disabled` after each reply: re-apply our lock whenever it changes.
        self.chat.param.watch(self._apply_lock, "disabled")
        self._apply_lock()

    def _apply_lock(self, *_: Any) -> None:
        locked, reason = self.state.chat_locked, self.state.lock_reason
        if self.chat.disabled != locked:
            self.chat.disabled = locked
        widget = self.chat.active_widget
        widget.disabled = locked
        widget.placeholder = reason

    async def _respond(self, contents: str, user: str, instance: pn.chat.ChatInterface) -> AsyncIterator[Any]:
        model = self.state.selected_model
        if model is None or self.state.chat_locked:
            yield f"The chat is locked: {self.state.lock_reason}."
            return
        messages = [m for m in instance.serialize(custom_serializer=str) if m.get("content")]
        name = self.state.name_of(model)
        text = ""
        try:
            async for text in self._target(model, messages, self.actor):
                yield {"object": text, "user": name}
        except (httpx.HTTPError, ChatError, SmartswitchError) as exc:
            why = exc.message if isinstance(exc, SmartswitchError) else str(exc) or type(exc).__name__
            if text:  # what came before the cut stays, with the reason after it
                yield {"object": f"{text}\n\n⚠ {why}", "user": name}
            else:
                yield {"object": f"⚠ {name} did not answer: {why}", "user": "smartswitch"}

    def __panel__(self) -> pn.viewable.Viewable:
        return self.chat
