"""The users file: who may log in to the dashboard, one ``name:scrypt:salt:hash`` line each.

Passwords are stored as scrypt hashes (the standard library's, with a random salt per user), never as
text, and compared in constant time. ``smartswitch users add NAME`` writes a line; a line that does not
parse is reported with its number and field, like the catalog's errors.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from dashboard.errors import SmartswitchError

USERS_FILE = "users"  # in the data dir, unless --users names another
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 8
# scrypt's cost: about 50 ms and 16 MB per check on a server core; slows guessing, not people.
N, R, P = 2**14, 8, 1


class UsersFileError(SmartswitchError):
    code = "users_file_invalid"
    http_status = 500


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=32)
    return f"scrypt:{salt.hex()}:{digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    scheme, salt, digest = stored.split(":")
    if scheme != "scrypt":
        return False
    attempt = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=N, r=R, p=P, dklen=32)
    return hmac.compare_digest(attempt.hex(), digest)


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """name -> stored hash; ``UsersFileError`` naming the line and field of the first bad line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, stored = line.partition(":")
        where = f"{source}, line {number}"
        if not NAME.match(name):
            raise UsersFileError(f"{where}: user name {name!r} must be letters, digits, '.', '_', '@' or '-'.")
        parts = stored.split(":")
        if len(parts) != 3 or parts[0] != "scrypt" or not all(re.fullmatch(r"[0-9a-f]+", p) for p in parts[1:]):
            raise UsersFileError(f"{where}: the password of {name!r} must be a hash written by "
                                 f"'smartswitch users add {name}', not text.")
        if name in users:
            raise UsersFileError(f"{where}: user {name!r} is listed twice.")
        users[name] = stored
    return users


def read_users(path: Path) -> dict[str, str]:
    return parse_users(path.read_text(), str(path))


def write_user(path: Path, name: str, password: str) -> bool:
    """Add ``name`` or change its password; True when the user is new. The file stays 0600."""
    if not NAME.match(name):
        raise UsersFileError(f"user name {name!r} must be letters, digits, '.', '_', '@' or '-'.")
    if len(password) < MIN_PASSWORD:
        raise UsersFileError(f"the password must have at least {MIN_PASSWORD} characters.")
    users = read_users(path) if path.exists() else {}
    new = name not in users
    users[name] = hash_password(password)
    _write(path, users)
    return new


def remove_user(path: Path, name: str) -> bool:
    users = read_users(path) if path.exists() else {}
    if users.pop(name, None) is None:
        return False
    _write(path, users)
    return True


def _write(path: Path, users: dict[str, str]) -> None:
    text = "# smartswitch dashboard users: name:scrypt:salt:hash (edit with 'smartswitch users')\n"
    text += "".join(f"{name}:{stored}\n" for name, stored in sorted(users.items()))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the data dir it usually is
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # whole or not at all: a server reading it never sees half a file
