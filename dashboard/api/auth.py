"""Bearer API keys: from SMARTSWITCH_API_KEYS, else one generated key kept 0600 in the data dir."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from dashboard.errors import SmartswitchError

log = logging.getLogger(__name__)
KEYS_ENV = "SMARTSWITCH_API_KEYS"
KEY_FILE = "api-key"


class Unauthorized(SmartswitchError):
    code = "unauthorized"
    http_status = 401


class Forbidden(SmartswitchError):
    code = "forbidden"
    http_status = 403


def key_id(key: str) -> str:
    """A stable, non-secret name for a key, used in the audit log instead of the key."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def load_keys(data_dir: Path) -> list[str]:
    """The accepted keys; generates and stores one (mode 0600) when none is configured."""
    configured = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if configured:
        return configured
    path = data_dir / KEY_FILE
    if path.exists():
        key = path.read_text().strip()
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    log.warning("API key (%s) is in %s", key_id(key), path)
    return [key]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [(k.encode(), key_id(k)) for k in keys]

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
