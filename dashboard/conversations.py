"""The dashboard's chat conversations, kept per user in the data dir (``conversations.sqlite``).

A user has conversations, each titled by its first message and made of messages: what the user sent,
what a model answered (with that model's id and name), and notes (the answering model changed, a reply
never came). One of them is the user's current conversation: the one every tab of theirs shows. Each
write tells that user's subscribers, after it is committed, so all their open tabs can show it.

One connection behind one lock: writes are a few rows each, and the data dir has one server. Opening
checks the file and raises ``DataDirError`` saying what to do; a write or read that fails later raises
``ConversationError``.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from dashboard.errors import DataDirError, SmartswitchError
from dashboard.orchestrator.datadir import create_private

log = logging.getLogger(__name__)
T = TypeVar("T")
FILE = "conversations.sqlite"
MEMORY = ":memory:"
TITLE_CHARS = 60
BUSY_S = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT NOT NULL, title TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, model_id TEXT, model_name TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS current_conversation (user TEXT PRIMARY KEY, conversation_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated_at);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, id);
"""


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    NOTE = "system-note"  # shown in the feed, never sent to a model


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str  # from the first user message; "" until there is one
    created_at: float
    updated_at: float  # the last message's time


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: Role
    content: str
    at: float
    model_id: str | None = None  # who answered (assistant), or who answers from here on (a switch note)
    model_name: str | None = None


class ConversationError(SmartswitchError):
    code = "conversations_unavailable"
    http_status = 500


# Pure helpers -------------------------------------------------------------------------------------
def title_of(text: str, limit: int = TITLE_CHARS) -> str:
    """A conversation's title from its first message: one line, at most ``limit`` characters."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def upstream(messages: Iterable[Message]) -> list[dict[str, str]]:
    """What a model is sent: the user's messages and the answers, in order; notes are for people only."""
    return [{"role": str(m.role), "content": m.content} for m in messages
            if m.role in (Role.USER, Role.ASSISTANT) and m.content]


def switch_note(messages: Iterable[Message], model_id: str, model_name: str) -> str | None:
    """The divider to record before ``model_id`` answers, when the conversation's last model was another."""
    last = next((m.model_id for m in reversed(list(messages)) if m.model_id), None)
    return f"— switched to {model_name} —" if last is not None and last != model_id else None


# The store ----------------------------------------------------------------------------------------
class ConversationStore:
    """Conversations of every user in one SQLite file (or ``":memory:"``); safe to call from any thread."""

    def __init__(self, path: Path | str) -> None:
        self.path = path if path == MEMORY else Path(path)
        self._db = _open(self.path)
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Callable[[], None]]] = {}
        self._subscribers_lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._db.close()

    # Reads ------------------------------------------------------------------------------------
    def conversations(self, user: str) -> list[Conversation]:
        """The user's conversations, the most recently used first."""
        rows = self._read("SELECT id, title, created_at, updated_at FROM conversations WHERE user = ? "
                          "ORDER BY updated_at DESC, id DESC", (user,))
        return [Conversation(*row) for row in rows]

    def current(self, user: str) -> Conversation | None:
        """What the user's tabs show; None when they have started a new one and not written in it yet."""
        rows = self._read("SELECT c.id, c.title, c.created_at, c.updated_at FROM current_conversation k "
                          "JOIN conversations c ON c.id = k.conversation_id AND c.user = k.user WHERE k.user = ?",
                          (user,))
        return Conversation(*rows[0]) if rows else None

    def messages(self, user: str, conversation_id: int) -> list[Message]:
        """A conversation's messages, oldest first; none when it is not this user's."""
        rows = self._read("SELECT m.id, m.conversation_id, m.role, m.content, m.at, m.model_id, m.model_name "
                          "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                          "WHERE c.id = ? AND c.user = ? ORDER BY m.id", (conversation_id, user))
        return [Message(id_, cid, Role(role), content, at, model_id, name)
                for id_, cid, role, content, at, model_id, name in rows]

    # Writes -----------------------------------------------------------------------------------
    def add(self, user: str, role: Role, content: str, *, conversation_id: int | None = None,
            model_id: str | None = None, model_name: str | None = None) -> Message | None:
        """Append a message to ``conversation_id``, or to the user's current conversation (a new one, made
        current, when there is none). None, and nothing written, when that conversation is gone (cleared
        while a reply to it was on its way)."""
        role = Role(role)
        now = time.time()

        def write(db: sqlite3.Connection) -> Message | None:
            if conversation_id is None:
                cid = _current_id(db, user)
                if cid is None:
                    cid = db.execute("INSERT INTO conversations (user, title, created_at, updated_at) "
                                     "VALUES (?, '', ?, ?)", (user, now, now)).lastrowid
                    db.execute("INSERT OR REPLACE INTO current_conversation VALUES (?, ?)", (user, cid))
            elif db.execute("SELECT 1 FROM conversations WHERE id = ? AND user = ?",
                            (conversation_id, user)).fetchone():
                cid = conversation_id
            else:
                return None
            if role is Role.USER:
                db.execute("UPDATE conversations SET title = ? WHERE id = ? AND title = ''", (title_of(content), cid))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
            mid = db.execute("INSERT INTO messages (conversation_id, role, content, model_id, model_name, at) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (cid, str(role), content, model_id, model_name,
                                                           now)).lastrowid
            assert cid is not None and mid is not None
            return Message(mid, cid, role, content, now, model_id, model_name)

        return self._write(user, f"a message of {user}", write)

    def start_new(self, user: str) -> None:
        """The user's tabs show an empty conversation; it is made by the first message written in it."""
        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM current_conversation WHERE user = ?", (user,))
        self._write(user, f"a new conversation for {user}", write)

    def select(self, user: str, conversation_id: int) -> bool:
        """Make one of the user's conversations their current one; False when it is not theirs (or gone)."""
        def write(db: sqlite3.Connection) -> bool:
            if not db.execute("SELECT 1 FROM conversations WHERE id = ? AND user = ?",
                              (conversation_id, user)).fetchone():
                return False
            db.execute("INSERT OR REPLACE INTO current_conversation VALUES (?, ?)", (user, conversation_id))
            return True
        return self._write(user, f"conversation {conversation_id} of {user}", write)

    def clear(self, user: str, conversation_id: int | None = None) -> bool:
        """Delete one of the user's conversations (default: the current one) with its messages; False when
        there was none. Deleting the current one leaves the user an empty new one."""
        def write(db: sqlite3.Connection) -> bool:
            cid = _current_id(db, user) if conversation_id is None else conversation_id
            if cid is None:
                return False
            return _delete(db, user, [cid]) > 0
        return self._write(user, f"clearing a conversation of {user}", write)

    def clear_all(self, user: str) -> int:
        """Delete every conversation of the user; how many there were."""
        def write(db: sqlite3.Connection) -> int:
            ids = [cid for (cid,) in db.execute("SELECT id FROM conversations WHERE user = ?", (user,))]
            return _delete(db, user, ids)
        return self._write(user, f"clearing the conversations of {user}", write)

    # Change notification ----------------------------------------------------------------------
    def subscribe(self, user: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after each write to ``user``'s conversations, on the writer's thread (any
        thread: a UI marshals it onto its own loop). Returns the function that unsubscribes."""
        with self._subscribers_lock:
            self._subscribers.setdefault(user, []).append(callback)

        def unsubscribe() -> None:
            with self._subscribers_lock:
                callbacks = self._subscribers.get(user, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._subscribers.pop(user, None)
        return unsubscribe

    def _notify(self, user: str) -> None:
        with self._subscribers_lock:
            callbacks = list(self._subscribers.get(user, ()))
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken tab must not keep the others (or the writer) from hearing
                log.exception("conversations: a subscriber of %s failed", user)

    # Plumbing ---------------------------------------------------------------------------------
    def _read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise ConversationError(f"Cannot read the conversations in {self.path}: {exc}.",
                                        path=str(self.path)) from exc

    def _write(self, user: str, what: str, apply: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = apply(self._db)
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                log.error("conversations %s: cannot save %s: %s", self.path, what, exc)
                raise ConversationError(f"Cannot save {what} in {self.path}: {exc}. Free disk space or make it "
                                        "writable; the chat goes on meanwhile.", path=str(self.path)) from exc
        self._notify(user)  # outside the lock: a subscriber may read at once
        return result

    def _check_open(self) -> None:
        if self.closed:
            raise ConversationError(f"The conversations in {self.path} are closed (the server is stopping).",
                                    path=str(self.path))


def _current_id(db: sqlite3.Connection, user: str) -> int | None:
    row = db.execute("SELECT k.conversation_id FROM current_conversation k JOIN conversations c "
                     "ON c.id = k.conversation_id AND c.user = k.user WHERE k.user = ?", (user,)).fetchone()
    return row[0] if row else None


def _delete(db: sqlite3.Connection, user: str, ids: list[int]) -> int:
    owned = [cid for cid in ids if db.execute("SELECT 1 FROM conversations WHERE id = ? AND user = ?",
                                              (cid, user)).fetchone()]
    for cid in owned:
        db.execute("DELETE FROM messages WHERE conversation_id = ?", (cid,))
        db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
    db.execute("DELETE FROM current_conversation WHERE user = ? AND conversation_id NOT IN "
               "(SELECT id FROM conversations)", (user,))
    return len(owned)


def _open(path: Path | str) -> sqlite3.Connection:
    """Connect, in WAL mode with the schema; ``DataDirError`` saying what to do when the file can't be used."""
    if path != MEMORY:
        path = Path(path)
        create_private(path)  # 0600 like the rest of the data dir; SQLite gives its WAL files the same mode
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_S)
    try:
        if path != MEMORY:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a crash of the process
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError as exc:
        db.close()
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise DataDirError(f"{path} is not a usable SQLite database ({exc}). Move it aside (mv {path} "
                               f"{path}.broken; chat conversations start fresh).", path=str(path)) from exc
        raise DataDirError(f"Cannot open the conversations database {path}: {exc}. Make it and its folder "
                           "writable, or pass --data-dir DIR for another data dir.", path=str(path)) from exc
    return db


_stores: dict[Path, ConversationStore] = {}
_stores_lock = threading.Lock()


def store_for(data_dir: Path) -> ConversationStore:
    """The one store of ``data_dir`` in this process: sessions come and go, they all share it."""
    key = Path(os.path.abspath(Path(data_dir).expanduser()))
    with _stores_lock:
        store = _stores.get(key)
        if store is None or store.closed:
            store = _stores[key] = ConversationStore(key / FILE)
        return store


def close_store(data_dir: Path) -> None:
    """Close ``data_dir``'s store if this process opened one (when its server stops)."""
    key = Path(os.path.abspath(Path(data_dir).expanduser()))
    with _stores_lock:
        store = _stores.pop(key, None)
    if store is not None:
        store.close()
