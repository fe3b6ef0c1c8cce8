"""Switching between real sim engine processes through the orchestrator, as a user sees it."""

from __future__ import annotations

import os
import signal
import threading

from dashboard.events import (
    CancelledEvent,
    CompleteEvent,
    ErrorEvent,
    ProgressEvent,
    StageEvent,
    SwitchEvent,
)
from tests.conftest import TEST_CATALOG, sim_processes, wait_for


def statuses(port) -> dict[str, str]:
    return {mid: m["status"] for mid, m in port.status()["models"].items()}


def switch(port, target: str) -> tuple[SwitchEvent, list[SwitchEvent]]:
    events: list[SwitchEvent] = []
    final = port.switch_and_wait(target, actor="test", on_event=events.append, timeout=60)
    return final, events


def test_switch_unloads_largest_model_first(make_port) -> None:
    port = make_port()
    assert switch(port, "big")[0].status == "success"
    assert switch(port, "small")[0].status == "success"
    # 60 + 20 of 100 GB used: the 40 GB model needs the largest one gone, and only that one.
    final, events = switch(port, "medium")
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert statuses(port)["big"] == "stopped"
    assert statuses(port)["small"] == "running"
    assert statuses(port)["medium"] == "running"
    assert port.status()["active_model"] == "medium"
    assert port.status()["gpu"]["used_memory_gb"] == 60
    assert any(isinstance(e, StageEvent) and e.stage == "unloading_models" and "Big-60B" in e.message
               for e in events)


def test_switch_events_are_ordered_with_monotonic_progress(make_port) -> None:
    port = make_port()
    switch(port, "big")
    switch(port, "small")
    final, events = switch(port, "medium")
    stages = [e.stage for e in events if isinstance(e, StageEvent)]
    assert stages == ["checking_memory", "unloading_models", "loading_target"]
    progress = [e.progress for e in events if isinstance(e, ProgressEvent)]
    assert progress == sorted(progress) and progress[-1] == 100
    assert all(0 <= p <= 100 for p in progress)
    assert events[-1] is final and sum(isinstance(e, CompleteEvent) for e in events) == 1
    weights = [e for e in events if isinstance(e, ProgressEvent) and e.phase == "loading_weights"]
    assert weights and abs(weights[-1].bytes_total - 60e9) < 0.01e9  # 60 GB checkpoint
    planned = [e for e in events if isinstance(e, ProgressEvent) and e.stage != "checking_memory"]
    assert all(e.eta_seconds is not None and e.eta_seconds >= 0 for e in planned)
    assert planned[-1].eta_seconds == 0 and planned[-1].phase == "ready"


def test_switch_to_running_model_is_already_loaded(make_port) -> None:
    port = make_port()
    switch(port, "small")
    final, _ = switch(port, "small")
    assert isinstance(final, CompleteEvent) and final.status == "already_loaded"


def test_cancel_mid_load_leaves_previous_state_intact(make_port) -> None:
    port = make_port()
    switch(port, "big")
    switch(port, "small")
    events: list[SwitchEvent] = []
    done = threading.Event()

    def run() -> None:
        port.switch_and_wait("medium", "test", on_event=events.append, timeout=60)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    wait_for(lambda: any(isinstance(e, ProgressEvent) and e.phase == "loading_weights" for e in events),
             message="medium to be loading weights")
    assert port.cancel("test") is True
    assert done.wait(30)
    assert isinstance(events[-1], CancelledEvent)
    # What the switch unloaded comes back in a rollback of its own, then nothing runs in the slot.
    wait_for(lambda: port.status()["switch"] is None, timeout=30, message="the rollback to end")
    assert statuses(port) | {"medium": "stopped"} == statuses(port)
    assert statuses(port)["big"] == "running" and statuses(port)["small"] == "running"
    assert port.status()["active_model"] == "small"


def test_crash_mid_load_rolls_back_to_previous_model(make_port) -> None:
    port = make_port()
    switch(port, "big")
    final, _ = switch(port, "crasher")
    assert isinstance(final, ErrorEvent) and final.error == "engine_failed"
    assert "simulated engine failure at weights" in final.message
    assert final.details["restoring"] == ["big"] and "Restoring Big-60B" in final.message
    wait_for(lambda: port.status()["switch"] is None, timeout=30, message="the rollback to end")
    assert statuses(port)["big"] == "running"
    assert port.status()["active_model"] == "big"
    assert [e["outcome"] for e in port.audit_log() if e["action"] == "rollback"] == ["success"]
    assert statuses(port)["crasher"] == "failed"
    assert "simulated engine failure" in port.status()["models"]["crasher"]["error"]


def test_engine_that_hangs_fails_on_the_stall_timeout(make_port) -> None:
    port = make_port()
    final, _ = switch(port, "hanger")
    assert isinstance(final, ErrorEvent) and final.error == "engine_stalled"
    assert "no output for 3 s" in final.message
    assert statuses(port)["hanger"] == "failed"


def test_out_of_memory_is_reported_with_the_engines_own_words(make_port) -> None:
    port = make_port()
    final, _ = switch(port, "oom")
    assert isinstance(final, ErrorEvent)
    assert "CUDA out of memory" in final.message


def test_infeasible_switch_fails_before_anything_is_unloaded(make_port) -> None:
    port = make_port()
    switch(port, "small")
    port.set_pinned("small", True, "test")
    final, events = switch(port, "giant")
    assert isinstance(final, ErrorEvent) and final.error == "insufficient_memory"
    assert (final.details["required_gb"], final.details["available_gb"], final.details["can_free_gb"]) == (95, 80, 0)
    assert "Unpin small" in final.message
    assert "medium" in final.details["suggestions"]
    assert not any(isinstance(e, StageEvent) and e.stage == "unloading_models" for e in events)
    assert statuses(port)["small"] == "running"


def test_new_switch_cancels_the_running_one(make_port) -> None:
    port = make_port()
    first: list[SwitchEvent] = []
    thread = threading.Thread(target=lambda: port.switch_and_wait("medium", "a", first.append, 60), daemon=True)
    thread.start()
    wait_for(lambda: any(isinstance(e, StageEvent) and e.stage == "loading_target" for e in first))
    final, _ = switch(port, "big")
    thread.join(30)
    assert isinstance(first[-1], CancelledEvent) and first[-1].superseded_by == "big"
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert statuses(port)["medium"] == "stopped" and statuses(port)["big"] == "running"


def test_a_switch_replaced_before_it_started_is_still_ended_and_audited(make_port) -> None:
    port = make_port()

    async def back_to_back() -> tuple[str, str]:
        # No await in between: the first switch's task has not taken a single step when it is replaced.
        first = await port.core.switch("medium", "a")
        return first, await port.core.switch("small", "b")

    first_id, second_id = port._run(back_to_back())
    wait_for(lambda: port.status()["switch"] is None, timeout=30, message="the second switch to end")
    outcomes = {e["detail"]["switch_id"]: e["outcome"] for e in port.audit_log() if e["action"] == "switch"}
    assert outcomes == {first_id: "cancelled", second_id: "success"}
    assert statuses(port)["small"] == "running" and statuses(port)["medium"] == "stopped"


def test_eta_is_learned_from_this_models_history(make_port) -> None:
    port = make_port()
    before = port.plan("small")["estimated_load_time_seconds"]
    switch(port, "small")
    port.unload("small", "test")
    after = port.plan("small")["estimated_load_time_seconds"]
    # The sim loads in about 1 s; the first estimate came from size / default throughput.
    assert before != after
    assert 0.5 < after < 3.0


def test_every_switch_is_in_the_audit_log_with_its_actor(make_port) -> None:
    port = make_port()
    port.switch_and_wait("small", actor="alice", timeout=60)
    port.switch_and_wait("crasher", actor="bob", timeout=60)
    log = port.audit_log()
    switches = [(e["actor"], e["target"], e["outcome"]) for e in log if e["action"] == "switch"]
    assert ("alice", "small", "success") in switches
    assert ("bob", "crasher", "failed") in switches


def test_restart_adopts_engines_that_kept_serving(make_port, tmp_path) -> None:
    port = make_port(data_dir=tmp_path / "shared")
    switch(port, "small")
    pid_before = sorted(sim_processes())
    port.close(stop_engines=False)
    assert sim_processes() == pid_before
    again = make_port(data_dir=tmp_path / "shared")
    assert statuses(again)["small"] == "running"
    final, _ = switch(again, "small")
    assert final.status == "already_loaded"
    assert any(e["action"] == "adopt" and e["outcome"] == "running" for e in again.audit_log())


def test_closing_the_orchestrator_leaves_no_engine_behind(make_port) -> None:
    port = make_port()
    switch(port, "big")
    switch(port, "small")
    assert len(sim_processes()) == 2
    port.close()
    assert sim_processes() == []


MEASURED = """
[gpu]
source = "virtual"
total_gb = 100

[models.underestimated]
name = "Underestimated"
size_gb = 16
gpu_memory_gb = 20
# The engine really takes 30 GB (the sim's last --gpu-memory-gb wins): the catalog guessed low.
args = ["--load-seconds", "0.5", "--gpu-memory-gb", "30"]
"""


def test_measured_footprint_replaces_the_catalog_estimate(make_port) -> None:
    port = make_port(MEASURED)
    assert port.plan("underestimated")["required_gb"] == 20
    switch(port, "underestimated")
    assert port.status()["models"]["underestimated"]["gpu_memory_used_gb"] == 30
    port.unload("underestimated", "test")
    assert port.plan("underestimated")["required_gb"] == 30
    assert port.status()["models"]["underestimated"]["gpu_memory_required_gb"] == 30


def test_engine_that_dies_while_serving_is_shown_failed_with_its_reason(make_port) -> None:
    port = make_port()
    assert switch(port, "fragile")[0].status == "success"
    wait_for(lambda: statuses(port)["fragile"] == "failed", timeout=10, message="the dead engine to show failed")
    wait_for(lambda: "endpoint" not in port.status()["models"]["fragile"], timeout=5, message="its exit")
    model = port.status()["models"]["fragile"]
    assert "exited unexpectedly" in model["error"] and "EngineCore encountered a fatal error" in model["error"]
    assert model["health"] == "unhealthy" and port.status()["active_model"] is None
    wait_for(lambda: port.status()["gpu"]["used_memory_gb"] == 0, timeout=2, message="its memory to be free")
    # Picking it again restarts it.
    assert switch(port, "fragile")[0].status == "success"


LEAKY_CATALOG = TEST_CATALOG + """
[models.leaky]
name = "Leaky-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "0.5", "--hold-memory-after-exit", "{hold}"]
"""


def test_next_load_waits_for_memory_a_stopped_engine_still_holds(make_port) -> None:
    port = make_port(LEAKY_CATALOG.replace("{hold}", "2"))
    switch(port, "leaky")
    final, events = switch(port, "medium")
    # Unloading Leaky-70B leaves 70 GB held by a leaked process for 2 s: only 30 of the 40 GB are free.
    waits = [e for e in events if isinstance(e, ProgressEvent) and "Waiting for GPU memory" in e.message]
    assert waits and "30.0 GB free, 40 GB needed" in waits[0].message
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert statuses(port)["leaky"] == "stopped" and statuses(port)["medium"] == "running"
    assert port.status()["gpu"]["used_memory_gb"] == 40


def test_memory_never_released_fails_the_switch_with_the_reason(make_port) -> None:
    text = LEAKY_CATALOG.replace("{hold}", "30").replace("stop_timeout_s = 5", "stop_timeout_s = 5\n"
                                                                                "memory_release_timeout_s = 1")
    port = make_port(text)
    switch(port, "leaky")
    final, _ = switch(port, "medium")
    assert isinstance(final, ErrorEvent) and final.error == "memory_not_released"
    assert "30.0 GB free, 40 GB needed" in final.message
    medium = port.status()["models"]["medium"]
    assert medium["status"] == "failed" and "not released" in medium["error"]
    assert statuses(port)["leaky"] == "stopped"  # no room to bring it back while the memory is held
    ledger = port.data_dir / "virtual-gpu"
    for holder in ledger.iterdir():  # end the leaked process now rather than in 30 s
        os.kill(int(holder.name), signal.SIGKILL)
    wait_for(lambda: port.status()["gpu"]["used_memory_gb"] == 0, timeout=10, message="the memory to come back")
