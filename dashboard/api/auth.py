"""Bearer API keys: from SMARTSWITCH_API_KEYS, else one generated key kept 0600 in the data dir.

Keys are checked at start: shorter than ``MIN_KEY_LENGTH``, or a key file that is empty or readable
by others, and the server refuses to start with a message that says what to do. The audit log names a
key by a salted hash (``key_id``); the salt is a secret of the data dir, so an audit log that leaks
does not let anyone test guesses of a key against it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from dashboard.config import ConfigError
from dashboard.errors import DataDirError, SmartswitchError
from dashboard.orchestrator.datadir import KEY_FILE, KEY_SALT_FILE, check_private_file, read_or_create_secret

log = logging.getLogger(__name__)
KEYS_ENV = "SMARTSWITCH_API_KEYS"
MIN_KEY_LENGTH = 16
NEW_KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

__all__ = ["KEYS_ENV", "KEY_FILE", "MIN_KEY_LENGTH", "Forbidden", "KeyRing", "Unauthorized", "check_keys",
           "key_id", "key_salt", "load_keys", "make_keyring"]


class Unauthorized(SmartswitchError):
    code = "unauthorized"
    http_status = 401


class Forbidden(SmartswitchError):
    code = "forbidden"
    http_status = 403


def key_id(key: str, salt: bytes) -> str:
    """A stable, non-secret name for a key, used in the audit log instead of the key."""
    return "key-" + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:10]


def key_salt(data_dir: Path) -> bytes:
    """The data dir's salt for key ids (made on first use, 0600): ids stay the same across restarts."""
    return read_or_create_secret(Path(data_dir) / KEY_SALT_FILE)


def _configured() -> list[str]:
    keys = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    for n, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(f"{KEYS_ENV}: key {n} of {len(keys)} is {len(key)} characters long; API keys must "
                              f"have at least {MIN_KEY_LENGTH}. Make one with: {NEW_KEY_HINT}")
    return keys


def _read_key_file(path: Path) -> str:
    check_private_file(path)  # others could read it: it may have been read, so it is not used
    key = path.read_text().strip()
    if not key:
        raise DataDirError(f"The API key file {path} is empty. Delete it to have a new key made at start, or "
                           f"write a key of at least {MIN_KEY_LENGTH} characters into it (mode 0600).",
                           path=str(path))
    if len(key) < MIN_KEY_LENGTH:
        raise DataDirError(f"The API key in {path} is {len(key)} characters long; API keys must have at least "
                           f"{MIN_KEY_LENGTH}. Delete the file to have a new key made at start.", path=str(path))
    return key


def check_keys(data_dir: Path) -> None:
    """Refuse, before anything starts, keys the server would refuse to use (``ConfigError``, ``DataDirError``)."""
    if _configured():
        return
    path = Path(data_dir) / KEY_FILE
    if path.exists() or path.is_symlink():
        _read_key_file(path)


def load_keys(data_dir: Path) -> list[str]:
    """The accepted keys; generates and stores one (mode 0600) when none is configured."""
    configured = _configured()
    if configured:
        return configured
    path = Path(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return [_read_key_file(path)]
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return [_read_key_file(path)]


def make_keyring(data_dir: Path) -> KeyRing:
    """The server's keys, salted with the data dir's salt; says where a generated key is kept."""
    keys = load_keys(data_dir)
    ring = KeyRing(keys, key_salt(data_dir))
    if not _configured():
        log.warning("API key (%s) is in %s", ring.ids[0], Path(data_dir) / KEY_FILE)
    return ring


class KeyRing:
    def __init__(self, keys: list[str], salt: bytes) -> None:
        self._keys = [(k.encode(), key_id(k, salt)) for k in keys]

    @property
    def ids(self) -> list[str]:
        return [kid for _, kid in self._keys]

    def authenticate(self, header: str | None) -> str:
        """The key id for an ``Authorization: Bearer KEY`` header; raises 401 or 403."""
        if not header:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer KEY'.")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("Malformed Authorization header: use 'Authorization: Bearer KEY'.")
        candidate = token.strip().encode()
        found = None
        for key, kid in self._keys:  # compare against every key: timing says nothing about which
            if hmac.compare_digest(candidate, key):
                found = kid
        if found is None:
            raise Forbidden("Wrong API key.")
        return found
