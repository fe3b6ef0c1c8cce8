"""Who may reach the server: the Host names it answers to, and the users file behind the login."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dashboard.api.hosts import HostPolicy, host_name, is_loopback
from dashboard.users import UsersFileError, parse_users, read_users, remove_user, verify_password, write_user


def test_a_loopback_server_answers_only_to_loopback_names_and_the_ones_it_was_given() -> None:
    policy = HostPolicy.for_bind("127.0.0.1", ("gpu-box.lab.example",))
    for host in ("127.0.0.1:5006", "localhost:5006", "LOCALHOST", "[::1]:5006", "gpu-box.lab.example:5006", None):
        assert policy.allows(host), host
    # A rebinding page names its own domain; a bare IP of another machine is no name of ours either.
    for host in ("evil.example:5006", "evil.example", "10.1.2.3:5006", "localhost.evil.example", ""):
        assert not policy.allows(host), host


def test_a_server_bound_beyond_loopback_also_answers_to_its_bind_address() -> None:
    policy = HostPolicy.for_bind("192.0.2.7")
    assert policy.allows("192.0.2.7:5006") and policy.allows("localhost:5006")
    assert not policy.allows("evil.example:5006")
    assert not HostPolicy.for_bind("127.0.0.1").allows("192.0.2.7:5006")


def test_host_names_and_loopback_binds_are_read_as_browsers_send_them() -> None:
    assert host_name("Example.COM:80") == "example.com"
    assert host_name("[::1]:5006") == "::1"
    assert host_name("example.com.") == "example.com"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")
    # Bokeh's websocket allow-list holds host:port pairs only.
    assert "localhost:5006" in HostPolicy.for_bind("127.0.0.1").origins(5006)


def test_users_are_stored_as_salted_hashes_in_a_private_file(tmp_path: Path) -> None:
    users = tmp_path / "data" / "users"
    assert write_user(users, "alice", "correct horse") is True
    assert write_user(users, "bob", "battery staple") is True
    assert write_user(users, "alice", "new password!") is False  # a new password, not a second alice
    text = users.read_text()
    assert "correct horse" not in text and "new password!" not in text
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    stored = read_users(users)
    assert sorted(stored) == ["alice", "bob"]
    assert verify_password("new password!", stored["alice"])
    assert not verify_password("correct horse", stored["alice"])
    assert stored["alice"] != stored["bob"]
    assert remove_user(users, "bob") and not remove_user(users, "bob")
    assert list(read_users(users)) == ["alice"]


def test_a_bad_users_file_names_its_line_and_what_is_wrong() -> None:
    good = "# comment\n\nalice:scrypt:00ff:aabb\n"
    assert list(parse_users(good)) == ["alice"]
    with pytest.raises(UsersFileError, match="line 2: the password of 'bob' must be a hash"):
        parse_users("alice:scrypt:00ff:aabb\nbob:hunter2\n")
    with pytest.raises(UsersFileError, match="line 1: user name 'al ice'"):
        parse_users("al ice:scrypt:00:00\n")
    with pytest.raises(UsersFileError, match="line 2: user 'alice' is listed twice"):
        parse_users("alice:scrypt:00:00\nalice:scrypt:00:00\n")


def test_short_passwords_and_odd_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="at least 8"):
        write_user(tmp_path / "users", "alice", "short")
    with pytest.raises(UsersFileError, match="user name"):
        write_user(tmp_path / "users", "../alice", "long enough")
    assert not (tmp_path / "users").exists()
