"""What the dashboard's views say, from its state alone (no browser): one number everywhere, stable rows."""

from __future__ import annotations

from typing import Any

from dashboard.ui.banner import ConfirmSwitch, current_step, idle_html, switch_html
from dashboard.ui.manager import actions_for
from dashboard.ui.picker import picker_rows
from dashboard.ui.state import DashboardState


def model(mid: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": mid, "name": mid.upper(), "status": status, "size_gb": 16.0, "pinned": False, "warm": False,
            "sleep_capable": False, "load_progress": 0, "error": None, **extra}


def snapshot(models: list[dict[str, Any]], switch: dict[str, Any] | None = None,
             active: str | None = None) -> dict[str, Any]:
    return {"models": {m["id"]: m for m in models}, "switch": switch, "active_model": active,
            "gpu": {"total_memory_gb": 80, "used_memory_gb": 20, "per_model_gb": {}}, "devices": []}


def switching(target: str, progress: int, eta: float | None, **extra: Any) -> dict[str, Any]:
    return {"target_model": target, "from_model": "a", "stage": "loading_target", "progress": progress,
            "eta_seconds": eta, "message": "Reading weights", "phase": "loading_weights", **extra}


def test_banner_picker_and_chat_input_show_the_same_percent_and_eta() -> None:
    state = DashboardState()
    state.apply(snapshot([model("a", "running"), model("b", "loading", load_progress=27)],
                         switching("b", 31, 42.4), active="a"))
    banner = switch_html(state)
    assert "31%" in banner and "~42 s left" in banner
    row = next(r for r in picker_rows(state.models, state.selected_model, "b", state.progress) if r["id"] == "b")
    assert row["percent"] == 31  # the switch's number, not the model row's own 27
    assert "B" in state.lock_reason and "42s remaining" in state.lock_reason.replace(" s", "s")


def test_picker_rows_keep_catalog_order_and_group_by_status() -> None:
    state = DashboardState()
    state.apply(snapshot([model("z", "stopped"), model("a", "running"), model("m", "sleeping")], active="a"))
    rows = picker_rows(state.models, "a", None, 0)
    assert [r["id"] for r in rows] == ["z", "a", "m"]  # catalog order: a status change never moves a row
    assert [r["group"] for r in rows] == ["Available", "Running", "Sleeping"]
    assert [r["selected"] for r in rows] == [False, True, False]


def test_the_steps_follow_the_stage_and_the_load_phase() -> None:
    assert current_step("checking_memory", "") == 0
    assert current_step("unloading_models", "") == 0
    assert current_step("loading_target", "starting") == 1
    assert current_step("loading_target", "loading_weights") == 1
    assert current_step("loading_target", "initializing") == 2
    assert current_step("loading_target", "warming_up") == 3


def test_a_long_or_slow_load_says_it_may_take_a_while_and_shows_bytes() -> None:
    state = DashboardState()
    state.apply(snapshot([model("a", "running"), model("b", "loading")],
                         switching("b", 10, 150.0, bytes_loaded=4_000_000_000, bytes_total=40_000_000_000)))
    banner = switch_html(state)
    assert "may take a while" in banner and "4.0 GB of 40.0 GB" in banner and "~2 min left" in banner
    state.apply(snapshot([model("a", "running"), model("b", "loading")], switching("b", 50, 5.0)))
    assert "may take a while" not in switch_html(state)
    state.apply(snapshot([model("a", "running"), model("b", "loading")], switching("b", 55, 5.0, slow=True)))
    assert "slower than usual" in switch_html(state)


def test_cancelling_and_rolling_back_have_their_own_headline() -> None:
    state = DashboardState()
    state.apply(snapshot([model("a", "stopped"), model("b", "loading")],
                         switching("b", 40, None, stage="rolling_back", message="Load of B failed — restoring A")))
    banner = switch_html(state)
    assert "rolling-back" in banner and "Load of B failed — restoring A" in banner
    assert "Switching" not in banner


def test_the_idle_strip_names_the_model_in_use_or_asks_for_one() -> None:
    state = DashboardState()
    state.apply(snapshot([model("a", "running", gpu_memory_used_gb=18.0)], active="a"))
    assert "A" in idle_html(state) and "ready" in idle_html(state) and "18 GB" in idle_html(state)
    state.apply(snapshot([model("a", "stopped")]))  # the model this tab chats with was unloaded
    assert "A is not loaded" in idle_html(state)
    assert "No model loaded" in idle_html(DashboardState())


def test_the_idle_strip_does_not_say_nothing_is_loaded_when_models_are_but_none_is_chosen() -> None:
    state = DashboardState()  # pre-warmed, or adopted after a restart: loaded, not chosen
    state.apply(snapshot([model("a", "running", warm=True), model("b", "sleeping"), model("c", "stopped")]))
    header = idle_html(state)
    assert "No model loaded" not in header
    assert "No model chosen" in header and "Loaded: A, B. Pick" in header


def test_a_confirmation_to_replace_a_switch_closes_when_that_switch_ends() -> None:
    state = DashboardState()
    state.apply(snapshot([model("a", "running"), model("b", "loading"), model("c", "stopped")],
                         switching("b", 70, 3.0)))

    async def confirm(_: str) -> None: ...

    box = ConfirmSwitch(state=state, on_confirm=confirm)
    box.plan = {"target_model": "c", "replaces": "b", "unload": []}
    state.apply(snapshot([model("a", "running"), model("b", "loading"), model("c", "stopped")],
                         switching("b", 80, 2.0)))
    assert box.plan is not None  # the question still stands
    state.apply(snapshot([model("a", "running"), model("b", "running"), model("c", "stopped")], active="b"))
    assert box.plan is None


def test_each_row_of_the_manager_offers_what_applies_to_its_model() -> None:
    assert actions_for(model("a", "stopped")) == ("load", "pin")
    assert actions_for(model("a", "failed")) == ("load", "pin")
    assert actions_for(model("a", "running", sleep_capable=True, pinned=True)) == ("unload", "sleep", "unpin")
    assert actions_for(model("a", "running")) == ("unload", "pin")
    assert actions_for(model("a", "sleeping")) == ("wake", "unload", "pin")
    assert actions_for(model("a", "loading")) == ("pin",)
