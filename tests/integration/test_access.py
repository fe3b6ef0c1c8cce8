"""A real `smartswitch serve`: the dashboard behind a login beyond loopback, and only for its own Host names."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dashboard.users import write_user
from tests.conftest import TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for

PASSWORD = "alice's password"


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A server that is expected to refuse to start."""
    config = tmp_path / "catalog.toml"
    config.write_text(TEST_CATALOG)
    return subprocess.run([sys.executable, "-m", "dashboard.cli", "serve", "--config", str(config), "--port", "0",
                           "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=60)


def test_a_server_reachable_from_other_machines_needs_users_before_it_starts(tmp_path: Path) -> None:
    result = serve(tmp_path, "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "needs a login" in result.stderr and "smartswitch users add NAME" in result.stderr
    assert not sim_processes(tmp_path)


def test_a_users_file_with_a_typo_stops_the_start_naming_its_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    write_user(users, "alice", PASSWORD)
    users.write_text(users.read_text() + "bob:hunter2\n")
    result = serve(tmp_path, "--users", str(users))
    assert result.returncode == 2
    assert f"{users}, line 3: the password of 'bob' must be a hash" in result.stderr


def test_users_command_adds_lists_and_removes(tmp_path: Path) -> None:
    def users(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dashboard.cli", "users", *args, "--data-dir",
                               str(tmp_path)], input=stdin, capture_output=True, text=True, timeout=60)

    assert users("add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    short = users("add", "bob", "--password-stdin", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert users("list").stdout.split() == ["alice"]
    assert users("remove", "alice").returncode == 0
    assert users("list").stdout.split() == []


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("open")
    users = root / "users"
    write_user(users, "alice", PASSWORD)
    srv = Server(root, serve_catalog(TEST_CATALOG, page_views_per_minute=8),
                 args=["--host", "0.0.0.0", "--users", str(users), "--allow-host", "gpu-box.lab.example"])
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(root), timeout=15, message="every sim engine to exit with the server")


def test_the_dashboard_asks_for_a_login_and_checks_the_password(open_server: Server) -> None:
    with httpx.Client(base_url=open_server.url) as client:
        page = client.get("/")
        assert page.status_code == 302 and "login" in page.headers["location"]
        form = client.get("/login")
        assert form.status_code == 200 and 'name="password"' in form.text
        assert "cdn." not in form.text  # the login page, too, needs nothing from the internet
        wrong = client.post("/login", data={"username": "alice", "password": "guess"})
        assert wrong.status_code == 302 and "error=" in wrong.headers["location"]
        assert client.get("/").status_code == 302  # still locked out
        unknown = client.post("/login", data={"username": "mallory", "password": PASSWORD})
        assert "error=" in unknown.headers["location"]
        right = client.post("/login", data={"username": "alice", "password": PASSWORD})
        assert right.status_code == 302 and "error" not in right.headers["location"]
        assert client.get("/").status_code == 200


def test_requests_naming_a_foreign_host_are_refused_whatever_the_route(open_server: Server) -> None:
    for path in ("/", "/login", "/healthz", "/v1/models/status", "/ws"):
        response = httpx.get(open_server.url + path, headers={**open_server.headers, "Host": "evil.example"})
        assert response.status_code == 403, path
        assert response.json()["error"] == "host_not_allowed"
        assert "--allow-host" in response.json()["message"]
    allowed = httpx.get(open_server.url + "/healthz", headers={"Host": "gpu-box.lab.example:80"})
    assert allowed.status_code == 200


def test_a_client_opening_pages_too_fast_is_told_to_wait(open_server: Server) -> None:
    codes = [httpx.get(open_server.url + "/").status_code for _ in range(12)]
    assert 429 in codes
    refused = httpx.get(open_server.url + "/")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "too_many_page_views"
    assert httpx.get(open_server.url + "/v1/models/status", headers=open_server.headers).status_code == 200
