"""What the history keeps (loads, stop times, settings), how it checks its file, and how it survives a busy one."""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dashboard.errors import DataDirError
from dashboard.orchestrator.history import History
from dashboard.orchestrator.progress import FALLBACK_UNLOAD_S, expected_stop


def test_a_measured_stop_time_feeds_the_next_unload_estimate(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    assert expected_stop(history.phase_history("big")) == FALLBACK_UNLOAD_S
    history.record_load("big", {"stopping": 0.3}, 0, "unloaded")
    history.record_load("big", {"stopping": 0.5}, 0, "unloaded")
    assert expected_stop(history.phase_history("big")) == 0.4


def test_a_failed_load_teaches_the_eta_nothing(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    history.record_load("big", {"loading_weights": 99.0}, 99.0, "failed")
    assert history.phase_history("big") == {}


def test_milestones_are_learned_as_the_median_of_recent_loads(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    for into, left in ((10.0, 3.0), (12.0, 4.0), (20.0, 8.0)):
        history.record_milestones("tiny", {"Worker default_loader.py:501": (into, left)})
    assert history.learned_milestones("tiny") == {"Worker default_loader.py:501": (12.0, 4.0)}
    assert history.learned_milestones("other") == {}


def test_every_successful_load_is_a_sample_the_box_learns_from(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    history.record_load("a", {"starting": 1.0, "loading_weights": 4.0}, 5.0, "success", bytes_total=8 * 10**9)
    history.record_load("b", {"loading_weights": 99.0}, 99.0, "failed", bytes_total=10**9)
    history.record_load("a", {"stopping": 0.4}, 0, "unloaded")
    history.record_load("b", {"starting": 2.0, "loading_weights": 1.0}, 3.0, "success")
    assert history.loads_recorded == 2  # what the estimates depend on changed twice
    assert history.load_samples() == [("a", 8 * 10**9, {"starting": 1.0, "loading_weights": 4.0}),
                                       ("b", None, {"starting": 2.0, "loading_weights": 1.0})]
    assert history.load_samples(limit=1) == [("b", None, {"starting": 2.0, "loading_weights": 1.0})]
    history.close()


def test_what_people_asked_for_leaves_out_refusals_and_the_orchestrators_own_actions(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    started = time.time()
    history.audit("api:key-alice", "switch", "qwen", "success")
    history.audit("api:key-bob", "switch", "big", "refused")
    history.audit("prewarm", "prewarm", "llama", "success")
    history.audit("orchestrator", "rollback", "qwen", "success")
    history.audit("dashboard:carol", "load", "llama", "failed")
    history.audit("dashboard:carol", "unload", "llama", "success")
    asked = history.asks(started - 1)
    assert [(action, model, actor) for action, model, actor, _ in asked] == [
        ("switch", "qwen", "api:key-alice"), ("load", "llama", "dashboard:carol")]
    assert [model for _, model, _, _ in history.asks(started - 1, ("unload", "sleep"))] == ["llama"]
    assert history.asks(time.time() + 60) == []
    history.close()


# The database checked at start ------------------------------------------------------------------
def test_a_file_that_is_not_a_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "smartswitch.sqlite"
    path.write_text("these are my notes, not a database\n" * 200)
    with pytest.raises(DataDirError) as info:
        History(path)
    assert str(path) in info.value.message
    assert "not an SQLite database" in info.value.message
    assert "Move it aside" in info.value.message


def test_a_corrupt_database_is_refused_with_a_hint_to_move_it_aside(tmp_path: Path) -> None:
    path = tmp_path / "smartswitch.sqlite"
    history = History(path)
    for i in range(300):
        history.audit("tester", "switch", f"model-{i}", "success", {"message": "x" * 200})
    history.close()
    page = 4096
    with open(path, "r+b") as f:  # garbage over the middle of every third page past the header page
        for offset in range(2 * page, path.stat().st_size, 3 * page):
            f.seek(offset + 100)
            f.write(bytes(range(256)) * 2)
    with pytest.raises(DataDirError) as info:
        History(path)
    assert str(path) in info.value.message
    assert "corrupt" in info.value.message
    assert f"mv {path}" in info.value.message


@contextmanager
def unprivileged() -> Iterator[None]:
    """Act as an ordinary user: root writes through any file mode, so read-only tests drop to nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can reach (pytest's own tmp dirs are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="smartswitch-ro-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder)


def test_a_read_only_database_file_is_refused_naming_the_file(open_dir: Path) -> None:
    path = open_dir / "smartswitch.sqlite"
    History(path).close()
    path.chmod(0o444)
    with unprivileged(), pytest.raises(DataDirError) as info:
        History(path)
    assert str(path) in info.value.message
    assert "read-only" in info.value.message


def test_a_read_only_data_dir_is_refused_naming_it(open_dir: Path) -> None:
    folder = open_dir / "data"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    with unprivileged(), pytest.raises(DataDirError) as info:
        History(folder / "smartswitch.sqlite")
    assert str(folder) in info.value.message
    assert "read-only" in info.value.message


# Bookkeeping never blocks the orchestrator --------------------------------------------------------
def hold_exclusive(path: Path, seconds: float) -> threading.Thread:
    """Another connection (as another process would) holds the write lock for ``seconds``."""
    ready = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        ready.set()
        time.sleep(seconds)
        db.execute("COMMIT")
        db.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    ready.wait(5)
    return thread


def test_a_write_while_the_database_is_locked_neither_raises_nor_blocks_and_lands_later(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    holder = hold_exclusive(history.path, 2.0)
    started = time.monotonic()
    history.audit("dashboard:alice", "switch", "big", "success")
    history.record_load("big", {"loading_weights": 1.0}, 1.0, "success", bytes_total=10**9)
    history.set_json("switch_in_progress", {"target": "big"})
    assert time.monotonic() - started < 0.2
    assert history.loads() == []  # readers are not blocked by the lock; the writes wait their turn
    holder.join()
    assert history.flush(10)
    assert [e["target"] for e in history.audit_log()] == ["big"]
    assert history.get_json("switch_in_progress") == {"target": "big"}
    assert history.write_failures == 0
    history.close()


def test_a_write_that_never_succeeds_is_dropped_counted_and_reported(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite", retry_for_s=0.5)
    reported: list[str] = []
    history.on_write_error = reported.append
    holder = hold_exclusive(history.path, 2.0)
    history.audit("api:key-1", "unload", "small", "success")
    assert history.flush(5)
    assert history.write_failures == 1
    assert history.last_write_error is not None and str(history.path) in history.last_write_error
    assert reported == [history.last_write_error]
    holder.join()
    history.audit("api:key-1", "load", "small", "success")  # the next write works again
    assert [e["action"] for e in history.audit_log()] == ["load"]
    history.close()


def test_a_read_right_after_a_write_sees_it(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    for i in range(50):
        history.set(f"last_used:user-{i}", f"model-{i}")
        assert history.get(f"last_used:user-{i}") == f"model-{i}"
    history.set_json("pins", ["a", "b"])
    assert history.get_json("pins") == ["a", "b"]
    history.set_json("pins", None)
    assert history.get_json("pins", default=[]) == []
    history.close()


def test_a_model_never_stopped_here_is_expected_to_stop_like_the_others(tmp_path: Path) -> None:
    history = History(tmp_path / "h.sqlite")
    history.record_load("big", {"stopping": 0.3}, 0, "unloaded")
    history.record_load("small", {"stopping": 0.1}, 0, "unloaded")
    assert expected_stop(history.phase_history("never-stopped")) == 0.2
    assert expected_stop(history.phase_history("big")) == 0.3  # its own, once it has one
    history.close()
