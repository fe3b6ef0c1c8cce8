"""One server per data dir: a second `smartswitch serve` on the same data dir refuses to start and
leaves the first one (and its engines) alone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dashboard.engines.process import free_port
from tests.conftest import TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for


@pytest.fixture
def first(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path, serve_catalog(TEST_CATALOG, switches_per_minute=1000))
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="every sim engine to exit with the server")


def test_a_second_server_on_the_same_data_dir_exits_naming_the_first_and_leaves_it_running(
        first: Server, tmp_path: Path) -> None:
    done = httpx.post(f"{first.url}/v1/models/switch", json={"target_model": "small", "stream": False},
                      headers=first.headers, timeout=60).json()
    assert done["event"] == "complete", done

    second = subprocess.run(
        [sys.executable, "-m", "dashboard.cli", "serve", "--config", str(tmp_path / "catalog.toml"),
         "--port", str(free_port()), "--data-dir", str(first.data_dir)],
        capture_output=True, text=True, timeout=60)

    assert second.returncode == 2, second.stderr
    assert f"PID {first.proc.pid}" in second.stderr
    assert first.url in second.stderr
    assert "--data-dir" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout

    status = httpx.get(f"{first.url}/v1/models/status", headers=first.headers, timeout=10).json()
    small = status["models"]["small"]
    assert small["status"] == "running"
    assert httpx.get(f"{small['endpoint']}/health", timeout=5).status_code == 200
    assert first.proc.poll() is None
