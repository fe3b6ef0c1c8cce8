"""The planner chooses where a target goes and what to unload; hypothesis throws many memory layouts at it."""

from hypothesis import given
from hypothesis import strategies as st

from dashboard.orchestrator.planner import SLEEP_RESIDUAL, Device, LoadedModel, Plan, place, plan


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


# Several GPUs: each model sits on a device set, a target needs its share free on each device of one ------
def on(*devices: int) -> tuple[int, ...]:
    return devices


def gpus(*free: float) -> list[Device]:
    return [Device(i, gb) for i, gb in enumerate(free)]


def test_tp2_model_takes_the_free_gpu_and_makes_room_on_the_half_full_one() -> None:
    # GPU 0 is empty (80 free); GPU 1 holds a 40 GB model (40 free). 100 GB over two GPUs = 50 GB on each.
    loaded = [LoadedModel("half", 40, devices=on(1))]
    result = place(loaded, gpus(80, 40), "wide", 100, tp=2)
    assert result.feasible and result.gpus == (0, 1)
    assert result.unload == ("half",)
    assert result.as_dict()["unload_by_device"] == {"0": [], "1": ["half"]}
    # 60 GB over two GPUs is 30 GB on each: it fits beside the half-full one without unloading anything.
    assert place(loaded, gpus(80, 40), "wide", 60, tp=2).unload == ()


def test_pinned_model_on_gpu_0_blocks_the_only_pair() -> None:
    loaded = [LoadedModel("keeper", 50, devices=on(0)), LoadedModel("other", 50, devices=on(1))]
    result = place(loaded, gpus(30, 30), "wide", 80, tp=2, pinned={"keeper"})
    assert not result.feasible and result.unload == ()
    assert "GPU 0: 30.0 GB free, 30.0 GB after unloading everything unpinned (keeper pinned there)" in result.reason
    assert "GPU 1: 30.0 GB free, 80.0 GB after unloading" in result.reason
    assert "Unpin keeper" in result.reason
    assert (result.required_gb, result.free_gb_before, result.can_free_gb) == (80, 60, 50)


def test_best_fit_keeps_the_80_gb_holes_for_big_models() -> None:
    loaded = [LoadedModel("coder", 40, devices=on(0))]
    result = place(loaded, gpus(40, 80, 80, 80), "small", 30)
    assert result.feasible and result.gpus == (0,) and result.unload == ()
    # Of two devices with room, the tighter one: 40 free (10 left) rather than 60 free (30 left).
    assert place([], gpus(80, 60, 40, 80), "small", 30).gpus == (2,)


def test_the_set_with_the_least_to_unload_wins_and_only_its_models_go() -> None:
    loaded = [LoadedModel("a", 70, devices=on(0)), LoadedModel("b", 70, devices=on(1)),
              LoadedModel("c", 30, devices=on(2)), LoadedModel("d", 70, devices=on(3))]
    result = place(loaded, gpus(10, 10, 50, 10), "mid", 60)
    assert result.gpus == (2,) and result.unload == ("c",)


def test_lru_prefers_the_set_whose_victims_were_used_longest_ago() -> None:
    loaded = [LoadedModel("recent-small", 30, last_used=9, devices=on(0)),
              LoadedModel("old-big", 70, last_used=1, devices=on(1))]
    assert place(loaded, gpus(50, 10), "t", 60, strategy="lru").unload == ("old-big",)
    assert place(loaded, gpus(50, 10), "t", 60, strategy="largest_first").unload == ("recent-small",)


def test_a_victim_on_a_device_with_room_already_is_left_alone() -> None:
    # A pair (0, 1): GPU 0 is short, GPU 1 has room. The big model on GPU 1 only is not touched.
    loaded = [LoadedModel("big1", 60, devices=on(1)), LoadedModel("small0", 30, devices=on(0))]
    result = place(loaded, gpus(40, 60, 0), "wide", 120, tp=2)
    assert result.gpus == (0, 1) and result.unload == ("small0",)


def test_a_model_pinned_to_gpus_goes_there_or_nowhere() -> None:
    loaded = [LoadedModel("x", 70, devices=on(2))]
    result = place(loaded, gpus(80, 80, 10, 80), "p", 100, tp=2, gpus=(2, 3))
    assert result.gpus == (2, 3) and result.unload == ("x",)
    refused = place(loaded, gpus(80, 80, 10, 80), "p", 100, tp=2, gpus=(2, 3), pinned={"x"})
    assert not refused.feasible and "50 GB on each of GPUs 2, 3" in refused.reason


def test_more_gpus_than_the_machine_has_is_infeasible_with_the_reason() -> None:
    result = place([], gpus(80, 80), "huge", 300, tp=4)
    assert not result.feasible and "needs 4 GPUs" in result.reason and "GPUs 0, 1" in result.reason


def test_auto_unload_off_names_each_gpu() -> None:
    result = place([LoadedModel("a", 70, devices=on(0))], gpus(10, 20), "t", 40, allow_unload=False)
    assert not result.feasible
    assert "GPU 0 10.0 GB, GPU 1 20.0 GB" in result.reason and "automatic unloading is off" in result.reason


def test_loaded_target_reports_where_it_is() -> None:
    result = place([LoadedModel("wide", 100, devices=on(1, 3))], gpus(80, 30, 80, 30), "wide", 100, tp=2)
    assert result.already_loaded and result.gpus == (1, 3)


@st.composite
def boxes(draw: st.DrawFn) -> dict:
    """A box of 1-6 devices with models placed so that no device is over its total."""
    totals = draw(st.lists(st.sampled_from([24.0, 40.0, 48.0, 80.0, 96.0]), min_size=1, max_size=6))
    used = [draw(st.floats(0, 10)) for _ in totals]  # memory of processes that are not ours
    loaded = []
    for i in range(draw(st.integers(0, 8))):
        devices = tuple(sorted(draw(st.sets(st.integers(0, len(totals) - 1), min_size=1, max_size=len(totals)))))
        gb = draw(st.floats(1, 100))
        share = gb / len(devices)
        if all(used[d] + share <= totals[d] for d in devices):
            for d in devices:
                used[d] += share
            loaded.append(LoadedModel(f"m{i}", gb, last_used=draw(st.floats(0, 100)), can_sleep=draw(st.booleans()),
                                      host_gb=draw(st.floats(0, 50)), devices=devices))
    return {
        "totals": totals, "used": used, "loaded": loaded,
        "pinned": {m.id for m in loaded if draw(st.booleans())},
        "tp": draw(st.integers(1, len(totals))), "required": draw(st.floats(1, 300)),
        "strategy": draw(st.sampled_from(["largest_first", "lru"])), "host": draw(st.floats(0, 100)),
    }


def place_on(box: dict) -> Plan:
    devices = [Device(i, total - used) for i, (total, used) in enumerate(zip(box["totals"], box["used"], strict=True))]
    return place(box["loaded"], devices, "target", box["required"], tp=box["tp"], strategy=box["strategy"],
                 pinned=box["pinned"], host_free_gb=box["host"])


@given(boxes())
def test_no_device_is_ever_overcommitted(box: dict) -> None:
    result = place_on(box)
    if not result.feasible:
        return
    used = list(box["used"])
    for model in box["loaded"]:
        if model.id in result.unload:
            gone = model.per_device_gb * (1 - SLEEP_RESIDUAL if model.id in result.sleep else 1)
            for d in model.devices:
                used[d] -= gone
    for d in result.gpus:
        used[d] += result.required_per_device_gb
    assert all(u <= total + 1e-6 for u, total in zip(used, box["totals"], strict=True))


@given(boxes())
def test_shards_sit_on_distinct_devices_and_victims_only_on_the_chosen_ones(box: dict) -> None:
    result = place_on(box)
    if result.feasible:
        assert len(result.gpus) == len(set(result.gpus)) == box["tp"]
        by_id = {m.id: m for m in box["loaded"]}
        assert all(set(by_id[v].devices) & set(result.gpus) for v in result.unload)
        assert set(result.sleep) <= set(result.unload)


@given(boxes())
def test_pinned_models_are_never_victims(box: dict) -> None:
    assert not set(place_on(box).unload) & box["pinned"]


@given(boxes())
def test_a_plan_is_feasible_exactly_when_some_device_set_can_be_freed(box: dict) -> None:
    from itertools import combinations

    need = box["required"] / box["tp"]
    reachable = [total - used + sum(m.per_device_gb for m in box["loaded"] if d in m.devices
                                    and m.id not in box["pinned"])
                 for d, (total, used) in enumerate(zip(box["totals"], box["used"], strict=True))]
    exists = any(all(reachable[d] + 1e-6 >= need for d in s)
                 for s in combinations(range(len(box["totals"])), box["tp"]))
    result = place_on(box)
    assert result.feasible == exists
    if not result.feasible:
        assert result.unload == () and result.reason
