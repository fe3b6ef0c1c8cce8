"""What must outlive the process, in SQLite: load history, measured memory, audit log, engines.

Bookkeeping never blocks or kills the orchestrator: writes are queued to one writer thread that applies
them in order, retrying a busy or failing database for a bounded time before dropping the write (logged
and counted). Reads stay synchronous; WAL lets them run beside the writer.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dashboard.errors import DataDirError
from dashboard.orchestrator.datadir import create_private

log = logging.getLogger(__name__)
RETRY_FOR_S = 60.0  # how long a write may keep failing (locked, disk full) before it is dropped
READ_WAIT_S = 1.0  # how long a read waits for queued writes, so it sees what was just written
CLOSE_FLUSH_S = 5.0
WRITE_BUSY_S = 0.25  # the writer's own busy wait per attempt; the retry loop does the rest
READ_BUSY_S = 2.0
MAX_BACKOFF_S = 2.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS phase_durations (
    model_id TEXT NOT NULL, phase TEXT NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS load_milestones (model_id TEXT NOT NULL, key TEXT NOT NULL, seconds_in REAL NOT NULL,
                                            seconds_left REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS loads (
    model_id TEXT NOT NULL, at REAL NOT NULL, total_s REAL NOT NULL, outcome TEXT NOT NULL,
    bytes_total INTEGER, weights_s REAL);
CREATE TABLE IF NOT EXISTS measured_memory (
    model_id TEXT PRIMARY KEY, gpu_gb REAL NOT NULL, source TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS measured_by_devices (
    model_id TEXT NOT NULL, devices INTEGER NOT NULL, gpu_gb REAL NOT NULL, source TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (model_id, devices));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT, outcome TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS engines (
    model_id TEXT PRIMARY KEY, runtime TEXT NOT NULL, ref TEXT NOT NULL, port INTEGER NOT NULL,
    declared_gb REAL NOT NULL, started_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS phase_by_model ON phase_durations (model_id, phase, at);
"""


@dataclass(frozen=True)
class EngineRecord:
    """An engine this orchestrator started (pid or container id), for adoption after a restart."""

    model_id: str
    runtime: str
    ref: str
    port: int
    declared_gb: float
    started_at: float


@dataclass(frozen=True)
class _Write:
    what: str  # for the log line if it has to be dropped
    apply: Callable[[sqlite3.Connection], None]
    queued_at: float


class History:
    """One SQLite file under the data dir; safe to call from any thread.

    Opening checks the file (an SQLite database, intact, writable) and raises ``DataDirError`` with what
    to do. ``write_failures`` counts writes dropped after their retries, ``last_write_error`` says why
    the last one was, and ``on_write_error`` (when set) is called with that message from the writer thread.
    """

    def __init__(self, path: Path, *, retry_for_s: float = RETRY_FOR_S) -> None:
        self.path = Path(path)
        self.retry_for_s = retry_for_s
        self.write_failures = 0
        self.last_write_error: str | None = None
        self.loads_recorded = 0  # successful loads recorded by this process: what is learned from them changed
        self.on_write_error: Callable[[str], None] | None = None
        self._writer = open_checked(self.path)
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=READ_BUSY_S)
        self._read_lock = threading.Lock()
        self._jobs: queue.Queue[_Write | None] = queue.Queue()
        self._progress = threading.Condition()
        self._submitted = 0
        self._applied = 0
        self._stalled_since: float | None = None  # start of the current failure streak (logged once)
        self._retrying = False  # the writer is waiting to retry: readers don't wait for it
        self._read_failing = False
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="smartswitch-history", daemon=True)
        self._thread.start()

    # Writes: queued, applied in order by one thread --------------------------------------------
    def _submit(self, what: str, apply: Callable[[sqlite3.Connection], None]) -> None:
        if self._closed:
            log.warning("history %s is closed; not recorded: %s", self.path, what)
            return
        with self._progress:
            self._submitted += 1
        self._jobs.put(_Write(what, apply, time.monotonic()))

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._apply(job)
            with self._progress:
                self._applied += 1
                self._progress.notify_all()
        self._writer.close()

    def _apply(self, job: _Write) -> None:
        try:
            self._attempt(job)
        except Exception as exc:  # a bug in a write: drop it, keep the writer alive for the next ones
            log.exception("history %s: write %s failed", self.path, job.what)
            self._drop(job, f"({type(exc).__name__}: {exc})")
        finally:
            self._retrying = False

    def _attempt(self, job: _Write) -> None:
        delay = 0.05
        while True:
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    job.apply(self._writer)
                    self._writer.execute("COMMIT")
                except BaseException:
                    if self._writer.in_transaction:
                        self._writer.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:  # locked, busy, disk full, I/O error: may pass
                if self._stalled_since is None:
                    self._stalled_since = time.monotonic()
                    log.error("history %s: cannot write (%s); retrying each write for up to %g s, the "
                              "orchestrator goes on meanwhile", self.path, exc, self.retry_for_s)
                if not self._retrying:
                    self._retrying = True
                    with self._progress:
                        self._progress.notify_all()  # readers stop waiting for a write that is stuck
                age = time.monotonic() - job.queued_at
                if age >= self.retry_for_s or self._closing.is_set():
                    self._drop(job, f"after {age:.0f} s: {exc}")
                    return
                self._closing.wait(min(delay, self.retry_for_s - age))
                delay = min(delay * 2, MAX_BACKOFF_S)
            except sqlite3.Error as exc:  # corrupt or a bug: retrying would not help
                self._drop(job, str(exc))
                return
            else:
                if self._stalled_since is not None:
                    log.warning("history %s: writes work again after %.0f s", self.path,
                                time.monotonic() - self._stalled_since)
                    self._stalled_since = None
                return

    def _drop(self, job: _Write, why: str) -> None:
        message = f"history {self.path}: dropped a write ({job.what}) {why}"
        self.write_failures += 1
        self.last_write_error = message
        log.error(message)
        callback = self.on_write_error
        if callback is not None:
            try:
                callback(message)
            except Exception:  # a failing listener must not stop the writer
                log.exception("on_write_error callback failed")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued so far is applied (or dropped); False if ``timeout`` ran out.

        A write is retried for ``retry_for_s`` from when it was queued, so ``flush()`` ends within that.
        """
        with self._progress:
            target = self._submitted
            return self._progress.wait_for(lambda: self._applied >= target, timeout)

    def close(self, timeout: float = CLOSE_FLUSH_S) -> None:
        """Apply what is queued (for at most ``timeout`` seconds; the rest is dropped), then close."""
        if self._closed:
            return
        if not self.flush(timeout):
            log.error("history %s: closing with writes still failing; the rest are dropped", self.path)
        self._closed = True
        self._closing.set()
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * WRITE_BUSY_S + 1)
        with self._read_lock:
            self._reader.close()

    # Reads: synchronous, after the writes queued before them -------------------------------------
    def _await_writes(self) -> None:
        if threading.current_thread() is self._thread or self._retrying:
            return
        with self._progress:
            target = self._submitted
            self._progress.wait_for(lambda: self._applied >= target or self._retrying, READ_WAIT_S)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        """The rows, or None when the database cannot be read now (logged once per streak)."""
        self._await_writes()
        try:
            with self._read_lock:
                rows = self._reader.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if not self._read_failing:
                log.error("history %s: cannot read (%s); going on without history", self.path, exc)
            self._read_failing = True
            return None
        self._read_failing = False
        return rows

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._query(sql, args) or []

    # Load history -----------------------------------------------------------------------------
    def record_load(self, model_id: str, durations: dict[str, float], total_s: float, outcome: str,
                    bytes_total: int | None = None) -> None:
        now = time.time()
        durations = dict(durations)
        if outcome == "success":
            self.loads_recorded += 1

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO loads VALUES (?, ?, ?, ?, ?, ?)",
                       (model_id, now, total_s, outcome, bytes_total, durations.get("loading_weights")))
            if outcome in ("success", "unloaded"):  # an unload's row carries its measured stop time
                db.executemany("INSERT INTO phase_durations VALUES (?, ?, ?, ?)",
                               [(model_id, phase, s, now) for phase, s in durations.items()])
        self._submit(f"load of {model_id}: {outcome}", write)

    def record_milestones(self, model_id: str, timings: dict[str, tuple[float, float]]) -> None:
        """Each milestone's (seconds after the engine started, seconds before it was ready) in one load."""
        now = time.time()
        rows = [(model_id, key, into, left, now) for key, (into, left) in timings.items()]
        self._submit(f"load milestones of {model_id}",
                     lambda db: db.executemany("INSERT INTO load_milestones VALUES (?, ?, ?, ?, ?)", rows))

    def learned_milestones(self, model_id: str, window: int = 5) -> dict[str, tuple[float, float]]:
        """For each log milestone of this model: the medians of its timings over its last loads."""
        rows = self._rows("SELECT key, seconds_in, seconds_left FROM load_milestones WHERE model_id = ? "
                          "ORDER BY at", (model_id,))
        past: dict[str, list[tuple[float, float]]] = {}
        for key, into, left in rows:
            past.setdefault(key, []).append((into, left))
        return {key: (statistics.median(i for i, _ in values[-window:]),
                      statistics.median(left for _, left in values[-window:])) for key, values in past.items()}

    def phase_history(self, model_id: str) -> dict[str, list[float]]:
        """Seconds per phase in this model's past loads, oldest first. A model never stopped here gets the box's
        recent stop times under ``stopping`` (a stop is mostly the engine's own shutdown, alike for all)."""
        rows = self._rows("SELECT phase, seconds FROM phase_durations WHERE model_id = ? ORDER BY at",
                          (model_id,))
        out: dict[str, list[float]] = {}
        for phase, seconds in rows:
            out.setdefault(phase, []).append(seconds)
        if "stopping" not in out:
            box = self._rows("SELECT seconds FROM phase_durations WHERE phase = 'stopping' ORDER BY at DESC LIMIT 5")
            if box:
                out["stopping"] = [seconds for (seconds,) in reversed(box)]
        return out

    def load_samples(self, limit: int = 500) -> list[tuple[str, int | None, dict[str, float]]]:
        """The last ``limit`` successful loads of any model, oldest first: (model id, checkpoint bytes, seconds
        per load phase). What the box learns its read rate and its engines' start costs from."""
        rows = self._rows("SELECT l.model_id, l.at, l.bytes_total, p.phase, p.seconds FROM "
                          "(SELECT model_id, at, bytes_total FROM loads WHERE outcome = 'success' "
                          " ORDER BY at DESC LIMIT ?) l "
                          "JOIN phase_durations p ON p.model_id = l.model_id AND p.at = l.at ORDER BY l.at", (limit,))
        loads: dict[tuple[str, float], tuple[str, int | None, dict[str, float]]] = {}
        for model_id, at, bytes_total, phase, seconds in rows:
            loads.setdefault((model_id, at), (model_id, bytes_total, {}))[2][phase] = seconds
        return list(loads.values())

    def asks(self, since: float,
             actions: tuple[str, ...] = ("switch", "load", "wake")) -> list[tuple[str, str, str, float]]:
        """What people asked for since ``since`` (epoch seconds), oldest first: (action, model, actor, at).

        Requests refused or rate limited are left out (the same person asks again), and so is what the
        orchestrator and the pre-warmer did on their own."""
        marks = ", ".join("?" for _ in actions)
        rows = self._rows(f"SELECT action, target, actor, at FROM audit WHERE at >= ? AND action IN ({marks}) "
                          "AND target IS NOT NULL AND actor NOT IN ('orchestrator', 'prewarm') "
                          "AND outcome NOT IN ('refused', 'rate_limited') ORDER BY id", (since, *actions))
        return [(action, target, actor, at) for action, target, actor, at in rows]

    def loads(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._rows("SELECT model_id, at, total_s, outcome FROM loads ORDER BY at DESC LIMIT ?",
                          (limit,))
        return [{"model_id": m, "at": at, "total_s": t, "outcome": o} for m, at, t, o in rows]

    def last_load(self) -> dict[str, dict[str, Any]]:
        """The newest load of each model."""
        rows = self._rows("SELECT model_id, MAX(at), total_s, outcome FROM loads GROUP BY model_id")
        return {m: {"at": at, "total_s": t, "outcome": o} for m, at, t, o in rows}

    # Measured memory --------------------------------------------------------------------------
    def record_memory(self, model_id: str, gpu_gb: float, source: str, *, devices: int = 1) -> None:
        """A model's whole footprint, measured on ``devices`` GPUs (each has its own overhead: a footprint
        measured on one count says little about another)."""
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO measured_memory VALUES (?, ?, ?, ?)", (model_id, gpu_gb, source, now))
            db.execute("INSERT OR REPLACE INTO measured_by_devices VALUES (?, ?, ?, ?, ?)",
                       (model_id, devices, gpu_gb, source, now))
        self._submit(f"measured memory of {model_id}", write)

    def measured_memory(self, devices: dict[str, int] | None = None) -> dict[str, float]:
        """Each model's measured footprint: the latest one, or with ``devices`` (model -> its device count)
        the one measured on that count; a model measured before counts were kept keeps its old figure."""
        latest = {m: gb for m, gb in self._rows("SELECT model_id, gpu_gb FROM measured_memory")}
        if devices is None:
            return latest
        by_count: dict[str, dict[int, float]] = {}
        for model_id, count, gb in self._rows("SELECT model_id, devices, gpu_gb FROM measured_by_devices"):
            by_count.setdefault(model_id, {})[count] = gb
        found = {}
        for model_id, count in devices.items():
            if model_id in by_count:
                if count in by_count[model_id]:
                    found[model_id] = by_count[model_id][count]
            elif model_id in latest:
                found[model_id] = latest[model_id]
        return found

    # Audit log --------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str | None, outcome: str,
              detail: dict[str, Any] | None = None) -> None:
        # Serialised now: the caller may change ``detail`` later; anything odd in it becomes text.
        row = (time.time(), actor, action, target, outcome, json.dumps(detail or {}, default=str))
        self._submit(f"audit {action} {target or ''} by {actor}: {outcome}",
                     lambda db: db.execute("INSERT INTO audit (at, actor, action, target, outcome, detail) "
                                           "VALUES (?, ?, ?, ?, ?, ?)", row))

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._rows("SELECT at, actor, action, target, outcome, detail FROM audit "
                          "ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": at, "actor": actor, "action": action, "target": target, "outcome": outcome,
                 "detail": json.loads(detail or "{}")} for at, actor, action, target, outcome, detail in rows]

    # Engines we started (adoption after a restart) ---------------------------------------------
    def save_engine(self, record: EngineRecord) -> None:
        row = (record.model_id, record.runtime, record.ref, record.port, record.declared_gb, record.started_at)
        self._submit(f"engine record of {record.model_id}",
                     lambda db: db.execute("INSERT OR REPLACE INTO engines VALUES (?, ?, ?, ?, ?, ?)", row))

    def forget_engine(self, model_id: str) -> None:
        self._submit(f"forget engine of {model_id}",
                     lambda db: db.execute("DELETE FROM engines WHERE model_id = ?", (model_id,)))

    def engines(self) -> list[EngineRecord]:
        return [EngineRecord(*row) for row in self._rows("SELECT * FROM engines")]

    # Small settings (last-used model per user, an unfinished switch) ---------------------------
    def set(self, key: str, value: str | None) -> None:
        if value is None:
            self._submit(f"setting {key}", lambda db: db.execute("DELETE FROM settings WHERE key = ?", (key,)))
        else:
            self._submit(f"setting {key}",
                         lambda db: db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value)))

    def get(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_json(self, key: str, value: Any) -> None:
        """Store ``value`` as JSON; None removes the key."""
        self.set(key, None if value is None else json.dumps(value, default=str))

    def get_json(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default`` when absent or unreadable."""
        raw = self.get(key)
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("history %s: setting %r is not valid JSON; ignored", self.path, key)
            return default


def open_checked(path: Path) -> sqlite3.Connection:
    """Open (or create) the history database; ``DataDirError`` saying what to do when it can't be used."""
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"Cannot create {folder} for the history database: {exc.strerror or exc}. "
                           "Pass --data-dir DIR for a directory this user can write.", path=str(path)) from exc
    # SQLite keeps its WAL and shared-memory files beside the database: the folder must be writable too.
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise DataDirError(f"{folder} is read-only, so the history database {path} cannot be written there. "
                           f"Make it writable (chmod u+w {folder}) or pass --data-dir DIR for another one.",
                           path=str(path))
    if path.exists():
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as exc:
            raise DataDirError(f"The history database {path} is read-only ({exc.strerror}). Make it writable "
                               f"(chmod u+w {path}) or pass --data-dir DIR for another data dir.",
                               path=str(path)) from exc
    else:
        create_private(path)  # SQLite gives its WAL files the database's mode: 0600 too
    # Start-up may wait a little for a busy database; the writer's own attempts are short.
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=READ_BUSY_S)
    try:
        check_integrity(db, path)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA busy_timeout = {int(WRITE_BUSY_S * 1000)}")
    except sqlite3.OperationalError as exc:
        db.close()
        if "readonly" in str(exc):
            raise DataDirError(f"The history database {path} is read-only ({exc}). Make it and {folder} "
                               "writable or pass --data-dir DIR for another data dir.", path=str(path)) from exc
        raise DataDirError(f"Cannot open the history database {path}: {exc}. If another program holds it, "
                           "stop that program; or pass --data-dir DIR for another data dir.",
                           path=str(path)) from exc
    except BaseException:
        db.close()
        raise
    return db


def check_integrity(db: sqlite3.Connection, path: Path) -> None:
    move_aside = (f"Move it aside (mv {path} {path}.broken; history, the audit log and engine records will "
                  "start fresh), or pass --data-dir DIR for another data dir.")
    try:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB" or "not a database" in str(exc):
            raise DataDirError(f"{path} is not an SQLite database. {move_aside}", path=str(path)) from exc
        if isinstance(exc, sqlite3.OperationalError) and "malformed" not in str(exc):
            raise  # locked or unreadable: reported by the caller
        raise DataDirError(f"The history database {path} is corrupt ({exc}). {move_aside}",
                           path=str(path)) from exc
    problems = [line for row in rows for line in str(row[0]).splitlines()
                if line.strip() and line != "ok" and not line.startswith("***")]
    if problems:
        shown = "; ".join(problems[:2]) + (f"; and {len(problems) - 2} more" if len(problems) > 2 else "")
        raise DataDirError(f"The history database {path} is corrupt (integrity check: {shown}). {move_aside}",
                           path=str(path))
