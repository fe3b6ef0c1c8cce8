"""Pre-warming in process, against scripted engines: it only uses free room, gives way at once, and shows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dashboard.config import ConfigError, parse_config
from dashboard.events import CompleteEvent, ProgressEvent, StatusEvent
from dashboard.orchestrator.operations import SUPERSEDES, OpKind, supersedes
from dashboard.orchestrator.prewarm import Ask, Candidate, choose, likelihoods
from tests.unit.fake_engine import CATALOG, Harness

PREWARM_CATALOG = CATALOG.replace("host_ram_gb = 0", "host_ram_gb = 100\nprewarm = true")
DAY = 86_400.0


async def harness(tmp_path: Path, *asked: str, actor: str = "api:key-alice") -> Harness:
    """An orchestrator with pre-warming on, no quiet period, and a history of what people asked for."""
    h = Harness(tmp_path, PREWARM_CATALOG)
    for model_id in asked:
        h.history.audit(actor, "switch", model_id, "success")
    h.orch.prewarmer.idle_s = 0.0
    return await h.start()


def audit(h: Harness, action: str) -> list[dict]:
    h.history.flush(5)
    return [r for r in reversed(h.history.audit_log(500)) if r["action"] == action]


def model(h: Harness, model_id: str) -> dict:
    return h.orch.snapshot()["models"][model_id]


# Who is likely next (pure) ----------------------------------------------------------------------------
def test_a_lab_that_asks_for_one_model_in_the_morning_and_another_after_lunch_gets_each_at_its_hour() -> None:
    nine = 30 * DAY + 9 * 3600  # a day in UTC, so the local time is the clock time
    asks = [Ask("coder", nine - 2 * DAY), Ask("chat", nine - 2 * DAY + 6 * 3600),
            Ask("coder", nine - DAY), Ask("chat", nine - DAY + 6 * 3600)]
    morning = likelihoods(asks, nine + 300)
    afternoon = likelihoods(asks, nine + 6 * 3600 + 300)
    assert morning["coder"] > morning["chat"]
    assert afternoon["chat"] > afternoon["coder"]
    assert sum(morning.values()) == pytest.approx(1.0)


def test_what_was_asked_lately_and_often_is_more_likely() -> None:
    now = 1_000_000.0
    often = [Ask("often", now - 3600 * i) for i in range(1, 9)]
    assert max((s, m) for m, s in likelihoods([*often, Ask("once", now - 7200)], now).items())[1] == "often"
    recent = likelihoods([Ask("a", now - 600), Ask("b", now - 500), Ask("c", now - 60)], now)
    assert recent["c"] > recent["b"] > recent["a"]
    assert likelihoods([], now) == {}


def test_choose_takes_the_likeliest_that_fits_and_wakes_a_sleeper_first_on_a_tie() -> None:
    shares = {"big": 0.5, "a": 0.2, "b": 0.2, "rare": 0.05}
    candidates = [Candidate("big", False, fits=False), Candidate("a", False, True), Candidate("b", True, True),
                  Candidate("rare", False, True)]
    assert choose(shares, candidates) == "b"
    assert choose(shares, [Candidate("rare", False, True)]) is None  # not worth a load
    assert choose({}, candidates) is None


def test_a_cold_load_is_worth_it_at_modest_odds_a_wake_only_when_more_likely_than_not() -> None:
    # A load saves 50 s for a 2 s stop when wrong; a wake saves 3 s for a 3 s sleep when wrong.
    cold = Candidate("coder", asleep=False, fits=True, saved_s=50.0, undo_s=2.0)
    asleep = Candidate("chat", asleep=True, fits=True, saved_s=3.0, undo_s=3.0)
    assert choose({"coder": 0.2, "chat": 0.45}, [cold, asleep]) == "coder"
    assert choose({"chat": 0.45}, [asleep]) is None
    assert choose({"chat": 0.6}, [asleep]) == "chat"


def test_a_person_supersedes_a_prewarm_whatever_they_ask() -> None:
    for kind in (OpKind.SWITCH, OpKind.LOAD, OpKind.UNLOAD, OpKind.SLEEP, OpKind.WAKE, OpKind.PIN, OpKind.UNPIN,
                 OpKind.ROLLBACK, OpKind.SHUTDOWN):
        assert supersedes(kind, OpKind.PREWARM), kind
    assert OpKind.PREWARM not in SUPERSEDES  # and it never supersedes anything


def test_prewarm_is_off_unless_the_catalog_turns_it_on() -> None:
    assert not parse_config(CATALOG).switching.prewarm
    assert parse_config(PREWARM_CATALOG).switching.prewarm
    with pytest.raises(ConfigError, match=r"prewarm: must be true or false"):
        parse_config(CATALOG.replace("host_ram_gb = 0", 'prewarm = "yes"'))


# In the orchestrator ----------------------------------------------------------------------------------
async def test_prewarm_loads_the_likely_model_into_free_room_and_shows_it_everywhere(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen", "qwen", "qwen")
    h.factory.auto_ready.add("qwen")
    await h.until(lambda: model(h, "qwen")["warm"], "qwen to be pre-warmed")
    assert h.status("qwen") == "running"
    assert h.orch.active is None  # nobody chose it: the chat does not switch to it
    assert not any(e.stopped or e.killed for e in h.factory.made)
    # Status: the model is warm; events: the operation, its progress and the warm model went out.
    warm_events = [e for e in h.events if isinstance(e, StatusEvent) and e.snapshot["models"]["qwen"]["warm"]]
    assert warm_events
    ops = [e.snapshot["operation"] for e in h.events if isinstance(e, StatusEvent) and e.snapshot["operation"]]
    assert {"kind": "prewarm", "target_model": "qwen", "actor": "prewarm"}.items() <= ops[0].items()
    assert any(isinstance(e, ProgressEvent) and e.stage == "prewarming" for e in h.events)
    rows = audit(h, "prewarm")
    assert [(r["actor"], r["target"], r["outcome"]) for r in rows] == [("prewarm", "qwen", "success")]
    assert h.orch.snapshot()["prewarm"]["enabled"]
    # Its load taught the ETA like any other.
    assert h.history.loads_recorded == 1
    await h.close()


async def test_a_warm_model_stops_being_warm_once_a_person_uses_it(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen")
    h.factory.auto_ready.add("qwen")
    await h.until(lambda: model(h, "qwen")["warm"], "qwen to be pre-warmed")
    lease = await h.admitted("qwen")
    await h.until(lambda: not model(h, "qwen")["warm"], "qwen to be shown used")
    lease.release()
    await h.close()


async def test_prewarm_never_unloads_anything_to_make_room(tmp_path: Path) -> None:
    h = Harness(tmp_path, PREWARM_CATALOG)
    h.orch.prewarmer.idle_s = 0.0
    await h.start()
    await h.bring_up("big")  # 90 of 100 GB: Qwen (30 GB) fits nowhere without unloading Big
    h.history.audit("api:key-alice", "switch", "qwen", "success")
    h.orch.changed()
    await h.until(lambda: "do not fit" in h.orch.snapshot()["prewarm"]["reason"], "the pre-warmer to give up")
    assert h.orch.snapshot()["prewarm"]["state"] == "idle"
    assert h.status("big") == "running" and h.status("qwen") == "stopped"
    assert [e.spec.id for e in h.factory.started] == ["big"]
    assert not any(e.stopped or e.killed for e in h.factory.made)
    assert audit(h, "prewarm") == []
    await h.close()


async def test_a_persons_switch_supersedes_a_prewarm_at_once(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen", "qwen")
    await h.until(lambda: h.status("qwen") == "loading" and h.orch.models["qwen"].engine is not None,
                  "the pre-warm of qwen to be loading")
    half_loaded = h.factory.latest("qwen")
    switch_id = await h.switch_ready("gpt20")  # qwen's engine never becomes ready: nobody waits for it
    assert isinstance(h.terminal(switch_id), CompleteEvent)
    assert half_loaded.killed and h.status("qwen") == "stopped"
    assert h.status("gpt20") == "running" and h.orch.active == "gpt20"
    rows = audit(h, "prewarm")
    assert [(r["actor"], r["target"], r["outcome"], r["detail"]["by"]) for r in rows] == [
        ("prewarm", "qwen", "superseded", "gpt20")]
    await h.close()


async def test_a_request_queued_for_another_model_ends_a_prewarm_at_once(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen", "qwen")
    await h.until(lambda: h.status("qwen") == "loading" and h.orch.models["qwen"].engine is not None,
                  "the pre-warm of qwen to be loading")
    half_loaded = h.factory.latest("qwen")
    h.factory.auto_ready.add("gpt20")
    lease, waiting = h.queued("gpt20")
    await asyncio.wait_for(waiting, 5)  # served: the pre-warm gave way and the queue's switch ran
    assert half_loaded.killed and h.status("gpt20") == "running"
    lease.release()
    assert audit(h, "prewarm")[0]["outcome"] == "superseded"
    await h.close()


async def test_a_manager_action_supersedes_a_prewarm_too(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen", "qwen")
    await h.until(lambda: h.status("qwen") == "loading" and h.orch.models["qwen"].engine is not None,
                  "the pre-warm of qwen to be loading")
    await h.orch.set_pinned("llama", True, "dashboard:carol")  # an instant action: no 409, the pre-warm ends
    assert h.orch.pinned >= {"llama"} and h.factory.latest("qwen").killed
    await h.close()


async def test_a_sleeping_model_is_woken_as_the_cheapest_prewarm(tmp_path: Path) -> None:
    h = await harness(tmp_path)
    h.orch.prewarmer.respect_s = 0.0  # a person's sleep is otherwise respected for a while
    await h.bring_up("small")
    await h.orch.sleep("small", "api:key-alice")
    h.history.audit("api:key-alice", "switch", "small", "success")
    h.orch.changed()
    await h.until(lambda: model(h, "small")["warm"], "small to be woken")
    assert h.status("small") == "running"
    assert len([e for e in h.factory.started if e.spec.id == "small"]) == 1  # the same engine, woken
    assert audit(h, "prewarm")[-1]["detail"]["woken"] is True
    await h.close()


async def test_a_model_a_person_just_unloaded_is_not_brought_back(tmp_path: Path) -> None:
    h = await harness(tmp_path, "qwen", "qwen")
    h.factory.auto_ready.add("qwen")
    await h.until(lambda: model(h, "qwen")["warm"], "qwen to be pre-warmed")
    await h.orch.unload("qwen", "dashboard:carol")
    await h.until(lambda: h.orch.snapshot()["prewarm"]["state"] == "idle", "the pre-warmer to look again")
    assert h.status("qwen") == "stopped" and h.orch.prewarmer.pick()[0] is None
    await h.close()
