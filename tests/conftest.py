"""Shared fixtures: real orchestrators over real sim engine processes, always cleaned up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from dashboard.config import parse_config
from dashboard.engines.process import INSTANCE_ENV
from dashboard.orchestrator.core import OrchestratorPort

SIM_MARK = "dashboard.engines.sim"
# This session's temp root: only engines whose instance marker lies under it are ours to count, so a
# developer's `smartswitch serve` (or another test run) beside the tests is left out of the leak checks.
SESSION_ROOT: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp().resolve()
    SESSION_ROOT[:] = [root]
    return root


def sim_processes(under: Path | None = None) -> list[str]:
    """Command lines of this test session's sim engine processes still running (workers included);
    ``under`` narrows it to the engines of one data dir (one server's)."""
    if not SESSION_ROOT:
        return []
    root = (under or SESSION_ROOT[0]).resolve()
    found = []
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        marker = (proc.info["environ"] or {}).get(INSTANCE_ENV)
        if SIM_MARK in cmd and "pytest" not in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE \
                and marker and Path(marker).is_relative_to(root):
            found.append(cmd)
    return found


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll ``condition`` until it is truthy or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


# A 100 GB virtual GPU and small, fast sim models; some fail on purpose.
TEST_CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
strategy = "largest_first"
stall_timeout_s = 3
stop_timeout_s = 5

[models.big]
name = "Big-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "1.5"]

[models.medium]
name = "Medium-30B"
size_gb = 60
gpu_memory_gb = 40
args = ["--load-seconds", "2.5"]

[models.small]
name = "Small-8B"
size_gb = 16
gpu_memory_gb = 20
sleep = true
args = ["--load-seconds", "1.0"]

[models.crasher]
name = "Crasher"
size_gb = 50
gpu_memory_gb = 50
args = ["--load-seconds", "1.5", "--fail-at", "weights"]

[models.hanger]
name = "Hanger"
size_gb = 50
gpu_memory_gb = 50
args = ["--load-seconds", "1.0", "--hang-at", "kv_cache"]

[models.oom]
name = "OOM"
size_gb = 50
gpu_memory_gb = 50
args = ["--load-seconds", "1.0", "--oom"]

[models.fragile]
name = "Fragile"
size_gb = 10
gpu_memory_gb = 10
args = ["--load-seconds", "0.5", "--die-after-seconds", "1.5"]

[models.giant]
name = "Giant-400B"
size_gb = 800
gpu_memory_gb = 95
args = ["--load-seconds", "1.0"]
"""


@pytest.fixture
def catalog_text() -> str:
    return TEST_CATALOG


@pytest.fixture
def make_port(tmp_path: Path, catalog_text: str) -> Iterator[Callable[..., OrchestratorPort]]:
    """Start orchestrators on the test catalog; each is closed and checked for leftovers."""
    ports: list[OrchestratorPort] = []

    def start(text: str | None = None, data_dir: Path | None = None) -> OrchestratorPort:
        config = parse_config(text or catalog_text, "test.toml")
        port = OrchestratorPort(config, data_dir=data_dir or tmp_path / "data").start()
        ports.append(port)
        return port

    yield start
    for port in ports:
        port.close()
    wait_for(lambda: not sim_processes(), timeout=10, message="every sim engine to exit")


API_KEY = "test-key-0123456789"
OTHER_KEY = "other-key-9876543210"


class Server:
    """A real ``smartswitch serve`` process on a free port."""

    def __init__(self, root: Path, catalog: str, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        import os
        import subprocess
        import sys

        from dashboard.engines.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / "server-data"
        config = root / "catalog.toml"
        config.write_text(catalog)
        self.log_path = root / "server.log"
        env = {**os.environ, "SMARTSWITCH_API_KEYS": f"{API_KEY},{OTHER_KEY}", **(extra_env or {})}
        env.pop("SMARTSWITCH_CONFIG", None)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.cli", "serve", "--config", str(config), "--port", str(self.port),
             "--data-dir", str(self.data_dir), *(args or [])], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        import httpx

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, message="smartswitch serve to answer /healthz")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def stop(self) -> None:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()
            raise
        finally:
            self._log.close()


def serve_catalog(catalog: str, **server: object) -> str:
    """The test catalog with [server] settings added."""
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else
                      f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in server.items())
    return catalog + f"\n[server]\n{lines}\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    srv = Server(root, serve_catalog(TEST_CATALOG, switches_per_minute=1000, max_body_bytes=4096))
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="every sim engine to exit with the server")
