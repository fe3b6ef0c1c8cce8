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
# Folders the server writes into: engine logs, and the virtual GPU's ledger of memory held after a stop.
PRIVATE_DIRS = ("logs", "virtual-gpu")
KEY_FILE = "api-key"  # the generated API key
KEY_SALT_FILE = "key-salt"  # the salt of the audit log's key ids
# Checked, never silently tightened: one that others could read is refused (it may have been read).
SECRET_FILES = frozenset({KEY_FILE, KEY_SALT_FILE})
SECRET_BYTES = 32


def prepare_data_dir(path: Path) -> Path:
    """Create the data dir private to its user (0700), and make an existing one of ours private.

    It holds the API key, secrets, the audit log and engine logs: nobody else on the machine has
    business reading any of it. Its folders are made 0700 and the files already in them 0600, so a
    data dir from an older version (or one a umask left open) is private from this start on.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _make_private(path, 0o700, follow=True)  # the data dir may be a link to where it really is
        for name in PRIVATE_DIRS:
            folder = path / name
            folder.mkdir(mode=0o700, exist_ok=True)
            _make_private(folder, 0o700)
        for folder in (path, *(path / name for name in PRIVATE_DIRS)):
            for entry in folder.iterdir():
                if entry.is_file() and not entry.is_symlink() and entry.name not in SECRET_FILES:
                    _make_private(entry, 0o600)
    except OSError as exc:
        raise DataDirError(f"Cannot use data dir {path}: {exc.strerror or exc}. "
                           "Pass --data-dir DIR for a directory this user can write.", data_dir=str(path)) from exc
    return path


def _make_private(path: Path, mode: int, follow: bool = False) -> None:
    """Take group and other permissions away from ``path`` if this user owns it (never widens)."""
    info = path.stat() if follow else path.lstat()
    if info.st_uid == os.geteuid() and not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & ~mode:
        path.chmod(stat.S_IMODE(info.st_mode) & mode)


def read_or_create_secret(path: Path) -> bytes:
    """A random secret kept in ``path`` (0600), made on first use; ``DataDirError`` when it is unusable.

    Refused rather than used when others can read it, or it is not ours: a secret others may have
    read is no secret.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DataDirError(f"Cannot create {path}: {exc.strerror or exc}.", path=str(path)) from exc
    else:
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(SECRET_BYTES).hex() + "\n")
    check_private_file(path)
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise DataDirError(f"{path} is not a secret this server wrote ({exc}). Delete it to have a new one "
                           "made.", path=str(path)) from exc
    if len(secret) < SECRET_BYTES // 2:
        raise DataDirError(f"{path} holds a secret too short to trust. Delete it to have a new one made.",
                           path=str(path))
    return secret


def check_private_file(path: Path) -> None:
    """Raise ``DataDirError`` unless ``path`` is a regular file of this user that others cannot read."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise DataDirError(f"Cannot read {path}: {exc.strerror or exc}.", path=str(path)) from exc
    if not stat.S_ISREG(info.st_mode):
        raise DataDirError(f"{path} is not a regular file (a link or a folder?): remove it.", path=str(path))
    if info.st_uid != os.geteuid():
        raise DataDirError(f"{path} belongs to another user (uid {info.st_uid}): remove it, or use a data dir "
                           "of your own.", path=str(path))
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise DataDirError(f"{path} is readable by others (mode {mode:04o}), so it may no longer be secret. "
                           f"Run `chmod 600 {path}` if you are sure nobody read it, or delete it to have a new "
                           "one made.", path=str(path), mode=f"{mode:04o}")


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
