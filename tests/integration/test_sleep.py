"""Sleep mode as the fast path, against the sim engine's real /sleep, /wake_up and /is_sleeping."""

from __future__ import annotations

import threading

import httpx
import pytest

from dashboard.events import CompleteEvent, ErrorEvent, StageEvent, SwitchEvent
from tests.conftest import sim_processes, wait_for

CATALOG = """
[gpu]
source = "virtual"
total_gb = 80

[switching]
host_ram_gb = 30
stall_timeout_s = 5

[models.small]
name = "Small"
size_gb = 16
gpu_memory_gb = 20
sleep = true
args = ["--load-seconds", "1.0"]

[models.big]
name = "Big"
size_gb = 120
gpu_memory_gb = 70
args = ["--load-seconds", "1.0"]

[models.crasher]
name = "Crasher"
size_gb = 120
gpu_memory_gb = 70
args = ["--load-seconds", "1.0", "--fail-at", "weights"]
"""


@pytest.fixture
def catalog_text() -> str:
    return CATALOG


def events_of(port, target: str) -> tuple[SwitchEvent, list[SwitchEvent]]:
    events: list[SwitchEvent] = []
    final = port.switch_and_wait(target, "test", events.append, timeout=60)
    return final, events


def is_sleeping(port, model_id: str) -> bool:
    endpoint = port.status()["models"][model_id]["endpoint"]
    return httpx.get(f"{endpoint}/is_sleeping", timeout=5).json()["is_sleeping"]


def test_a_sleep_capable_model_sleeps_instead_of_stopping_and_wakes_fast(make_port) -> None:
    port = make_port()
    port.switch_and_wait("small", "test", timeout=60)
    endpoint = port.status()["models"]["small"]["endpoint"]
    plan = port.plan("big")
    assert plan["unload"] == ["small"] and plan["sleep"] == ["small"]

    final, events = events_of(port, "big")
    assert isinstance(final, CompleteEvent)
    assert any(isinstance(e, StageEvent) and "Small (to sleep)" in e.message for e in events)
    status = port.status()
    assert status["models"]["small"]["status"] == "sleeping"
    assert status["gpu"]["used_memory_gb"] == 71  # big's 70 + small's residual while asleep
    assert is_sleeping(port, "small")

    final, events = events_of(port, "small")
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert any(isinstance(e, StageEvent) and e.message == "Waking Small" for e in events)
    status = port.status()
    assert (status["models"]["small"]["status"], status["models"]["big"]["status"]) == ("running", "stopped")
    assert status["models"]["small"]["endpoint"] == endpoint  # the same engine, woken, not restarted
    assert not is_sleeping(port, "small")
    assert [e["action"] for e in port.audit_log()][:2] == ["switch", "wake"]


def test_rollback_wakes_the_model_put_to_sleep_for_a_failed_load(make_port) -> None:
    port = make_port()
    port.switch_and_wait("small", "test", timeout=60)
    final, _ = events_of(port, "crasher")
    assert isinstance(final, ErrorEvent) and final.details["restoring"] == ["small"]
    wait_for(lambda: port.status()["switch"] is None, timeout=30, message="the rollback to end")
    assert port.status()["models"]["small"]["status"] == "running"
    assert not is_sleeping(port, "small")


def test_without_host_ram_for_its_weights_the_model_is_stopped(make_port) -> None:
    port = make_port(CATALOG.replace("host_ram_gb = 30", "host_ram_gb = 10"))
    port.switch_and_wait("small", "test", timeout=60)
    assert port.plan("big")["sleep"] == []
    events_of(port, "big")
    assert port.status()["models"]["small"]["status"] == "stopped"
    assert len(sim_processes()) == 1


def test_sleep_waits_for_requests_in_flight(make_port) -> None:
    port = make_port()
    port.switch_and_wait("small", "test", timeout=60)
    done = threading.Event()
    with port.request("small"):
        threading.Thread(target=lambda: (port.sleep("small", "test"), done.set()), daemon=True).start()
        # While a proxied request is in flight the engine is not put to sleep.
        assert not done.wait(1.0)
        assert port.status()["models"]["small"]["status"] == "running"
    wait_for(done.is_set, timeout=10, message="the sleep to go ahead once the request ended")
    assert port.status()["models"]["small"]["status"] == "sleeping"
    port.wake("small", "test")
    assert port.status()["models"]["small"]["status"] == "running"
