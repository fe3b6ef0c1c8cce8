"""API keys, key ids, the data dir's privacy, the CLI's key-file rule and the switch rate limit, as pure pieces."""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from dashboard.api.auth import (
    KEYS_ENV,
    Forbidden,
    KeyRing,
    Unauthorized,
    check_keys,
    key_id,
    key_salt,
    load_keys,
    make_keyring,
)
from dashboard.api.limits import HttpLimits, refusal
from dashboard.api.ratelimit import RateLimiter
from dashboard.client import local_key, serves_at
from dashboard.config import ConfigError
from dashboard.errors import DataDirError
from dashboard.orchestrator.datadir import HOLDER_FILE, KEY_FILE, KEY_SALT_FILE, prepare_data_dir

LONG_A = "secret-a-0123456789"
LONG_B = "secret-b-0123456789"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def no_configured_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)


def test_generated_key_is_stored_private_and_reused(tmp_path: Path) -> None:
    first = load_keys(tmp_path)
    assert mode(tmp_path / KEY_FILE) == 0o600
    assert len(first[0]) >= 32
    assert load_keys(tmp_path) == first


def test_configured_keys_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, f"{LONG_A}, {LONG_B}")
    assert load_keys(tmp_path) == [LONG_A, LONG_B]
    assert not (tmp_path / KEY_FILE).exists()


def test_a_configured_key_shorter_than_16_characters_is_refused_without_showing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, f"{LONG_A},k1")
    with pytest.raises(ConfigError, match=r"key 2 of 2 is 2 characters long.*at least 16") as refused:
        check_keys(tmp_path)
    assert "k1" not in str(refused.value).replace("key 2", "")


def test_a_key_file_readable_by_others_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    load_keys(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    prepare_data_dir(tmp_path)  # tightens everything else at start, never a secret that may have leaked
    assert mode(tmp_path / KEY_FILE) == 0o644
    with pytest.raises(DataDirError, match=r"readable by others.*0644"):
        check_keys(tmp_path)
    with pytest.raises(DataDirError):
        load_keys(tmp_path)


@pytest.mark.parametrize(("content", "why"), [("", "is empty"), ("\n  \n", "is empty"),
                                              ("short-key", "9 characters long")])
def test_an_empty_or_short_key_file_is_refused(tmp_path: Path, content: str, why: str) -> None:
    path = tmp_path / KEY_FILE
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(DataDirError, match=why):
        check_keys(tmp_path)


def test_key_ids_are_salted_with_a_private_salt_that_lasts(tmp_path: Path) -> None:
    salt = key_salt(tmp_path)
    assert mode(tmp_path / KEY_SALT_FILE) == 0o600
    assert key_salt(tmp_path) == salt
    kid = key_id("k1" * 8, salt)
    assert kid.startswith("key-") and kid != "key-" + hashlib.sha256(b"k1" * 8).hexdigest()[:len(kid) - 4]
    assert key_id("k1" * 8, os.urandom(32)) != kid  # another data dir names the same key differently
    ring = make_keyring(tmp_path)
    assert ring.ids == [key_id((tmp_path / KEY_FILE).read_text().strip(), salt)]


def test_a_salt_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key_salt(tmp_path)
    (tmp_path / KEY_SALT_FILE).chmod(0o640)
    with pytest.raises(DataDirError, match="readable by others"):
        key_salt(tmp_path)


def test_keyring_tells_missing_from_wrong() -> None:
    salt = os.urandom(32)
    ring = KeyRing([LONG_A, LONG_B], salt)
    assert ring.authenticate(f"Bearer {LONG_B}") == key_id(LONG_B, salt)
    with pytest.raises(Unauthorized):
        ring.authenticate(None)
    with pytest.raises(Unauthorized):
        ring.authenticate("Basic abc")
    with pytest.raises(Forbidden):
        ring.authenticate("Bearer nope")
    assert "secret" not in key_id(LONG_A, salt)


def test_the_data_dir_its_folders_and_files_are_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "m.log").write_text("engine output")
    (data / "smartswitch.sqlite").write_text("")
    for path, m in ((data, 0o755), (data / "logs", 0o755), (data / "logs" / "m.log", 0o644),
                    (data / "smartswitch.sqlite", 0o644)):
        path.chmod(m)
    prepare_data_dir(data)
    assert mode(data) == 0o700
    assert mode(data / "logs") == 0o700 and mode(data / "virtual-gpu") == 0o700
    assert mode(data / "logs" / "m.log") == 0o600 and mode(data / "smartswitch.sqlite") == 0o600


def test_a_url_gets_the_local_key_only_from_the_server_that_holds_its_data_dir(tmp_path: Path) -> None:
    load_keys(tmp_path)
    key = (tmp_path / KEY_FILE).read_text().strip()
    assert local_key("http://127.0.0.1:5006", str(tmp_path)) is None  # no server holds the data dir
    (tmp_path / HOLDER_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "url": "http://127.0.0.1:5006", "started_at": 0, "command": "smartswitch serve"}))
    assert local_key("http://127.0.0.1:5006", str(tmp_path)) == key
    assert local_key("http://localhost:5006/", str(tmp_path)) == key
    assert local_key("http://127.0.0.1:5007", str(tmp_path)) is None  # another port: another server
    assert local_key("http://lab-box.example:5006", str(tmp_path)) is None  # another machine
    assert local_key("https://127.0.0.1:5006", str(tmp_path)) is None
    dead = {"pid": 2**22 + 12345, "url": "http://127.0.0.1:5006", "started_at": 0, "command": ""}
    (tmp_path / HOLDER_FILE).write_text(json.dumps(dead))
    assert local_key("http://127.0.0.1:5006", str(tmp_path)) is None  # its server is gone


def test_a_server_on_every_interface_answers_loopback_but_one_on_another_address_does_not() -> None:
    assert serves_at("http://0.0.0.0:5006", "http://127.0.0.1:5006")
    assert serves_at("http://127.0.0.1:5006", "http://[::1]:5006")
    assert not serves_at("http://10.1.2.3:5006", "http://127.0.0.1:5006")
    assert not serves_at("http://0.0.0.0:5006", "http://10.1.2.3:5006")
    assert not serves_at("http://127.0.0.1:5006", "http://127.0.0.1:notaport")


def test_requests_are_refused_on_their_header_alone() -> None:
    from tornado.httputil import HTTPHeaders, RequestStartLine

    limits = HttpLimits(max_body_bytes=1024)
    line = RequestStartLine("POST", "/v1/models/switch", "HTTP/1.1")
    assert refusal(line, HTTPHeaders({"Content-Length": "1024"}), limits) is None
    assert refusal(line, HTTPHeaders({"Content-Length": "1025"}), limits)[0] == 413
    assert refusal(line, HTTPHeaders({"Content-Length": "9" * 5000}), limits)[0] == 413
    status, _, body = refusal(line, HTTPHeaders({"X-Big": "x" * 70_000}), limits)
    assert status == 431 and body["error"] == "headers_too_large"


def test_rate_limit_allows_n_per_window_then_says_when() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.check("k", now=0) is None
    assert limiter.check("k", now=10) is None
    assert limiter.check("k", now=20) == 40
    assert limiter.check("other", now=20) is None
    assert limiter.check("k", now=61) is None
