"""Shared fixtures: real orchestrators over real sim engine processes, always cleaned up."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dashboard.config import parse_config
from dashboard.engines.process import pid_cmdline
from dashboard.orchestrator.core import OrchestratorPort

SIM_MARK = "dashboard.engines.sim"


def sim_processes() -> list[str]:
    """Command lines of every sim engine still running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmd = pid_cmdline(int(entry.name))
            if SIM_MARK in cmd and "pytest" not in cmd:
                try:
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if state != "Z":
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
