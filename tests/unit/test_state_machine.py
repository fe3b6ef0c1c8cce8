"""The state machine in process, against scripted engines: every race we can name, in milliseconds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dashboard.errors import OperationInProgress
from dashboard.events import CancelledEvent, CompleteEvent, ErrorEvent, ProgressEvent, StageEvent
from dashboard.orchestrator.manager import Superseded
from dashboard.orchestrator.states import TRANSITIONS, InvalidTransition, ModelStatus, check_transition
from tests.unit.fake_engine import Harness


@pytest.fixture
async def h(tmp_path: Path):
    harness = await Harness(tmp_path).start()
    yield harness
    await harness.close()


def audit(h: Harness, action: str | None = None) -> list[dict]:
    h.history.flush(5) if hasattr(h.history, "flush") else None
    rows = list(reversed(h.history.audit_log(500)))
    return [r for r in rows if action is None or r["action"] == action]


async def loading(h: Harness, model_id: str) -> None:
    await h.until(lambda: h.status(model_id) == "loading" and h.orch.models[model_id].engine is not None
                  and h.orch.models[model_id].supervisor is not None, f"{model_id} loading")


# Defect 1 ------------------------------------------------------------------------------------------
async def test_cancel_restores_every_model_and_the_active_one_exactly(h: Harness) -> None:
    await h.bring_up("gpt20", "llama")
    await h.switch_ready("qwen")
    assert h.orch.active == "qwen"
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    h.factory.auto_ready |= {"qwen", "gpt20", "llama"}
    assert await h.orch.cancel("test")
    cancelled = h.terminal(switch_id)
    assert isinstance(cancelled, CancelledEvent) and "restoring" in cancelled.message
    await h.until(lambda: h.orch.op is None, "the rollback to end")
    assert {m: h.status(m) for m in ("qwen", "gpt20", "llama", "big")} == {
        "qwen": "running", "gpt20": "running", "llama": "running", "big": "stopped"}
    assert h.orch.active == "qwen"  # not the last one restored
    assert h.orch.snapshot()["active_model"] == "qwen"


async def test_cancel_shows_cancelling_at_once(h: Harness) -> None:
    await h.bring_up("qwen", "gpt20", "llama")
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    seen: list[str] = []
    h.orch.subscribe(lambda e: seen.append(getattr(e, "stage", "")) if isinstance(e, StageEvent) else None)
    h.factory.auto_ready |= {"qwen", "gpt20", "llama"}
    await h.orch.cancel("test")
    assert seen[0] == "cancelling"
    first = next(e for e in h.switch_events(switch_id) if isinstance(e, StageEvent) and e.stage == "cancelling")
    assert "restoring" in first.message and "Qwen" in first.message


# Defect 2 ------------------------------------------------------------------------------------------
async def test_engine_death_mid_load_fails_at_once_then_rolls_back_as_its_own_operation(h: Harness) -> None:
    await h.bring_up("qwen", "gpt20", "llama")
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    h.factory.latest("big").exit(-9, ("Killed",))
    await h.until(lambda: h.terminal(switch_id), "the error event")
    error = h.terminal(switch_id)
    # Reported before anything has been restored: the rollback's engines are not even ready yet.
    assert isinstance(error, ErrorEvent) and error.error == "engine_failed"
    assert "exited with code -9" in error.message and "Restoring" in error.message
    assert h.status("big") == "failed"
    assert not any(h.status(m) == "running" for m in ("qwen", "gpt20", "llama"))
    rollback = h.orch.snapshot()["switch"]
    assert rollback["kind"] == "rollback" and rollback["stage"] == "rolling_back"
    assert "Load of GPT-OSS-120B failed" in rollback["message"]
    # Nothing of the failed switch after its end: no "99 %, eta 0".
    after = h.switch_events(switch_id)
    assert after[-1] is error
    progress = [e for e in after if isinstance(e, ProgressEvent)]
    assert all(p.progress < 90 for p in progress)
    for model_id in ("qwen", "gpt20", "llama"):
        await h.until(lambda m=model_id: h.status(m) == "loading", f"{model_id} restarting")
        h.factory.latest(model_id).become_ready()
    await h.until(lambda: h.orch.op is None, "the rollback to end")
    assert all(h.status(m) == "running" for m in ("qwen", "gpt20", "llama"))
    rollbacks = audit(h, "rollback")
    assert rollbacks and rollbacks[-1]["outcome"] == "success"


async def test_a_stall_fails_the_load_and_kills_the_engine(h: Harness) -> None:
    switch_id = await h.orch.switch("qwen", "test")
    await loading(h, "qwen")
    engine = h.factory.latest("qwen")
    engine.stall()
    await h.until(lambda: h.terminal(switch_id), "the error event")
    assert h.terminal(switch_id).error == "engine_stalled"
    assert engine.killed and h.status("qwen") == "failed"
    assert h.orch.op is None  # nothing was unloaded: nothing to restore


# Defect 3 ------------------------------------------------------------------------------------------
async def test_a_switch_supersedes_a_manager_load_which_answers_409_and_is_audited(h: Harness) -> None:
    import asyncio

    load = asyncio.ensure_future(h.orch.load("qwen", "alice"))
    await loading(h, "qwen")
    switch_id = await h.switch_ready("gpt20")
    with pytest.raises(Superseded) as info:
        await load
    assert info.value.http_status == 409 and "GPT-OSS-20B" in info.value.message
    assert isinstance(h.terminal(switch_id), CompleteEvent)
    assert h.status("qwen") == "stopped" and h.factory.latest("qwen").killed
    assert [r["outcome"] for r in audit(h, "load")] == ["superseded"]


async def test_a_manager_action_during_a_switch_is_refused_with_409_naming_it(h: Harness) -> None:
    await h.bring_up("qwen")
    await h.orch.switch("big", "test")
    await loading(h, "big")
    for action in (h.orch.load("gpt20", "bob"), h.orch.unload("qwen", "bob"), h.orch.sleep("small", "bob"),
                   h.orch.set_pinned("qwen", True, "bob")):
        with pytest.raises(OperationInProgress) as info:
            await action
        assert "A switch to GPT-OSS-120B is in progress" in info.value.message
        assert info.value.http_status == 409
    refused = [r for r in audit(h) if r["outcome"] == "refused"]
    assert [r["action"] for r in refused] == ["load", "unload", "sleep", "pin"]
    assert all(r["actor"] == "bob" for r in refused)


# Defect 4 ------------------------------------------------------------------------------------------
async def test_shutdown_mid_switch_never_starts_an_engine_or_rolls_back(tmp_path: Path) -> None:
    h = await Harness(tmp_path).start()
    await h.bring_up("qwen", "gpt20", "llama")
    await h.orch.switch("big", "test")
    await loading(h, "big")
    starts = len(h.factory.started)
    await h.orch.shutdown()
    assert len(h.factory.started) == starts
    assert not any(isinstance(e, StageEvent) and e.stage == "rolling_back" for e in h.events)
    assert all(not e.running for e in h.factory.started)
    with pytest.raises(OperationInProgress):
        await h.orch.switch("qwen", "test")
    h.history.close()


# Races of the slot -----------------------------------------------------------------------------------
async def test_cancel_before_the_first_step_still_ends_and_audits_the_switch(h: Harness) -> None:
    switch_id = await h.orch.switch("qwen", "test")
    assert await h.orch.cancel("test")  # no await between: the switch's task never ran
    assert isinstance(h.terminal(switch_id), CancelledEvent)
    assert h.orch.op is None and h.status("qwen") == "stopped"
    assert [r["outcome"] for r in audit(h, "switch")] == ["cancelled"]


async def test_supersede_mid_load_kills_the_first_target_and_loads_the_second(h: Harness) -> None:
    first = await h.orch.switch("qwen", "test")
    await loading(h, "qwen")
    second = await h.switch_ready("gpt20")
    cancelled = h.terminal(first)
    assert isinstance(cancelled, CancelledEvent) and cancelled.superseded_by == "gpt20"
    assert isinstance(h.terminal(second), CompleteEvent)
    assert h.status("qwen") == "stopped" and h.status("gpt20") == "running"
    assert h.orch.active == "gpt20"


async def test_the_same_switch_twice_joins_the_one_under_way(h: Harness) -> None:
    first = await h.orch.switch("qwen", "test")
    assert await h.orch.switch("qwen", "test") == first


async def test_partial_rollback_restores_what_it_can_and_says_what_it_could_not(h: Harness) -> None:
    await h.bring_up("qwen", "gpt20", "llama")
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    h.factory.auto_ready |= {"qwen", "llama"}
    h.factory.fail_start.add("gpt20")  # a failure during the rollback
    h.factory.latest("big").exit(1, ("CUDA out of memory",))
    await h.until(lambda: h.terminal(switch_id), "the error")
    await h.until(lambda: h.orch.op is None, "the rollback to end")
    assert h.status("qwen") == "running" and h.status("llama") == "running"
    assert h.status("gpt20") == "failed" and "could not start" in h.orch.models["gpt20"].error
    rollback = audit(h, "rollback")[-1]
    assert rollback["outcome"] == "failed" and "GPT-OSS-20B" in rollback["detail"]["message"]


async def test_a_new_switch_supersedes_a_rollback(h: Harness) -> None:
    await h.bring_up("qwen", "gpt20", "llama")
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    h.factory.latest("big").exit()
    await h.until(lambda: h.terminal(switch_id), "the error")
    await h.until(lambda: h.status("qwen") == "loading", "the rollback to start qwen")
    second = await h.switch_ready("small")
    assert isinstance(h.terminal(second), CompleteEvent)
    assert h.status("small") == "running" and h.status("qwen") == "stopped"
    assert audit(h, "rollback")[-1]["outcome"] == "cancelled"


async def test_a_failed_wake_during_rollback_leaves_the_model_failed_not_stuck(h: Harness) -> None:
    await h.bring_up("small")
    await h.orch.sleep("small", "test")
    assert h.status("small") == "sleeping"
    h.factory.fail_wake.add("small")
    with pytest.raises(Exception, match="did not come back"):
        await h.orch.wake("small", "test")
    assert h.status("small") == "failed" and h.orch.op is None


# Defect 6 ------------------------------------------------------------------------------------------
async def test_a_locked_database_during_a_switch_neither_fails_it_nor_leaves_the_slot_stuck(h: Harness) -> None:
    await h.bring_up("qwen")
    blocker = sqlite3.connect(h.history.path, timeout=10)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        switch_id = await h.switch_ready("gpt20")
        assert isinstance(h.terminal(switch_id), CompleteEvent)
        assert h.orch.op is None
        await h.bring_up("llama")  # the slot is free: the next operation runs
        h.factory.latest("llama").exit()  # supervision still works after failed writes
        await h.until(lambda: h.status("llama") == "failed", "llama failed")
    finally:
        blocker.rollback()
        blocker.close()
    rows = audit(h)
    assert any(r["action"] == "switch" and r["outcome"] == "success" for r in rows)  # written once unlocked


# Defect 9 ------------------------------------------------------------------------------------------
async def test_pins_survive_a_restart(tmp_path: Path) -> None:
    h = await Harness(tmp_path).start()
    await h.orch.set_pinned("qwen", True, "alice")
    await h.orch.shutdown()
    h.history.close()
    again = await Harness(tmp_path).start()
    try:
        assert "qwen" in again.orch.pinned and again.orch.snapshot()["models"]["qwen"]["pinned"]
    finally:
        await again.close()


# Defect 8 (in process: the server dies with the switch's victims unloaded) --------------------------------
async def test_a_switch_cut_by_a_crash_restores_what_it_unloaded_on_the_next_start(tmp_path: Path) -> None:
    h = await Harness(tmp_path).start()
    await h.bring_up("qwen")
    switch_id = await h.orch.switch("big", "test")
    await loading(h, "big")
    h.orch.save_desired()
    h.history.flush(5) if hasattr(h.history, "flush") else None
    h.history.close()  # the process dies here: nothing else is written
    again = await Harness(tmp_path).start()
    try:
        again.factory.auto_ready.add("qwen")
        await again.until(lambda: again.status("qwen") == "running", "qwen restored")
        await again.until(lambda: again.orch.op is None, "the rollback to end")
        assert again.orch.active == "qwen"
        switch_rows = [r for r in audit(again, "switch") if r["detail"].get("switch_id") == switch_id]
        assert switch_rows[-1]["outcome"] == "failed" and switch_rows[-1]["detail"]["error"] == "interrupted"
    finally:
        await again.close()


# The table -----------------------------------------------------------------------------------------
def test_the_transitions_table_refuses_what_it_does_not_list() -> None:
    check_transition("m", ModelStatus.STOPPED, ModelStatus.LOADING)
    with pytest.raises(InvalidTransition):
        check_transition("m", ModelStatus.STOPPED, ModelStatus.SLEEPING.__class__("unloading"))
    assert set(TRANSITIONS) == set(ModelStatus)


def test_the_design_note_draws_the_same_table() -> None:
    note = (Path(__file__).parents[2] / "docs" / "state-machine.md").read_text()
    for new, sources in TRANSITIONS.items():
        for old in sources:
            assert f"| {old.value} | {new.value} |" in note, f"{old} -> {new} missing from the note"
    rows = [line for line in note.splitlines() if line.startswith("| ") and line.count("|") >= 4]
    drawn = {tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows}
    listed = {(old.value, new.value) for new, sources in TRANSITIONS.items() for old in sources}
    assert {d for d in drawn if d[0] in {s.value for s in ModelStatus}} == listed
