"""Pre-warming against real sim engine processes: it fills free room, and a person's switch kills it mid-load."""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboard.events import CompleteEvent, Event, StatusEvent
from dashboard.orchestrator.history import History
from tests.conftest import sim_processes, wait_for

CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 10
stop_timeout_s = 5
prewarm = true

[models.likely]
name = "Likely-70B"
size_gb = 40
gpu_memory_gb = 45
args = ["--read-gbps", "10", "--load-seconds", "3"]  # 7 s

[models.other]
name = "Other-8B"
size_gb = 16
gpu_memory_gb = 20
args = ["--read-gbps", "10", "--load-seconds", "0.5"]  # 2.1 s
"""


@pytest.fixture
def catalog_text() -> str:
    return CATALOG


def engines_of(data_dir: Path, model_id: str) -> list[str]:
    return [cmd for cmd in sim_processes(data_dir) if f"--model-id {model_id} " in cmd + " "]


def test_prewarm_loads_into_free_room_gives_way_to_a_switch_and_shows_in_status_events_and_audit(
        make_port, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    history = History(data_dir / "smartswitch.sqlite")  # Bob has been using Likely
    for _ in range(2):
        history.audit("api:key-bob", "switch", "likely", "success")
    history.close()
    port = make_port(data_dir=data_dir)
    port.core.prewarmer.idle_s = 0.2
    events: list[Event] = []
    port.subscribe(events.append)

    # Idle, with room: the pre-warmer starts Likely on its own, as its own operation.
    wait_for(lambda: port.status()["models"]["likely"]["status"] == "loading" and engines_of(data_dir, "likely"),
             timeout=15, message="the pre-warm of Likely to start its engine")
    operation = port.status()["operation"]
    assert (operation["kind"], operation["target_model"], operation["actor"]) == ("prewarm", "likely", "prewarm")
    assert port.status()["switch"] is None  # no banner: nobody is waiting for it

    # A person's switch to another model does not wait for it: the half-loaded engine is killed.
    final = port.switch_and_wait("other", "api:key-alice", timeout=30)
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert final.total_time_seconds < 5.0  # Likely alone takes 7 s to load
    wait_for(lambda: not engines_of(data_dir, "likely"), timeout=10, message="Likely's engine to be gone")
    assert port.status()["models"]["likely"]["status"] == "stopped"
    superseded = [e for e in port.audit_log() if e["action"] == "prewarm"]
    assert [(e["actor"], e["outcome"], e["detail"]["by"]) for e in superseded] == [("prewarm", "superseded", "other")]

    # Once it may try again, it loads Likely beside Other: never unloading it, and shown warm.
    port.core.prewarmer.held_off.clear()
    wait_for(lambda: port.status()["models"]["likely"]["warm"], timeout=20, message="Likely to be pre-warmed")
    status = port.status()
    assert status["models"]["likely"]["status"] == "running" and status["models"]["other"]["status"] == "running"
    assert status["active_model"] == "other"  # the pre-warmed model did not take the chat
    assert not status["models"]["other"]["warm"]
    assert any(isinstance(e, StatusEvent) and e.snapshot["models"]["likely"]["warm"] for e in events)
    outcomes = [e["outcome"] for e in port.audit_log() if e["action"] == "prewarm" and e["actor"] == "prewarm"]
    assert outcomes[0] == "success"
    assert not any(e["action"] in ("unload", "sleep") for e in port.audit_log())
