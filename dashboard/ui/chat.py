"""The chat: streams from the selected model through its engine's OpenAI API; locked while not ready."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import panel as pn
import param

from dashboard.ui.state import DashboardState

ChatTarget = Callable[[str], tuple[str, dict[str, str]]]  # model id -> (completions URL, headers)


async def stream_reply(url: str, headers: dict[str, str], model: str,
                       messages: list[dict[str, str]]) -> AsyncIterator[str]:
    """The assistant's text so far, growing as the OpenAI-style stream arrives."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": 256}
    text = ""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=300.0)) as client, \
            client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            try:
                message = response.json().get("message") or response.text
            except json.JSONDecodeError:
                message = response.text
            raise RuntimeError(f"{response.status_code}: {message}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
            yield text


class ChatPanel(pn.viewable.Viewer):
    """A ChatInterface bound to the state's lock; the conversation outlives switches."""

    state = param.ClassSelector(class_=DashboardState)

    def __init__(self, target: ChatTarget, **params: Any) -> None:
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

    async def _respond(self, contents: str, user: str, instance: pn.chat.ChatInterface) -> AsyncIterator[str]:
        model = self.state.selected_model
        if model is None or self.state.chat_locked:
            yield f"The chat is locked: {self.state.lock_reason}."
            return
        url, headers = self._target(model)
        messages = [m for m in instance.serialize(custom_serializer=str) if m.get("content")]
        try:
            async for text in stream_reply(url, headers, model, messages):
                yield {"object": text, "user": self.state.name_of(model)}
        except (httpx.HTTPError, RuntimeError) as exc:
            yield {"object": f"⚠ {self.state.name_of(model)} did not answer: {exc}", "user": "smartswitch"}

    def __panel__(self) -> pn.viewable.Viewable:
        return self.chat
