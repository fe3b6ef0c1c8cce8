"""One server per data dir: the lock names its holder, and a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dashboard.errors import DataDirError
from dashboard.orchestrator.datadir import HOLDER_FILE, LOCK_FILE, DataDirLock


def hold_in_subprocess(data_dir: Path, url: str) -> subprocess.Popen[str]:
    """Another process takes the lock and keeps it until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from dashboard.orchestrator.datadir import DataDirLock
        lock = DataDirLock(Path({str(data_dir)!r}))  # kept: a collected lock is released
        lock.acquire({url!r})
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_data_dir_in_use_is_refused_naming_the_holders_pid_and_url(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    holder = hold_in_subprocess(data_dir, "http://127.0.0.1:5006")
    try:
        with pytest.raises(DataDirError) as info:
            DataDirLock(data_dir).acquire("http://127.0.0.1:5007")
        message = info.value.message
        assert str(data_dir) in message
        assert f"PID {holder.pid}" in message
        assert "http://127.0.0.1:5006" in message
        assert "--data-dir" in message
        assert info.value.details["holder_pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_server_is_taken_over(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    holder = hold_in_subprocess(data_dir, "http://127.0.0.1:5006")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((data_dir / HOLDER_FILE).read_text())["pid"] == holder.pid  # stale, left behind

    lock = DataDirLock(data_dir)
    lock.acquire("http://127.0.0.1:5008")
    info = json.loads((data_dir / HOLDER_FILE).read_text())
    assert (info["pid"], info["url"]) == (os.getpid(), "http://127.0.0.1:5008")
    lock.release()
    assert not (data_dir / HOLDER_FILE).exists()


def test_a_released_lock_can_be_taken_again(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path / "data")
    first.acquire()
    with pytest.raises(DataDirError, match="in use by this process"):
        DataDirLock(tmp_path / "data").acquire()
    first.release()
    with DataDirLock(tmp_path / "data") as again:
        assert again.held


def test_the_data_dir_and_its_lock_files_are_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    with DataDirLock(data_dir):
        assert data_dir.stat().st_mode & 0o777 == 0o700
        assert (data_dir / LOCK_FILE).stat().st_mode & 0o777 == 0o600
        assert (data_dir / HOLDER_FILE).stat().st_mode & 0o777 == 0o600
