"""Dashboard login through Panel's own auth: its login page, secure cookie and ``pn.state.user``.

Panel's basic auth compares passwords as text from a JSON file; ours come from the users file as scrypt
hashes (``dashboard.users``), so the provider is Panel's with one method replaced: ``_validate``. The
file is read at each attempt (``smartswitch users add`` takes effect without a restart), and a client
that keeps failing is slowed down. Bokeh's handlers ask the provider before making a session, so no
session exists before a login.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any

from panel.auth import BasicAuthProvider, BasicLoginHandler

from dashboard.api.ratelimit import RateLimiter
from dashboard.users import UsersFileError, read_users, verify_password

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
COOKIE_SECRET_FILE = "cookie_secret"
FAILED_LOGINS_PER_MINUTE = 10


class UsersFileLogin(BasicLoginHandler):
    """Panel's login form, checked against the users file."""

    users_file: Path
    failures: RateLimiter

    def _validate(self, username: str, password: str) -> bool:
        client = self.request.remote_ip or "unknown"
        if self.failures.waiting(client) is not None:
            log.warning("login refused: too many failed logins from %s", client)
            return False
        try:
            stored = read_users(self.users_file).get(username)
        except (OSError, UsersFileError) as exc:
            log.error("login impossible: %s", exc)
            return False
        if stored is not None and verify_password(password, stored):
            log.info("login: %s from %s", username, client)
            return True
        self.failures.check(client)
        log.warning("failed login for %r from %s", username, client)
        return False


class UsersFileAuth(BasicAuthProvider):
    """Panel's ``BasicAuthProvider`` whose login form checks ``users_file``."""

    def __init__(self, users_file: Path, **params: Any) -> None:
        self.users_file = users_file
        self._handler: type[BasicLoginHandler] | None = None
        super().__init__(login_template=str(TEMPLATES / "login.html"),
                         logout_template=str(TEMPLATES / "logout.html"), **params)

    @property
    def login_handler(self) -> type[BasicLoginHandler]:
        if self._handler is None:  # a class of its own per server: Panel keeps handler settings on the class
            self._handler = type("Login", (UsersFileLogin,), {
                "users_file": self.users_file, "failures": RateLimiter(FAILED_LOGINS_PER_MINUTE),
                "_login_endpoint": self._login_endpoint, "_login_template": self._login_template})
        return self._handler


def cookie_secret(data_dir: Path) -> str:
    """The data dir's secret for signing login cookies (made once, 0600): logins survive a restart."""
    path = data_dir / COOKIE_SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        return secret
