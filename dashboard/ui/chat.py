"""The chat: streams from the selected model through the backend's gate; locked while not ready; kept per user."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import httpx
import panel as pn
import panel_material_ui as pmui
import param

from dashboard.conversations import (
    MEMORY,
    Conversation,
    ConversationError,
    ConversationStore,
    Message,
    Role,
    switch_note,
    upstream,
)
from dashboard.errors import SmartswitchError
from dashboard.ui.kit import SERVED, Kit
from dashboard.ui.live_html import LiveHTML
from dashboard.ui.session import SoonInSession
from dashboard.ui.state import DashboardState

log = logging.getLogger(__name__)
T = TypeVar("T")
NOTE_USER = "smartswitch"  # notes (a change of model, a reply that never came) appear under this name
NEW = 0  # the picker's value for the new conversation not written in yet (conversation ids start at 1)
NEW_LABEL = "New conversation"
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
    """A ChatInterface over the user's current conversation, bound to the state's lock.

    The conversation is kept in the store: it outlives switches, reloads and restarts, and every tab of
    the same user shows it (the store tells each tab of a write; the tab syncs on its own session's loop).
    """

    state = param.ClassSelector(class_=DashboardState)
    actor = param.String(default="dashboard:anonymous", doc="Who chats (the gate counts the request for them).")
    user = param.String(default="anonymous", doc="Whose conversations these are.")

    def __init__(self, target: ChatSource, store: ConversationStore | None = None, kit: Kit = SERVED,
                 **params: Any) -> None:
        super().__init__(**params)
        self._target = target
        # Without a store (a panel on its own), the conversation lives as long as this panel.
        self.store = store if store is not None else ConversationStore(MEMORY)
        self.kit = kit
        self.chat = kit.chat(
            callback=self._respond, callback_user="Assistant", show_rerun=False, show_undo=False,
            show_clear=False,  # "Clear" deletes the kept conversation: our own button below
            placeholder_threshold=0,  # the reply's own bubble shows at once instead
            user=self.user if self.user not in ("", "anonymous") else "User",
            # The interface builds only the user's own messages; every other one is a _bubble.
            message_params={"css_classes": ["chat-message", f"chat-{Role.USER}"]},
            # The feed takes the height left under the header and the strip, so the input stays in view.
            sizing_mode="stretch_width", min_height=300, css_classes=["chat"],
            styles={"height": "calc(100vh - 330px)" if kit.material else "420px"},
        )
        # The kit has no select: the same choice it makes, Material UI in a page, Panel's own inline.
        select = pmui.Select if kit.material else pn.widgets.Select
        self.picker = select(options={NEW_LABEL: NEW}, value=NEW, width=320, css_classes=["conversation-picker"])
        self.new_button = kit.button("New conversation", "new-conversation", variant="outlined")
        self.clear_button = kit.button("Clear", "clear-conversation", variant="outlined", color="error")
        self.picker.param.watch(self._pick, "value")
        self.new_button.on_click(self._start_new)
        self.clear_button.on_click(self._clear)
        self.empty = LiveHTML(object=self._empty_text, css_classes=["chat-empty"], sizing_mode="stretch_width",
                                  styles={"color": "#687080", "text-align": "center", "font-size": "15px"})
        self.chat.param.watch(lambda event: setattr(self.empty, "visible", not event.new), "objects")
        # Wraps on a narrow screen: New and Clear stay in reach at 420 px.
        bar = pn.FlexBox(self.picker, self.new_button, self.clear_button, flex_wrap="wrap", align_items="center",
                         sizing_mode="stretch_width")
        self._layout = pn.Column(bar,
                                 self.empty, self.chat, sizing_mode="stretch_width")
        self._conversation: int | None = None  # what the feed shows
        self._shown: list[int] = []  # the ids of the feed's messages, in its order
        self._replying = False
        self._sync_in_session = SoonInSession(self._sync_loaded)
        self._unsubscribe: Callable[[], None] | None = None
        self._loaded = False  # in a browser session: whether its page has loaded
        self.state.param.watch(self._apply_lock, ["chat_locked", "lock_reason"])
        # The feed restores `disabled` after each reply: re-apply our lock whenever it changes.
        self.chat.param.watch(self._apply_lock, "disabled")
        self._apply_lock()
        self.sync()
        self.empty.visible = not self.chat.objects

    @param.depends("state.selected_model", "state.chat_locked")
    def _empty_text(self) -> str:
        """What an empty conversation says: who answers, and that it is kept."""
        name = self.state.name_of(self.state.selected_model)
        ask = f"Ask {html.escape(name)} anything." if name and not self.state.chat_locked else \
            "Pick a model in the header, then ask it anything."
        return (f"<div style='padding:28px 0 6px'><div style='font-size:18px;font-weight:600'>{ask}</div>"
                "<div>Your conversations are kept: they follow you to your other tabs and survive a restart.</div>"
                "</div>")

    def _apply_lock(self, *_: Any) -> None:
        locked, reason = self.state.chat_locked, self.state.lock_reason
        if self.chat.disabled != locked:
            self.chat.disabled = locked
        widget = self.chat.active_widget
        if not self.kit.material:  # Material's input follows the interface's ``disabled`` by reference
            widget.disabled = locked
        widget.placeholder = reason

    def resend(self) -> None:
        """Send the lock to the page again (after it loaded: what changed while it loaded was dropped)."""
        self._apply_lock()
        self.chat.param.trigger("disabled")
        self.chat.active_widget.param.trigger("placeholder")

    # Showing the kept conversation --------------------------------------------------------------
    def sync(self, *, force: bool = False) -> None:
        """Show the user's current conversation: new messages are appended, anything else rebuilds the feed.

        Waits while a reply is under way in this tab (the feed holds messages not saved yet): the reply
        syncs with ``force`` when it ends.
        """
        if not force and (self._replying or len(self.chat.objects) != len(self._shown)):
            return
        try:
            current = self.store.current(self.user)
            messages = self.store.messages(self.user, current.id) if current else []
            conversations = self.store.conversations(self.user)
        except ConversationError as exc:
            log.error("chat of %s: %s", self.user, exc.message)
            return
        cid = current.id if current else None
        ids = [m.id for m in messages]
        same = cid == self._conversation and len(self.chat.objects) == len(self._shown)
        if same and ids[:len(self._shown)] == self._shown:
            if len(ids) > len(self._shown):
                self.chat.extend([self._bubble(m.role, m.content, m.model_name, m.at)
                                  for m in messages[len(self._shown):]])
        else:
            self.chat.objects = [self._bubble(m.role, m.content, m.model_name, m.at) for m in messages]
        self._conversation, self._shown = cid, ids
        self._list(conversations)

    def _list(self, conversations: list[Conversation]) -> None:
        options = {NEW_LABEL: NEW} if self._conversation is None else {}
        for c in conversations:
            label = f"{c.title or 'Untitled'} · {time.strftime('%b %d %H:%M', time.localtime(c.updated_at))}"
            options[label if label not in options else f"{label} #{c.id}"] = c.id
        # Setting the value calls _pick, which sees it is what is shown already.
        self.picker.param.update(options=options, value=self._conversation or NEW)

    def _bubble(self, role: Role, content: str, model_name: str | None = None,
                at: float | None = None) -> pn.chat.ChatMessage:
        """A message as the feed shows it: under the user's name, the answering model's, or smartswitch's."""
        if role is Role.USER:
            user, avatar = self.chat.user, self.chat.avatar
        elif role is Role.ASSISTANT:
            user, avatar = model_name or self.chat.callback_user, self.chat.callback_avatar
        else:
            user, avatar = NOTE_USER, None
        params: dict[str, Any] = {"object": content, "user": user, "show_edit_icon": False,
                                  "css_classes": ["chat-message", f"chat-{role}"]}
        if avatar:
            params["avatar"] = avatar
        if at is not None:
            params["timestamp"] = datetime.fromtimestamp(at)
        return self.kit.message(**params)

    # Other tabs' writes ---------------------------------------------------------------------------
    def _sync_loaded(self) -> None:
        if self._loaded:  # else the sync when the page has loaded shows it
            self.sync()

    def _on_load(self) -> None:
        # Panel drops changes made between a page's first pull of the document and its load (it holds
        # them for a page not yet loaded, then assumes the pull had them): sync only once it has loaded.
        self._loaded = True
        self.sync()

    def _stop(self, *_: Any) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # Buttons ----------------------------------------------------------------------------------
    async def _start_new(self, *_: Any) -> None:
        await self._change(self.store.start_new, self.user)

    async def _clear(self, *_: Any) -> None:
        await self._change(self.store.clear, self.user)

    async def _pick(self, event: param.parameterized.Event) -> None:
        if event.new == (self._conversation or NEW):
            return
        if event.new == NEW:
            await self._change(self.store.start_new, self.user)
        else:
            await self._change(self.store.select, self.user, event.new)

    async def _change(self, write: Callable[..., Any], *args: Any) -> None:
        try:
            await asyncio.to_thread(write, *args)
        except ConversationError as exc:
            self._warn(exc.message)
        self.sync()

    # Replies ----------------------------------------------------------------------------------
    async def _respond(self, contents: Any, user: str, instance: pn.chat.ChatInterface) -> None:
        self._replying = True
        try:
            await self._reply(str(contents), instance)
        finally:
            self._replying = False
            self.sync(force=True)  # what other tabs wrote meanwhile; a rebuild if something was not saved

    async def _reply(self, contents: str, instance: pn.chat.ChatInterface) -> None:
        """Save the message the interface just showed, then stream the model's reply into a bubble of its
        own and save it too (cut short: with the reason). A model other than the conversation's last
        leaves a divider first."""
        model = self.state.selected_model
        question = await self._save(Role.USER, contents)
        if question is None:
            return  # not saved: said so; the sync that follows shows what is kept
        self._track(question)
        cid = question.conversation_id
        if model is None or self.state.chat_locked:
            await self._post(Role.NOTE, f"The chat is locked: {self.state.lock_reason}.", cid)
            return
        name = self.state.name_of(model)
        try:
            earlier = await asyncio.to_thread(self.store.messages, self.user, cid)
        except ConversationError as exc:
            self._warn(exc.message)
            return
        note = switch_note(earlier, model, name)
        if note is not None:
            await self._post(Role.NOTE, note, cid, model_id=model, model_name=name)
        bubble = self._bubble(Role.ASSISTANT, "…", name)
        instance.append(bubble)
        text = ""
        try:
            async for text in self._target(model, upstream(earlier), self.actor):
                bubble.object = text or "…"
        except (httpx.HTTPError, ChatError, SmartswitchError) as exc:
            why = exc.message if isinstance(exc, SmartswitchError) else str(exc) or type(exc).__name__
            if not text:
                instance.remove(bubble)
                await self._post(Role.NOTE, f"⚠ {name} did not answer: {why}", cid)
                return
            text = f"{text}\n\n⚠ {why}"  # what came before the cut stays, with the reason after it
        except asyncio.CancelledError:  # Stop: what came is kept, saved now (a cancelled task awaits nothing)
            if text:
                bubble.object = text = f"{text}\n\n⚠ stopped"
                self._save_now(Role.ASSISTANT, text, cid, model, name)
            raise
        bubble.object = text
        self._track(await self._save(Role.ASSISTANT, text, cid, model, name))

    async def _save(self, role: Role, content: str, conversation_id: int | None = None,
                    model_id: str | None = None, model_name: str | None = None) -> Message | None:
        try:
            return await asyncio.to_thread(self.store.add, self.user, role, content, conversation_id=conversation_id,
                                           model_id=model_id, model_name=model_name)
        except ConversationError as exc:
            self._warn(exc.message)
            return None

    def _save_now(self, role: Role, content: str, conversation_id: int, model_id: str, model_name: str) -> None:
        try:
            self._track(self.store.add(self.user, role, content, conversation_id=conversation_id,
                                       model_id=model_id, model_name=model_name))
        except ConversationError as exc:
            log.error("chat of %s: %s", self.user, exc.message)

    async def _post(self, role: Role, content: str, conversation_id: int, *, model_id: str | None = None,
                    model_name: str | None = None) -> None:
        """Save a message and show it."""
        saved = await self._save(role, content, conversation_id, model_id, model_name)
        self.chat.append(self._bubble(role, content, model_name))
        self._track(saved)

    def _track(self, message: Message | None) -> None:
        """The feed's newest message is ``message`` (kept); unknown ones leave the feed to be rebuilt."""
        if message is None:
            return
        if self._conversation is None and not self._shown:
            self._conversation = message.conversation_id  # the new conversation this message started
        self._shown.append(message.id)

    def _warn(self, message: str) -> None:
        log.error("chat of %s: %s", self.user, message)
        if pn.state.notifications is not None:
            pn.state.notifications.warning(message, duration=8000)

    def __panel__(self) -> pn.viewable.Viewable:
        doc = pn.state.curdoc
        if self._unsubscribe is None and doc is not None and doc.session_context is not None:
            self._sync_in_session.doc = doc
            # The user's conversations changed (told on any thread): sync in this session.
            self._unsubscribe = self.store.subscribe(self.user, self._sync_in_session)
            pn.state.on_session_destroyed(self._stop)
            pn.state.onload(self._on_load)
        return self._layout
