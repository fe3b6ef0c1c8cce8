"""One server per data dir: an OS file lock held for the life of the process, and who holds it.

The lock is ``flock`` (through ``filelock``): the kernel drops it when its process dies, so a lock left
by a crashed server is simply taken over. Who holds it (PID, URL, start time, command) is kept in a
small JSON file beside it, so a second server can say whom to stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from dashboard.errors import DataDirError

log = logging.getLogger(__name__)
LOCK_FILE = "server.lock"
HOLDER_FILE = "server.json"
HOLDER_WAIT_S = 1.0  # how long to wait for a fresh holder to write who it is


def prepare_data_dir(path: Path) -> Path:
    """Create the data dir private to its user (0700), and make an existing one of ours private.

    It holds the API key and the audit log: nobody else on the machine has business reading it.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
    except OSError as exc:
        raise DataDirError(f"Cannot use data dir {path}: {exc.strerror or exc}. "
                           "Pass --data-dir DIR for a directory this user can write.", data_dir=str(path)) from exc
    return path


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def create_private(path: Path) -> None:
    """Create an empty file readable by its owner only (0600) unless it exists already."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a data dir's lock (as it wrote it when it took the lock)."""

    pid: int
    url: str | None
    started_at: float
    command: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        where = self.url or (f"no URL, command: {self.command}" if self.command else "no URL")
        return f"PID {self.pid}, {where}, since {when}"


class DataDirLock:
    """Held by the one server (or notebook orchestrator) that uses ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.lock_path = self.data_dir / LOCK_FILE
        self.holder_path = self.data_dir / HOLDER_FILE
        # Not thread-local: taken at start on one thread, released at exit on another.
        self._lock = FileLock(str(self.lock_path), mode=0o600, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, url: str | None = None) -> None:
        """Take the lock now or raise ``DataDirError`` naming its holder; never waits for it."""
        if self.held:
            return
        prepare_data_dir(self.data_dir)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise self._in_use_error() from None
        except OSError as exc:
            raise DataDirError(f"Cannot lock data dir {self.data_dir}: {exc.strerror or exc}. "
                               "Pass --data-dir DIR for a directory this user can write.",
                               data_dir=str(self.data_dir)) from exc
        # A holder file left by a dead server is stale: it is ours to overwrite now.
        holder = Holder(os.getpid(), url, time.time(), " ".join(sys.argv)[:300])
        try:
            write_private(self.holder_path, json.dumps(asdict(holder)))
        except OSError:
            self._lock.release()
            raise
        log.info("data dir %s locked by this server (PID %d)", self.data_dir, holder.pid)

    def release(self) -> None:
        if not self.held:
            return
        # Removed while still holding the lock: the next holder's file can't be the one deleted.
        holder = self.holder()
        if holder is not None and holder.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.holder_path.unlink()
        self._lock.release()

    def holder(self) -> Holder | None:
        """What the holder file says, if it is there and readable."""
        try:
            data = json.loads(self.holder_path.read_text())
            return Holder(int(data["pid"]), data.get("url"), float(data["started_at"]), str(data.get("command", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _in_use_error(self) -> DataDirError:
        # The holder writes its file right after it locks: give a server that is just starting a moment.
        deadline = time.monotonic() + HOLDER_WAIT_S
        holder = self.holder()
        while (holder is None or not pid_alive(holder.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
            holder = self.holder()
        if holder is not None and holder.pid == os.getpid():
            who = f"this process ({holder.describe()})"
        elif holder is not None and pid_alive(holder.pid):
            who = f"another smartswitch server ({holder.describe()})"
        else:
            who = "another smartswitch server (it is still starting; its PID is not recorded yet)"
        return DataDirError(f"Data dir {self.data_dir} is in use by {who}. "
                            "Stop it, or pass --data-dir DIR for a separate one.",
                            data_dir=str(self.data_dir), holder_pid=holder.pid if holder else None,
                            holder_url=holder.url if holder else None)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
