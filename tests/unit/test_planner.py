"""The planner chooses what to unload; hypothesis throws many memory layouts at it."""

from hypothesis import given
from hypothesis import strategies as st

from dashboard.orchestrator.planner import LoadedModel, plan


def test_switch_unloads_largest_model_first() -> None:
    loaded = [LoadedModel("small", 20, last_used=1), LoadedModel("big", 84, last_used=2)]
    result = plan(loaded, free_gb=95.9 - 104, target="coder", required_gb=43)
    assert result.feasible and result.unload == ("big",)


def test_lru_unloads_least_recently_used_first() -> None:
    loaded = [LoadedModel("old", 20, last_used=1), LoadedModel("new", 40, last_used=9)]
    result = plan(loaded, free_gb=30, target="t", required_gb=45, strategy="lru")
    assert result.unload == ("old",)


def test_target_that_fits_unloads_nothing() -> None:
    result = plan([LoadedModel("a", 20)], free_gb=75.9, target="b", required_gb=43)
    assert result.feasible and result.unload == () and round(result.free_gb_after, 1) == 32.9


def test_pinned_model_makes_plan_infeasible_with_figures() -> None:
    result = plan([LoadedModel("pinned", 84)], free_gb=11.9, target="t", required_gb=43, pinned={"pinned"})
    assert not result.feasible
    assert result.unload == ()
    assert (result.required_gb, round(result.free_gb_before, 1), result.can_free_gb) == (43, 11.9, 0)
    assert "Unpin pinned" in result.reason


def test_already_loaded_target_is_reported() -> None:
    assert plan([LoadedModel("a", 20)], free_gb=70, target="a", required_gb=20).already_loaded


def test_auto_unload_off_refuses_to_unload() -> None:
    result = plan([LoadedModel("a", 84)], free_gb=11.9, target="b", required_gb=20, allow_unload=False)
    assert not result.feasible and "automatic unloading is off" in result.reason


models = st.lists(
    st.tuples(st.floats(1, 100), st.floats(0, 1000), st.booleans()), max_size=6
).map(lambda rows: [(LoadedModel(f"m{i}", gb, used), pin) for i, (gb, used, pin) in enumerate(rows)])


@given(models, st.floats(0, 200), st.floats(1, 150), st.sampled_from(["largest_first", "lru"]))
def test_feasible_plan_always_fits_and_spares_pinned(rows, free_gb, required_gb, strategy) -> None:
    loaded = [m for m, _ in rows]
    pinned = {m.id for m, pin in rows if pin}
    result = plan(loaded, free_gb, "target", required_gb, strategy=strategy, pinned=pinned)
    assert not set(result.unload) & pinned
    if result.feasible:
        freed = sum(m.gpu_gb for m in loaded if m.id in result.unload)
        assert free_gb + freed + 1e-6 >= required_gb
    else:
        assert result.unload == ()
        assert free_gb + sum(m.gpu_gb for m in loaded if m.id not in pinned) < required_gb
    if required_gb <= free_gb:
        assert result.unload == ()


@given(models, st.floats(0, 200), st.floats(1, 150))
def test_plan_never_unloads_more_than_needed(rows, free_gb, required_gb) -> None:
    loaded = [m for m, _ in rows]
    result = plan(loaded, free_gb, "target", required_gb)
    if result.unload:
        # Without the last victim the target would not have fitted.
        kept_back = sum(m.gpu_gb for m in loaded if m.id in result.unload[:-1])
        assert free_gb + kept_back < required_gb


def test_sleep_capable_victim_sleeps_when_host_ram_holds_it() -> None:
    loaded = [LoadedModel("small", 20, can_sleep=True, host_gb=16)]
    assert plan(loaded, free_gb=60, target="big", required_gb=70, host_free_gb=30).sleep == ("small",)
    assert plan(loaded, free_gb=60, target="big", required_gb=70, host_free_gb=10).sleep == ()


sleepy = st.lists(
    st.tuples(st.floats(1, 100), st.booleans(), st.floats(0, 100)), max_size=6
).map(lambda rows: [LoadedModel(f"m{i}", gb, i, can_sleep=cs, host_gb=h) for i, (gb, cs, h) in enumerate(rows)])


@given(sleepy, st.floats(0, 100), st.floats(1, 150), st.floats(0, 200))
def test_sleeping_victims_still_make_room_and_fit_in_host_ram(loaded, free_gb, required_gb, host_free_gb) -> None:
    result = plan(loaded, free_gb, "target", required_gb, host_free_gb=host_free_gb)
    by_id = {m.id: m for m in loaded}
    assert set(result.sleep) <= set(result.unload)
    assert all(by_id[m].can_sleep for m in result.sleep)
    assert sum(by_id[m].host_gb for m in result.sleep) <= host_free_gb + 1e-6
    if result.feasible:
        freed = sum(by_id[m].gpu_gb * (0.95 if m in result.sleep else 1) for m in result.unload)
        assert free_gb + freed + 1e-6 >= required_gb
