"""What must outlive the process, in SQLite: load history, measured memory, audit log, engines."""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class History:
    """One SQLite file under the data dir; safe to call from any thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Load history -----------------------------------------------------------------------------
    def record_load(self, model_id: str, durations: dict[str, float], total_s: float, outcome: str,
                    bytes_total: int | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO loads VALUES (?, ?, ?, ?, ?, ?)",
                       (model_id, now, total_s, outcome, bytes_total, durations.get("loading_weights")))
            if outcome in ("success", "unloaded"):  # an unload's row carries its measured stop time
                db.executemany("INSERT INTO phase_durations VALUES (?, ?, ?, ?)",
                               [(model_id, phase, s, now) for phase, s in durations.items()])

    def record_milestones(self, model_id: str, timings: dict[str, tuple[float, float]]) -> None:
        """Each milestone's (seconds after the engine started, seconds before it was ready) in one load."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT INTO load_milestones VALUES (?, ?, ?, ?, ?)",
                           [(model_id, key, into, left, now) for key, (into, left) in timings.items()])

    def learned_milestones(self, model_id: str, window: int = 5) -> dict[str, tuple[float, float]]:
        """For each log milestone of this model: the medians of its timings over its last loads."""
        rows = self._query("SELECT key, seconds_in, seconds_left FROM load_milestones WHERE model_id = ? "
                           "ORDER BY at", (model_id,))
        past: dict[str, list[tuple[float, float]]] = {}
        for key, into, left in rows:
            past.setdefault(key, []).append((into, left))
        return {key: (statistics.median(i for i, _ in values[-window:]),
                      statistics.median(left for _, left in values[-window:])) for key, values in past.items()}

    def phase_history(self, model_id: str) -> dict[str, list[float]]:
        rows = self._query("SELECT phase, seconds FROM phase_durations WHERE model_id = ? ORDER BY at",
                           (model_id,))
        out: dict[str, list[float]] = {}
        for phase, seconds in rows:
            out.setdefault(phase, []).append(seconds)
        return out

    def throughput_gbps(self) -> float | None:
        """Measured weight-loading throughput over all successful loads (GB per second)."""
        rows = self._query("SELECT SUM(bytes_total), SUM(weights_s) FROM loads "
                           "WHERE outcome = 'success' AND bytes_total > 0 AND weights_s > 0")
        total_bytes, seconds = rows[0]
        return (total_bytes / 1e9) / seconds if total_bytes and seconds else None

    def loads(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._query("SELECT model_id, at, total_s, outcome FROM loads ORDER BY at DESC LIMIT ?",
                           (limit,))
        return [{"model_id": m, "at": at, "total_s": t, "outcome": o} for m, at, t, o in rows]

    def last_load(self) -> dict[str, dict[str, Any]]:
        """The newest load of each model."""
        rows = self._query("SELECT model_id, MAX(at), total_s, outcome FROM loads GROUP BY model_id")
        return {m: {"at": at, "total_s": t, "outcome": o} for m, at, t, o in rows}

    # Measured memory --------------------------------------------------------------------------
    def record_memory(self, model_id: str, gpu_gb: float, source: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO measured_memory VALUES (?, ?, ?, ?)",
                       (model_id, gpu_gb, source, time.time()))

    def measured_memory(self) -> dict[str, float]:
        return {m: gb for m, gb in self._query("SELECT model_id, gpu_gb FROM measured_memory")}

    # Audit log --------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str | None, outcome: str,
              detail: dict[str, Any] | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO audit (at, actor, action, target, outcome, detail) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (time.time(), actor, action, target, outcome, json.dumps(detail or {})))

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._query("SELECT at, actor, action, target, outcome, detail FROM audit "
                           "ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": at, "actor": actor, "action": action, "target": target, "outcome": outcome,
                 "detail": json.loads(detail or "{}")} for at, actor, action, target, outcome, detail in rows]

    # Engines we started (adoption after a restart) ---------------------------------------------
    def save_engine(self, record: EngineRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO engines VALUES (?, ?, ?, ?, ?, ?)",
                       (record.model_id, record.runtime, record.ref, record.port, record.declared_gb,
                        record.started_at))

    def forget_engine(self, model_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM engines WHERE model_id = ?", (model_id,))

    def engines(self) -> list[EngineRecord]:
        return [EngineRecord(*row) for row in self._query("SELECT * FROM engines")]

    # Small settings (last-used model per user, an unfinished switch) ---------------------------
    def set(self, key: str, value: str | None) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))

    def get(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None
