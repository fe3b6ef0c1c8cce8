"""Where a target goes and which loaded models to unload for it: a pure function of memory and policy.

GPUs are devices, not a pool. A model spans ``tp`` devices with its footprint split evenly, so a target
needs ``required_gb / tp`` free on each device of some set of ``tp`` distinct devices. ``place`` chooses
that set: first sets with room now (best fit: the smallest leftover, keeping big holes for big models),
then sets that room can be made on by unloading models that sit on those devices only, victims chosen by
the strategy, the set with the least to unload winning. Pinned models are never victims; a plan that no
set allows is infeasible before anything is unloaded, saying why per device. ``plan`` is the one-device
form (the whole GPU as device 0).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from itertools import combinations

# Memory figures are compared with a small tolerance: GB values come from floats.
EPSILON_GB = 1e-6
# A model asleep at level 1 keeps its CUDA context and some buffers: about this share of its memory.
SLEEP_RESIDUAL = 0.05


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it: the memory free on it now (what nothing of ours can give back is
    already subtracted)."""

    index: int
    free_gb: float


@dataclass(frozen=True)
class LoadedModel:
    """A model holding GPU memory now, split evenly over the devices it sits on."""

    id: str
    gpu_gb: float
    last_used: float = 0.0
    can_sleep: bool = False  # sleep-capable and awake: level-1 sleep moves its weights to host RAM
    host_gb: float = 0.0  # host RAM its weights need while asleep
    devices: tuple[int, ...] = (0,)

    @property
    def per_device_gb(self) -> float:
        return self.gpu_gb / max(len(self.devices), 1)


@dataclass(frozen=True)
class Plan:
    """The dry run of a switch: where the target goes, what would be unloaded, memory before and after.

    The memory figures are those of the chosen device set (of the closest one when infeasible); on a
    one-device box that is the whole GPU.
    """

    target: str
    required_gb: float
    free_gb_before: float
    unload: tuple[str, ...] = ()
    sleep: tuple[str, ...] = ()  # the subset of ``unload`` put to sleep instead of stopped
    free_gb_after: float = 0.0
    can_free_gb: float = 0.0
    feasible: bool = True
    already_loaded: bool = False
    reason: str = ""
    kept: tuple[str, ...] = field(default=())
    gpus: tuple[int, ...] = (0,)  # the device set chosen for the target (where it is, when loaded)
    unload_by_device: tuple[tuple[int, tuple[str, ...]], ...] = ()  # each device of the set, its victims

    @property
    def required_per_device_gb(self) -> float:
        return self.required_gb / max(len(self.gpus), 1)

    def as_dict(self) -> dict[str, object]:
        return {
            "target_model": self.target,
            "feasible": self.feasible,
            "already_loaded": self.already_loaded,
            "unload": list(self.unload),
            "sleep": list(self.sleep),
            "required_gb": round(self.required_gb, 2),
            "available_gb": round(self.free_gb_before, 2),
            "free_gb_after": round(self.free_gb_after, 2),
            "can_free_gb": round(self.can_free_gb, 2),
            "reason": self.reason,
            "gpus": list(self.gpus),
            "required_per_device_gb": round(self.required_per_device_gb, 2),
            "unload_by_device": {str(d): list(victims) for d, victims in self.unload_by_device},
        }


def plan(
    loaded: Sequence[LoadedModel],
    free_gb: float,
    target: str,
    required_gb: float,
    *,
    strategy: str = "largest_first",
    pinned: Collection[str] = (),
    allow_unload: bool = True,
    host_free_gb: float = 0.0,
) -> Plan:
    """The one-device form of ``place``: the whole GPU is device 0 with ``free_gb`` free."""
    return place(loaded, [Device(0, free_gb)], target, required_gb, strategy=strategy, pinned=pinned,
                 allow_unload=allow_unload, host_free_gb=host_free_gb)


def place(
    loaded: Sequence[LoadedModel],
    devices: Sequence[Device],
    target: str,
    required_gb: float,
    *,
    tp: int = 1,
    gpus: Sequence[int] | None = None,
    strategy: str = "largest_first",
    pinned: Collection[str] = (),
    preserved: Collection[str] = (),
    allow_unload: bool = True,
    host_free_gb: float = 0.0,
) -> Plan:
    """Choose a set of ``tp`` devices for ``target`` (exactly ``gpus`` when given) and the victims on it.

    Sleep-capable victims are put to sleep instead of stopped while ``host_free_gb`` can hold their
    weights (a wake takes seconds, a cold load minutes); a sleeping model keeps a small residual.
    ``preserved``: the part of ``pinned`` the catalog protects (no one can unpin it here).
    """
    free = {d.index: max(d.free_gb, 0.0) for d in devices}
    one_gpu = len(free) == 1 and tp == 1
    need = required_gb / tp
    here = next((m for m in loaded if m.id == target), None)
    if here is not None:
        room = sum(free.get(d, 0.0) for d in here.devices)
        return Plan(target, required_gb, room, free_gb_after=room, already_loaded=True,
                    reason=f"{target} is already loaded", gpus=here.devices)

    sets = _candidate_sets(sorted(free), tp, gpus)
    if not sets:
        where = f"GPUs {_names(gpus)}" if gpus else f"{tp} GPUs"
        return Plan(target, required_gb, 0.0, feasible=False, gpus=tuple(gpus or ()),
                    reason=f"{target} needs {where}, and this machine has GPUs {_names(sorted(free))}.")
    fitting = [s for s in sets if all(free[d] + EPSILON_GB >= need for d in s)]
    if fitting:
        best = min(fitting, key=lambda s: (sum(free[d] - need for d in s), s))
        room = sum(free[d] for d in best)
        return Plan(target, required_gb, room, free_gb_after=room - required_gb, gpus=best,
                    unload_by_device=tuple((d, ()) for d in best))

    candidates = [m for m in loaded if m.id not in pinned]
    freeable = {d: sum(m.per_device_gb for m in candidates if d in m.devices) for d in free}
    reachable = {d: free[d] + freeable[d] for d in free}
    closest = max(sets, key=lambda s: (sum(reachable[d] + EPSILON_GB >= need for d in s),
                                       sum(reachable[d] for d in s), [-d for d in s]))
    room, can_free = sum(free[d] for d in closest), sum(freeable[d] for d in closest)
    kept = tuple(m.id for m in loaded if m.id in pinned and set(m.devices) & set(closest))
    if not allow_unload:
        if one_gpu:
            why = f"Need {required_gb:g} GB, {room:.1f} GB free"
        else:
            why = f"Need {_per_gpu(need, tp, gpus)}; free now: {_free_list(free, gpus)}"
        return Plan(target, required_gb, room, free_gb_after=room, can_free_gb=can_free, feasible=False,
                    gpus=closest, reason=f"{why}, and automatic unloading is off: unload a model first.")
    ordered = _victim_order(candidates, strategy)  # once: each set takes its victims in this order
    options = [o for s in sets if all(reachable[d] + EPSILON_GB >= need for d in s)
               if (o := _free_set(s, need, free, ordered, host_free_gb)) is not None]
    if not options:
        unpinnable = [m for m in kept if m not in preserved]  # preserve_models cannot be unpinned from here
        protected = [m for m in kept if m in preserved]
        hint = f" Unpin {', '.join(unpinnable)} or pick a smaller model." if unpinnable else " Pick a smaller model."
        if protected:
            hint += f" ({', '.join(protected)}: kept by preserve_models in the catalog.)"
        if one_gpu:
            why = (f"need {required_gb:g} GB, {room:.1f} GB free, unloading everything unpinned frees "
                   f"{can_free:.1f} GB.")
        else:
            shown = gpus if gpus is not None else sorted(free)
            per_device = "; ".join(_device_why(d, free[d], reachable[d], need, loaded, pinned) for d in shown)
            why = f"need {_per_gpu(need, tp, gpus)}. {per_device}."
        return Plan(target, required_gb, room, free_gb_after=room, can_free_gb=can_free, feasible=False,
                    kept=kept, gpus=closest, reason=f"Cannot free enough memory: {why}{hint}")

    best_option = min(options, key=lambda o: _cost(o, strategy))
    chosen, victims, sleepers, after = best_option.devices, best_option.victims, best_option.sleepers, best_option.room
    on_device = {d: tuple(v.id for v in victims if d in v.devices)
                 for d in sorted(set(chosen).union(*(v.devices for v in victims)))}
    return Plan(target, required_gb, sum(free[d] for d in chosen), unload=tuple(v.id for v in victims),
                sleep=tuple(sleepers), free_gb_after=sum(after.values()) - required_gb,
                can_free_gb=sum(freeable[d] for d in chosen), gpus=chosen,
                unload_by_device=tuple(on_device.items()))


@dataclass(frozen=True)
class _Option:
    """One device set room can be made on, and how."""

    devices: tuple[int, ...]
    victims: tuple[LoadedModel, ...]
    sleepers: tuple[str, ...]
    room: dict[int, float]  # free on each device of the set once the victims are gone


def _candidate_sets(indices: list[int], tp: int, gpus: Sequence[int] | None) -> list[tuple[int, ...]]:
    if gpus is not None:
        return [tuple(gpus)] if set(gpus) <= set(indices) and len(set(gpus)) == len(gpus) else []
    return list(combinations(indices, tp)) if tp >= 1 else []


def _free_set(devices: tuple[int, ...], need: float, free: dict[int, float], ordered: list[LoadedModel],
              host_free_gb: float) -> _Option | None:
    """Victims on ``devices``, in the strategy's ``ordered`` list, until each device has ``need`` free, or None."""
    on_set = [m for m in ordered if not set(m.devices).isdisjoint(devices)]
    for allow_sleep in (True, False):  # residuals of sleepers may not fit: then stop them all
        room = {d: free[d] for d in devices}
        short = {d for d in devices if room[d] + EPSILON_GB < need}
        victims: list[LoadedModel] = []
        sleepers: list[str] = []
        host_left = host_free_gb
        for model in on_set:
            if not short:
                break
            if short.isdisjoint(model.devices):
                continue  # it only sits where there is room already: unloading it would not help
            victims.append(model)
            share = model.per_device_gb
            if allow_sleep and model.can_sleep and model.host_gb <= host_left:
                sleepers.append(model.id)
                host_left -= model.host_gb
                share *= 1 - SLEEP_RESIDUAL
            for d in model.devices:
                if d in room:
                    room[d] += share
                    if room[d] + EPSILON_GB >= need:
                        short.discard(d)
        if not short:
            return _Option(devices, tuple(victims), tuple(sleepers), room)
    return None


def _cost(option: _Option, strategy: str) -> tuple[object, ...]:
    """Least to unload wins; under LRU, first the set whose newest victim was used longest ago."""
    unloaded = sum(v.gpu_gb for v in option.victims)
    leftover = sum(option.room.values())
    if strategy == "lru":
        newest = max(v.last_used for v in option.victims)
        return (newest, unloaded, len(option.victims), leftover, option.devices)
    return (unloaded, len(option.victims), leftover, option.devices)


def _victim_order(candidates: list[LoadedModel], strategy: str) -> list[LoadedModel]:
    if strategy == "lru":
        return sorted(candidates, key=lambda m: (m.last_used, -m.gpu_gb, m.id))
    if strategy == "largest_first":
        return sorted(candidates, key=lambda m: (-m.gpu_gb, m.last_used, m.id))
    raise ValueError(f"unknown strategy {strategy!r}")


def _names(indices: Sequence[int] | None) -> str:
    return ", ".join(str(d) for d in indices or ())


def _per_gpu(need: float, tp: int, gpus: Sequence[int] | None) -> str:
    if gpus is not None:
        return f"{need:g} GB on {'each of GPUs' if len(gpus) > 1 else 'GPU'} {_names(gpus)}"
    return f"{need:g} GB on each of {tp} GPUs" if tp > 1 else f"{need:g} GB on one GPU"


def _free_list(free: dict[int, float], gpus: Sequence[int] | None) -> str:
    return ", ".join(f"GPU {d} {free[d]:.1f} GB" for d in (gpus if gpus is not None else sorted(free)))


def _device_why(d: int, free: float, reachable: float, need: float, loaded: Sequence[LoadedModel],
                pinned: Collection[str]) -> str:
    held = [m.id for m in loaded if m.id in pinned and d in m.devices]
    text = f"GPU {d}: {free:.1f} GB free, {reachable:.1f} GB after unloading everything unpinned"
    return text + (f" ({', '.join(held)} pinned there)" if held and reachable + EPSILON_GB < need else "")
