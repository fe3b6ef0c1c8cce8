"""Which loaded models to unload so a target fits: a pure function of memory and policy."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

# Memory figures are compared with a small tolerance: GB values come from floats.
EPSILON_GB = 1e-6
# A model asleep at level 1 keeps its CUDA context and some buffers: about this share of its memory.
SLEEP_RESIDUAL = 0.05


@dataclass(frozen=True)
class LoadedModel:
    """A model holding GPU memory now."""

    id: str
    gpu_gb: float
    last_used: float = 0.0
    can_sleep: bool = False  # sleep-capable and awake: level-1 sleep moves its weights to host RAM
    host_gb: float = 0.0  # host RAM its weights need while asleep


@dataclass(frozen=True)
class Plan:
    """The dry run of a switch: what would be unloaded and the memory before and after."""

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
    """Choose victims by ``strategy`` until ``required_gb`` fits; pinned models are never chosen.

    Sleep-capable victims are put to sleep instead of stopped while ``host_free_gb`` can hold their
    weights (a wake takes seconds, a cold load minutes); a sleeping model keeps a small residual.
    """
    free_gb = max(free_gb, 0.0)
    if any(m.id == target for m in loaded):
        return Plan(target, required_gb, free_gb, free_gb_after=free_gb, already_loaded=True,
                    reason=f"{target} is already loaded")
    if required_gb <= free_gb + EPSILON_GB:
        return Plan(target, required_gb, free_gb, free_gb_after=free_gb - required_gb)

    candidates = [m for m in loaded if m.id not in pinned]
    can_free = sum(m.gpu_gb for m in candidates)
    if not allow_unload:
        return Plan(target, required_gb, free_gb, free_gb_after=free_gb, can_free_gb=can_free,
                    feasible=False,
                    reason=(f"Need {required_gb:g} GB, {free_gb:.1f} GB free, and automatic unloading "
                            "is off: unload a model first."))
    if free_gb + can_free + EPSILON_GB < required_gb:
        kept = tuple(m.id for m in loaded if m.id in pinned)
        hint = f" Unpin {', '.join(kept)} or pick a smaller model." if kept else " Pick a smaller model."
        return Plan(target, required_gb, free_gb, free_gb_after=free_gb, can_free_gb=can_free,
                    feasible=False, kept=kept,
                    reason=(f"Cannot free enough memory: need {required_gb:g} GB, {free_gb:.1f} GB free, "
                            f"unloading everything unpinned frees {can_free:.1f} GB.{hint}"))

    for allow_sleep in (True, False):  # residuals of sleepers may not fit: then stop them all
        victims, sleepers = [], []
        freed, host_left = free_gb, host_free_gb
        for model in _victim_order(candidates, strategy):
            if freed + EPSILON_GB >= required_gb:
                break
            victims.append(model.id)
            if allow_sleep and model.can_sleep and model.host_gb <= host_left:
                sleepers.append(model.id)
                host_left -= model.host_gb
                freed += model.gpu_gb * (1 - SLEEP_RESIDUAL)
            else:
                freed += model.gpu_gb
        if freed + EPSILON_GB >= required_gb:
            break
    return Plan(target, required_gb, free_gb, unload=tuple(victims), sleep=tuple(sleepers),
                free_gb_after=freed - required_gb, can_free_gb=can_free)


def _victim_order(candidates: list[LoadedModel], strategy: str) -> list[LoadedModel]:
    if strategy == "lru":
        return sorted(candidates, key=lambda m: (m.last_used, -m.gpu_gb, m.id))
    if strategy == "largest_first":
        return sorted(candidates, key=lambda m: (-m.gpu_gb, m.last_used, m.id))
    raise ValueError(f"unknown strategy {strategy!r}")
