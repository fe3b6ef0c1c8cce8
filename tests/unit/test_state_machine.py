"""The state machine in process, against scripted engines: every race we can name, in milliseconds."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from dashboard.errors import OperationInProgress
from dashboard.events import CancelledEvent, CompleteEvent, ErrorEvent, ProgressEvent, StageEvent
from dashboard.orchestrator.manager import Superseded
from dashboard.orchestrator.states import TRANSITIONS, InvalidTransition, ModelStatus, check_transition
from tests.unit.fake_engine import FakeFactory, Harness


@pytest.fixture
async def h(tmp_path: Path):
    harness = await Harness(tmp_path).start()
    yield harness
    await harness.close()


def audit(h: Harness, action: str | None = None) -> list[dict]:
    h.history.flush(5)
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
    h.history.flush(5)
    h.history.close()  # the process dies here: nothing else is written
    # ... and its tasks with it, the rollback their cancel hands over to included (their writes to the
    # closed file fail, as they would).
    while dead := [t for t in (h.orch.op and h.orch.op.task, *h.orch._background) if t is not None and not t.done()]:
        for task in dead:
            task.cancel()
        await asyncio.gather(*dead, return_exceptions=True)
    factory = FakeFactory()
    factory.auto_ready.add("qwen")  # before start: the restore may begin inside it
    again = await Harness(tmp_path, factory=factory).start()
    try:
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


# Chat traffic: the gate, the drain, the queue (issue 10) -------------------------------------------------
def traffic_catalog(*, drain_s: float = 5.0, queue: bool = False, queue_timeout_s: float = 5.0,
                    per_minute: int = 100) -> str:
    from tests.unit.fake_engine import CATALOG

    return (CATALOG.replace("host_ram_gb = 0", f"host_ram_gb = 0\ndrain_timeout_s = {drain_s}")
            + f"\n[server]\nswitch_on_request = {str(queue).lower()}\nqueue_timeout_s = {queue_timeout_s}\n"
            f"switches_per_minute = {per_minute}\n")


@pytest.fixture
async def q(tmp_path: Path):
    """An orchestrator whose chat requests for a model that is not running wait in the queue."""
    harness = await Harness(tmp_path, traffic_catalog(queue=True)).start()
    yield harness
    await harness.close()


async def test_a_request_is_admitted_only_while_its_model_serves_and_counted_until_released(h: Harness) -> None:
    from dashboard.errors import ModelNotRunning

    with pytest.raises(ModelNotRunning) as info:
        await h.admitted("qwen")
    assert info.value.http_status == 409
    assert 'POST /v1/models/switch {"target_model": "qwen"}' in info.value.message
    await h.bring_up("qwen")
    lease = await h.admitted("qwen")
    assert h.in_flight("qwen") == 1 and lease.endpoint
    lease.release()
    lease.release()  # twice is once
    await h.until(lambda: h.in_flight("qwen") == 0, "the release")


async def test_a_request_released_before_its_admission_is_never_counted(h: Harness) -> None:
    await h.bring_up("qwen")
    lease = h.lease("qwen")
    lease.release()  # the client went away before the orchestrator got to it
    await h.orch.admit(lease, queue=False)
    assert h.in_flight("qwen") == 0


async def test_an_unload_drains_first_new_requests_are_refused_and_in_flight_ones_finish(h: Harness) -> None:
    from dashboard.errors import ModelNotRunning

    await h.bring_up("qwen")
    lease = await h.admitted("qwen")
    unload = asyncio.ensure_future(h.orch.unload("qwen", "alice"))
    await h.until(lambda: "qwen" in h.orch.traffic.draining, "the drain")
    assert h.status("qwen") == "running" and not h.factory.latest("qwen").stopped
    with pytest.raises(ModelNotRunning, match="about to be unloaded"):
        await h.admitted("qwen")
    lease.release()
    await unload
    assert h.status("qwen") == "stopped" and lease.cut_reason is None
    assert "qwen" not in h.orch.traffic.draining


async def test_past_drain_timeout_the_request_is_cut_with_the_reason_and_the_stop_goes_ahead(tmp_path: Path) -> None:
    from dashboard.orchestrator.traffic import RequestCut

    h = await Harness(tmp_path, traffic_catalog(drain_s=0.2)).start()
    try:
        await h.bring_up("qwen")
        lease = await h.admitted("qwen")
        reply = asyncio.get_running_loop().create_future()  # a reply that would never end on its own

        async def relay() -> None:
            try:
                await lease.guard(reply)
            finally:
                lease.release()

        relaying = asyncio.ensure_future(relay())
        await h.orch.unload("qwen", "alice")
        with pytest.raises(RequestCut) as info:
            await relaying
        assert "drain_timeout_s = 0.2 s" in info.value.message and "unloaded" in info.value.message
        assert h.status("qwen") == "stopped" and h.in_flight("qwen") == 0
    finally:
        await h.close()


async def test_a_switch_drains_its_victim_and_says_how_many_requests_it_waits_for(h: Harness) -> None:
    await h.bring_up("qwen")
    lease = await h.admitted("qwen")
    h.factory.auto_ready.add("big")
    switch_id = await h.orch.switch("big", "test")

    def waiting_line() -> bool:
        return any(isinstance(e, ProgressEvent) and "Waiting for 1 request to finish on Qwen" in e.message
                   for e in h.switch_events(switch_id))
    await h.until(waiting_line, "the switch to say it waits for one request")
    await asyncio.sleep(0.05)
    assert h.status("qwen") == "running" and h.status("big") == "stopped"
    lease.release()
    await h.until(lambda: h.terminal(switch_id), "the switch to end")
    assert isinstance(h.terminal(switch_id), CompleteEvent)
    assert h.status("qwen") == "stopped" and h.status("big") == "running"


async def test_a_drain_called_off_by_a_newer_switch_leaves_the_model_serving(h: Harness) -> None:
    await h.bring_up("qwen")
    lease = await h.admitted("qwen")
    first = await h.orch.switch("big", "test")
    await h.until(lambda: "qwen" in h.orch.traffic.draining, "qwen draining")
    second = await h.switch_ready("small")  # fits beside qwen: nothing to unload
    assert isinstance(h.terminal(first), CancelledEvent) and isinstance(h.terminal(second), CompleteEvent)
    assert h.status("qwen") == "running" and "qwen" not in h.orch.traffic.draining
    assert lease.cut_reason is None
    again = await h.admitted("qwen")  # serving as before
    again.release()
    lease.release()


async def test_requests_on_a_model_that_fails_while_serving_are_cut_with_its_error(h: Harness) -> None:
    await h.bring_up("qwen")
    lease = await h.admitted("qwen")
    h.factory.latest("qwen").exit(-9, ("Killed",))
    await h.until(lambda: lease.cut_reason is not None, "the request to be cut")
    assert "exited unexpectedly" in (lease.cut_reason or "")


async def test_chats_for_two_models_at_once_both_complete_one_after_the_other(q: Harness) -> None:
    q.factory.auto_ready |= {"big", "qwen"}
    big_lease, big = q.queued("big")
    qwen_lease, qwen = q.queued("qwen")
    await big  # the longest-waiting model goes first
    assert q.status("big") == "running" and not qwen.done()
    assert q.orch.snapshot()["request_queue"] == {"qwen": 1}
    assert q.orch.snapshot()["request_queue_detail"]["qwen"]["waiting"] == 1
    await asyncio.sleep(0.05)
    assert q.status("big") == "running", "big is drained only of requests that finished"
    big_lease.release()
    await qwen
    assert q.status("qwen") == "running" and q.status("big") == "stopped"
    assert big_lease.cut_reason is None and qwen_lease.endpoint
    qwen_lease.release()
    assert q.orch.snapshot()["request_queue"] == {}


async def test_requests_for_the_same_model_share_one_load(q: Harness) -> None:
    waiters = [q.queued("qwen") for _ in range(5)]
    await loading(q, "qwen")
    assert q.orch.snapshot()["request_queue"] == {"qwen": 5}
    q.factory.latest("qwen").become_ready()
    await asyncio.gather(*(task for _, task in waiters))
    assert len([e for e in q.factory.started if e.spec.id == "qwen"]) == 1
    assert q.in_flight("qwen") == 5
    for lease, _ in waiters:
        lease.release()


async def test_a_request_for_the_serving_model_is_served_before_the_switch_away(q: Harness) -> None:
    await q.bring_up("qwen", "gpt20", "llama")
    serving = await q.admitted("qwen")  # in flight when a request for another model arrives
    q.factory.auto_ready.add("big")
    big_lease, big = q.queued("big")
    await q.until(lambda: "qwen" in q.orch.traffic.draining, "the switch to drain qwen")
    assert not big.done() and q.status("qwen") == "running"
    serving.release()
    await big
    assert q.status("big") == "running" and serving.cut_reason is None
    big_lease.release()


async def test_a_persons_switch_supersedes_the_queues_load_but_the_request_stays_queued(q: Harness) -> None:
    lease, waiting = q.queued("qwen")
    await loading(q, "qwen")
    q.factory.auto_ready |= {"big", "qwen"}
    person = await q.switch_ready("big")  # supersedes the queue's switch to qwen
    assert isinstance(q.terminal(person), CompleteEvent)
    await waiting  # then served: the scheduler switches to qwen once the slot is free
    assert q.status("qwen") == "running" and q.status("big") == "stopped"
    await q.until(lambda: q.orch.op is None, "the slot to be free")
    assert [(r["target"], r["outcome"]) for r in audit(q, "switch")] == [
        ("qwen", "cancelled"), ("big", "success"), ("qwen", "success")]
    lease.release()


async def test_a_queued_request_times_out_with_503_retry_after_and_the_reason(tmp_path: Path) -> None:
    from dashboard.orchestrator.traffic import QueueTimeout

    h = await Harness(tmp_path, traffic_catalog(queue=True, queue_timeout_s=0.3)).start()
    try:
        _, waiting = h.queued("qwen")
        with pytest.raises(QueueTimeout) as info:
            await waiting  # qwen never becomes ready
        assert info.value.http_status == 503 and info.value.details["retry_after_seconds"] >= 5
        assert "queue_timeout_s = 0.3 s" in info.value.message and "A switch to Qwen" in info.value.message
        assert h.orch.snapshot()["request_queue"] == {}
    finally:
        await h.close()


async def test_a_queued_request_whose_load_fails_gets_the_engines_error(q: Harness) -> None:
    from dashboard.orchestrator.traffic import ModelUnavailable

    _, waiting = q.queued("qwen")
    await loading(q, "qwen")
    q.factory.latest("qwen").exit(1, ("CUDA out of memory",))
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        await waiting


async def test_a_client_that_leaves_the_queue_leaves_nothing_behind(q: Harness) -> None:
    lease, waiting = q.queued("qwen")
    await q.until(lambda: q.orch.snapshot()["request_queue"] == {"qwen": 1}, "the request queued")
    waiting.cancel()
    lease.release()
    await q.until(lambda: q.orch.snapshot()["request_queue"] == {}, "the queue to empty")
    q.factory.latest("qwen").become_ready()
    await q.until(lambda: q.status("qwen") == "running", "qwen up")
    assert q.in_flight("qwen") == 0


async def test_every_engine_start_counts_against_its_actor(tmp_path: Path) -> None:
    from dashboard.api.ratelimit import RateLimited

    h = await Harness(tmp_path, traffic_catalog(queue=True, per_minute=2)).start()
    try:
        h.factory.auto_ready |= {"qwen", "gpt20", "llama", "small"}
        await h.orch.charged_switch("qwen", "dashboard:alice")
        await h.until(lambda: h.orch.op is None, "the switch to end")
        await h.orch.charged_load("gpt20", "dashboard:alice")
        with pytest.raises(RateLimited) as info:
            await h.orch.charged_switch("llama", "dashboard:alice")
        assert info.value.http_status == 429 and info.value.details["retry_after_seconds"] > 0
        with pytest.raises(RateLimited):
            await h.orch.charged_load("llama", "dashboard:alice")
        await h.orch.charged_load("llama", "dashboard:bob")  # per actor
        await h.until(lambda: h.orch.op is None, "the slot to be free")
        for _ in range(2):  # a request-triggered switch is an engine start too
            await h.orch.charged_switch("qwen", "api:key-1")
            await h.until(lambda: h.orch.op is None, "the switch to end")
        _, waiting = h.queued("small", "api:key-1")
        with pytest.raises(RateLimited):
            await waiting
        for _ in range(3):
            await h.orch.charged_switch("qwen", "test")  # code in this process is not limited
            await h.until(lambda: h.orch.op is None, "the switch to end")
        assert [r["action"] for r in audit(h) if r["outcome"] == "rate_limited"] == ["switch", "load", "switch"]
    finally:
        await h.close()


async def test_shutdown_ends_queued_requests_with_the_reason(tmp_path: Path) -> None:
    from dashboard.orchestrator.traffic import ModelUnavailable

    h = await Harness(tmp_path, traffic_catalog(queue=True)).start()
    _, waiting = h.queued("qwen")
    await loading(h, "qwen")
    await h.orch.shutdown()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await waiting
    h.history.close()


# A cancel while a victim goes to sleep ------------------------------------------------------------
SLEEPY = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
host_ram_gb = 100

[models.sleepy]
name = "Sleepy"
size_gb = 60
gpu_memory_gb = 60
sleep = true

[models.other]
name = "Other"
size_gb = 60
gpu_memory_gb = 60
"""


async def test_a_cancel_while_a_victim_goes_to_sleep_wakes_it_back(tmp_path: Path) -> None:
    h = await Harness(tmp_path, SLEEPY).start()
    try:
        await h.bring_up("sleepy")
        engine = h.orch.models["sleepy"].engine
        engine.sleep_gate.clear()  # the engine sleeps at once; its answer is held
        switch_id = await h.orch.switch("other", "test")
        await h.until(lambda: engine.asleep, "the victim asked to sleep")
        cancel = asyncio.ensure_future(h.orch.cancel("test"))
        engine.sleep_gate.set()
        assert await cancel
        await h.until(lambda: h.orch.op is None, "the rollback to end")
        assert isinstance(h.terminal(switch_id), CancelledEvent)
        # Known asleep when the cancel came, so the rollback woke it: it serves, and is awake.
        assert h.status("sleepy") == "running" and not engine.asleep
        assert h.orch.active == "sleepy"
    finally:
        await h.close()
