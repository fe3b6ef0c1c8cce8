"""Conversations kept per user: the store, and the chat panel over it (no browser, no server)."""

from __future__ import annotations

import asyncio
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from dashboard.conversations import (
    FILE,
    MEMORY,
    ConversationStore,
    Message,
    Role,
    close_store,
    store_for,
    switch_note,
    title_of,
    upstream,
)
from dashboard.errors import DataDirError, ModelNotRunning
from dashboard.ui.chat import NOTE_USER, ChatError, ChatPanel
from dashboard.ui.state import DashboardState


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ConversationStore]:
    store = ConversationStore(tmp_path / FILE)
    yield store
    store.close()


def contents(store: ConversationStore, user: str) -> list[tuple[str, str]]:
    current = store.current(user)
    return [(m.role, m.content) for m in store.messages(user, current.id)] if current else []


# The store -------------------------------------------------------------------------------------------
def test_the_first_message_starts_a_current_conversation_titled_by_it(store: ConversationStore) -> None:
    assert store.current("alice") is None
    assert store.conversations("alice") == []
    first = store.add("alice", Role.USER, "What is  a\nshard?")
    current = store.current("alice")
    assert current is not None and current.id == first.conversation_id
    assert current.title == "What is a shard?"
    store.add("alice", Role.USER, "and a checkpoint?")
    assert store.current("alice").title == "What is a shard?"  # the first message names it, not the last


def test_messages_keep_their_order_and_the_model_that_answered(store: ConversationStore) -> None:
    store.add("alice", Role.USER, "hi")
    store.add("alice", Role.ASSISTANT, "hello", model_id="small", model_name="Small-8B")
    store.add("alice", Role.NOTE, "— switched to Big-60B —", model_id="big", model_name="Big-60B")
    store.add("alice", Role.ASSISTANT, "HELLO", model_id="big", model_name="Big-60B")
    messages = store.messages("alice", store.current("alice").id)
    assert [(m.role, m.content, m.model_name) for m in messages] == [
        (Role.USER, "hi", None), (Role.ASSISTANT, "hello", "Small-8B"),
        (Role.NOTE, "— switched to Big-60B —", "Big-60B"), (Role.ASSISTANT, "HELLO", "Big-60B")]
    assert [m.at for m in messages] == sorted(m.at for m in messages)


def test_each_user_sees_only_their_own_conversations(store: ConversationStore) -> None:
    mine = store.add("alice", Role.USER, "alice's secret")
    store.add("bob", Role.USER, "bob's question")
    assert contents(store, "alice") == [(Role.USER, "alice's secret")]
    assert contents(store, "bob") == [(Role.USER, "bob's question")]
    assert store.messages("bob", mine.conversation_id) == []
    assert not store.select("bob", mine.conversation_id)
    assert not store.clear("bob", mine.conversation_id)
    assert store.add("bob", Role.USER, "sneaking in", conversation_id=mine.conversation_id) is None
    assert contents(store, "alice") == [(Role.USER, "alice's secret")]


def test_a_new_conversation_starts_empty_and_the_earlier_one_can_be_picked_again(store: ConversationStore) -> None:
    first = store.add("alice", Role.USER, "first topic")
    store.start_new("alice")
    assert store.current("alice") is None  # nothing written yet: nothing made
    assert len(store.conversations("alice")) == 1
    second = store.add("alice", Role.USER, "second topic")
    assert second.conversation_id != first.conversation_id
    assert [c.title for c in store.conversations("alice")] == ["second topic", "first topic"]  # recent first
    assert store.select("alice", first.conversation_id)
    assert contents(store, "alice") == [(Role.USER, "first topic")]
    store.add("alice", Role.USER, "back to it")
    assert [c.title for c in store.conversations("alice")] == ["first topic", "second topic"]


def test_clear_deletes_one_conversation_and_clear_all_every_one_of_that_user(store: ConversationStore) -> None:
    first = store.add("alice", Role.USER, "first")
    store.start_new("alice")
    store.add("alice", Role.USER, "second")
    store.add("bob", Role.USER, "bob's")
    assert store.clear("alice")  # the current one
    assert store.current("alice") is None
    assert [c.id for c in store.conversations("alice")] == [first.conversation_id]
    assert not store.clear("alice")  # nothing current to clear
    store.add("alice", Role.USER, "third")
    assert store.clear_all("alice") == 2
    assert store.conversations("alice") == [] and store.current("alice") is None
    assert contents(store, "bob") == [(Role.USER, "bob's")]


def test_a_reply_to_a_cleared_conversation_is_dropped(store: ConversationStore) -> None:
    question = store.add("alice", Role.USER, "long question")
    store.clear("alice")
    assert store.add("alice", Role.ASSISTANT, "late answer", conversation_id=question.conversation_id) is None
    assert store.conversations("alice") == []


def test_conversations_survive_reopening_the_file_which_only_its_owner_can_read(tmp_path: Path) -> None:
    path = tmp_path / FILE
    store = ConversationStore(path)
    store.add("alice", Role.USER, "remember me")
    store.add("alice", Role.ASSISTANT, "I will", model_id="small", model_name="Small-8B")
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = ConversationStore(path)
    try:
        assert contents(again, "alice") == [(Role.USER, "remember me"), (Role.ASSISTANT, "I will")]
    finally:
        again.close()


def test_a_file_that_is_not_a_database_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / FILE
    path.write_text("not sqlite at all, " * 100)
    with pytest.raises(DataDirError, match=r"Move it aside \(mv .*conversations\.sqlite"):
        ConversationStore(path)


def test_writes_notify_only_that_users_subscribers_until_they_unsubscribe(store: ConversationStore) -> None:
    heard: list[str] = []
    stop_alice = store.subscribe("alice", lambda: heard.append("alice tab 1"))
    store.subscribe("alice", lambda: heard.append("alice tab 2"))
    store.subscribe("bob", lambda: heard.append("bob"))
    store.add("alice", Role.USER, "hi")
    assert heard == ["alice tab 1", "alice tab 2"]
    heard.clear()
    stop_alice()
    store.start_new("alice")
    store.add("bob", Role.USER, "hi")
    assert heard == ["alice tab 2", "bob"]


def test_a_failing_subscriber_neither_loses_the_write_nor_silences_the_others(store: ConversationStore) -> None:
    heard: list[int] = []

    def broken() -> None:
        raise RuntimeError("tab is gone")

    store.subscribe("alice", broken)
    store.subscribe("alice", lambda: heard.append(1))
    store.add("alice", Role.USER, "still saved")
    assert heard == [1]
    assert contents(store, "alice") == [(Role.USER, "still saved")]


def test_a_subscriber_may_read_the_store_at_once(store: ConversationStore) -> None:
    seen: list[int] = []
    store.subscribe("alice", lambda: seen.append(len(contents(store, "alice"))))  # would deadlock under the lock
    store.add("alice", Role.USER, "one")
    store.add("alice", Role.USER, "two")
    assert seen == [1, 2]


def test_concurrent_writers_from_threads_lose_nothing(store: ConversationStore) -> None:
    users, per_thread = ("alice", "bob"), 40
    heard = {user: 0 for user in users}
    lock = threading.Lock()

    def count(user: str) -> Callable[[], None]:
        def heard_one() -> None:
            with lock:
                heard[user] += 1
        return heard_one

    for user in users:
        store.add(user, Role.USER, "start")  # one current conversation each, before the race
        store.subscribe(user, count(user))
    start = threading.Barrier(8)

    def write(user: str, writer: int) -> None:
        start.wait()
        for i in range(per_thread):
            store.add(user, Role.USER, f"{writer}:{i}")

    threads = [threading.Thread(target=write, args=(users[n % 2], n)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for user in users:
        messages = [m.content for m in store.messages(user, store.current(user).id)][1:]
        assert len(messages) == 4 * per_thread and heard[user] == 4 * per_thread
        for writer in range(8):
            if users[writer % 2] == user:  # each writer's messages in the order it wrote them
                mine = [m for m in messages if m.startswith(f"{writer}:")]
                assert mine == [f"{writer}:{i}" for i in range(per_thread)]
    assert len(store.conversations("alice")) == 1


def test_a_data_dir_has_one_store_in_a_process(tmp_path: Path) -> None:
    store = store_for(tmp_path)
    try:
        assert store_for(tmp_path / ".") is store
        assert store.path == tmp_path / FILE
    finally:
        close_store(tmp_path)
    assert store.closed
    reopened = store_for(tmp_path)
    assert reopened is not store
    close_store(tmp_path)


# What is sent, what is shown ---------------------------------------------------------------------------
def message(role: Role, content: str, model_id: str | None = None) -> Message:
    return Message(0, 1, role, content, time.time(), model_id, model_id)


def test_a_model_is_sent_the_users_messages_and_the_answers_never_the_notes() -> None:
    history = [message(Role.USER, "hi"), message(Role.ASSISTANT, "hello", "small"),
               message(Role.NOTE, "— switched to Big-60B —", "big"), message(Role.NOTE, "⚠ Big did not answer"),
               message(Role.USER, "again"), message(Role.ASSISTANT, "", "big")]
    assert upstream(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "again"}]


def test_a_divider_is_due_only_when_another_model_answers() -> None:
    assert switch_note([], "small", "Small-8B") is None  # the first answer needs none
    answered = [message(Role.USER, "hi"), message(Role.ASSISTANT, "hello", "small")]
    assert switch_note(answered, "small", "Small-8B") is None
    assert switch_note(answered, "big", "Big-60B") == "— switched to Big-60B —"
    switched = [*answered, message(Role.NOTE, "— switched to Big-60B —", "big"), message(Role.NOTE, "⚠ failed")]
    assert switch_note(switched, "big", "Big-60B") is None  # the divider stands until another model answers


def test_a_title_is_one_short_line() -> None:
    assert title_of("  two\n\nlines  ") == "two lines"
    long = title_of("word " * 40)
    assert len(long) == 60 and long.endswith("…")


# The chat panel over the store ---------------------------------------------------------------------------
MODELS = [{"id": "small", "name": "Small-8B", "status": "running"},
          {"id": "big", "name": "Big-60B", "status": "running"}]


class FakeModel:
    """Answers ``echo: <last user message>`` word by word; records what it was sent; can be cut."""

    def __init__(self) -> None:
        self.sent: list[list[dict[str, str]]] = []
        self.cut_after: int | None = None
        self.refuse: Exception | None = None

    async def __call__(self, model: str, messages: list[dict[str, str]], actor: str) -> AsyncIterator[str]:
        self.sent.append(messages)
        if self.refuse is not None:
            raise self.refuse
        text = ""
        for n, word in enumerate(f"{model} echo: {messages[-1]['content']}".split()):
            if self.cut_after is not None and n == self.cut_after:
                raise ChatError("the engine stopped (drain timed out)")
            text += (" " if text else "") + word
            yield text
            await asyncio.sleep(0)


def state(selected: str = "small") -> DashboardState:
    return DashboardState(models=MODELS, selected_model=selected, chat_locked=False, lock_reason="Message it")


async def say(panel: ChatPanel, text: str, timeout: float = 5.0) -> None:
    """Send ``text`` as the user does and wait until the reply is over."""
    before = len(panel.chat.objects)
    panel.chat.send(text, user=panel.chat.user, respond=True)
    deadline = time.monotonic() + timeout
    while not (len(panel.chat.objects) > before + 1 and not panel._replying):
        assert time.monotonic() < deadline, f"no reply to {text!r} within {timeout} s"
        await asyncio.sleep(0.01)


def feed(panel: ChatPanel) -> list[tuple[str, str]]:
    return [(m.user, m.object) for m in panel.chat.objects]


async def test_the_question_and_the_reply_are_kept_with_the_model_that_answered(store: ConversationStore) -> None:
    model = FakeModel()
    panel = ChatPanel(state=state(), target=model, store=store, user="alice")
    await say(panel, "what is a shard?")
    assert contents(store, "alice") == [(Role.USER, "what is a shard?"),
                                        (Role.ASSISTANT, "small echo: what is a shard?")]
    assert feed(panel) == [("alice", "what is a shard?"), ("Small-8B", "small echo: what is a shard?")]
    # A reload (a new panel of the same user) shows the same, under the same names; another user's shows nothing.
    assert feed(ChatPanel(state=state(), target=model, store=store, user="alice")) == feed(panel)
    assert feed(ChatPanel(state=state(), target=model, store=store, user="bob")) == []


async def test_a_model_change_leaves_a_divider_that_is_never_sent_upstream(store: ConversationStore) -> None:
    model = FakeModel()
    panel = ChatPanel(state=state(), target=model, store=store, user="alice")
    await say(panel, "hi")
    panel.state.selected_model = "big"
    await say(panel, "again")
    assert feed(panel)[2:] == [("alice", "again"), (NOTE_USER, "— switched to Big-60B —"),
                               ("Big-60B", "big echo: again")]
    assert model.sent[-1] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "small echo: hi"},
                              {"role": "user", "content": "again"}]
    await say(panel, "and once more")
    assert [user for user, _ in feed(panel)].count(NOTE_USER) == 1  # same model: no second divider
    reloaded = ChatPanel(state=state("big"), target=model, store=store, user="alice")
    assert feed(reloaded) == feed(panel)


async def test_a_cut_reply_is_kept_with_its_reason_and_a_refusal_as_a_note(store: ConversationStore) -> None:
    model = FakeModel()
    panel = ChatPanel(state=state(), target=model, store=store, user="alice")
    model.cut_after = 2
    await say(panel, "tell me a long story")
    cut = "small echo:\n\n⚠ the engine stopped (drain timed out)"
    assert feed(panel)[-1] == ("Small-8B", cut)
    model.refuse = ModelNotRunning("small is not running: switch to it first.")
    await say(panel, "are you there?")
    refused = "⚠ Small-8B did not answer: small is not running: switch to it first."
    assert feed(panel)[-1] == (NOTE_USER, refused)
    assert contents(store, "alice")[1:] == [(Role.ASSISTANT, cut), (Role.USER, "are you there?"),
                                            (Role.NOTE, refused)]
    assert feed(ChatPanel(state=state(), target=model, store=store, user="alice")) == feed(panel)


async def test_a_locked_chat_keeps_the_message_and_says_why(store: ConversationStore) -> None:
    panel = ChatPanel(state=state(), target=FakeModel(), store=store, user="alice")
    panel.state.param.update(chat_locked=True, lock_reason="Switching to Big-60B...")
    await say(panel, "hello?")
    assert feed(panel) == [("alice", "hello?"), (NOTE_USER, "The chat is locked: Switching to Big-60B....")]


async def test_another_tab_shows_new_messages_when_told_and_rebuilds_on_a_new_conversation(
        store: ConversationStore) -> None:
    model = FakeModel()
    first = ChatPanel(state=state(), target=model, store=store, user="alice")
    second = ChatPanel(state=state(), target=model, store=store, user="alice")
    told: list[int] = []
    store.subscribe("alice", lambda: told.append(1))
    await say(first, "hi from tab one")
    assert told  # the store told the user's tabs; a tab in a browser session syncs on its loop
    second.sync()
    assert feed(second) == feed(first)
    await first._start_new()
    assert feed(first) == []
    second.sync()
    assert feed(second) == []
    assert list(second.picker.options.values()) == [0, store.conversations("alice")[0].id]
    await say(second, "a new topic")
    first.sync()
    assert feed(first) == [("alice", "a new topic"), ("Small-8B", "small echo: a new topic")]
    assert len(store.conversations("alice")) == 2


async def test_picking_an_earlier_conversation_and_clearing_it(store: ConversationStore) -> None:
    model = FakeModel()
    panel = ChatPanel(state=state(), target=model, store=store, user="alice")
    await say(panel, "first topic")
    await panel._start_new()
    await say(panel, "second topic")
    earlier = next(c for c in store.conversations("alice") if c.title == "first topic")
    panel.picker.value = earlier.id
    deadline = time.monotonic() + 5
    while feed(panel)[0] != ("alice", "first topic"):
        assert time.monotonic() < deadline, "the earlier conversation was not shown"
        await asyncio.sleep(0.01)
    await panel._clear()
    assert feed(panel) == [] and store.current("alice") is None
    assert [c.title for c in store.conversations("alice")] == ["second topic"]
    # The next message is answered from a fresh history: the cleared conversation is not sent.
    await say(panel, "fresh start")
    assert model.sent[-1] == [{"role": "user", "content": "fresh start"}]


def test_a_panel_without_a_store_keeps_its_conversation_in_memory() -> None:
    panel = ChatPanel(state=state(), target=FakeModel(), user="alice")
    assert panel.store.path == MEMORY
    assert feed(panel) == []


async def test_a_notebook_panel_uses_panels_own_widgets_and_keeps_the_conversation(store: ConversationStore) -> None:
    import panel as pn
    import panel_material_ui as pmui

    from dashboard.ui.kit import INLINE

    panel = ChatPanel(state=state(), target=FakeModel(), store=store, user="alice", kit=INLINE)
    assert not isinstance(panel.new_button, pmui.Button) and isinstance(panel.picker, pn.widgets.Select)
    await say(panel, "from a notebook")
    assert feed(ChatPanel(state=state(), target=FakeModel(), store=store, user="alice")) == feed(panel)
