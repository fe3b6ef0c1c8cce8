"""API keys and the switch rate limit, as pure pieces."""

import os
import stat

import pytest

from dashboard.api.auth import KEYS_ENV, Forbidden, KeyRing, Unauthorized, key_id, load_keys
from dashboard.api.ratelimit import RateLimiter


def test_generated_key_is_stored_private_and_reused(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    first = load_keys(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "api-key").st_mode) == 0o600
    assert load_keys(tmp_path) == first


def test_configured_keys_win(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(KEYS_ENV, "one, two")
    assert load_keys(tmp_path) == ["one", "two"]
    assert not (tmp_path / "api-key").exists()


def test_keyring_tells_missing_from_wrong() -> None:
    ring = KeyRing(["secret-a", "secret-b"])
    assert ring.authenticate("Bearer secret-b") == key_id("secret-b")
    with pytest.raises(Unauthorized):
        ring.authenticate(None)
    with pytest.raises(Unauthorized):
        ring.authenticate("Basic abc")
    with pytest.raises(Forbidden):
        ring.authenticate("Bearer nope")
    assert "secret" not in key_id("secret-a")


def test_rate_limit_allows_n_per_window_then_says_when() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.check("k", now=0) is None
    assert limiter.check("k", now=10) is None
    assert limiter.check("k", now=20) == 40
    assert limiter.check("other", now=20) is None
    assert limiter.check("k", now=61) is None
