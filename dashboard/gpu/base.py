"""What a GPU memory source reports, whichever it is (NVML or the virtual GPU): totals and each device."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class EngineMemory:
    """An engine as the GPU source needs to see it: its processes, what it declared and where it was placed."""

    model_id: str
    pids: tuple[int, ...]
    declared_gb: float
    devices: tuple[int, ...] = ()  # the device set the orchestrator gave it (() = not placed)


@dataclass(frozen=True)
class DeviceReading:
    """One device: its memory and what each model holds on it."""

    index: int
    total_gb: float
    used_gb: float
    per_model: dict[str, float] = field(default_factory=dict)
    name: str = ""

    @property
    def free_gb(self) -> float:
        return max(self.total_gb - self.used_gb, 0.0)


@dataclass(frozen=True)
class GpuReading:
    """Memory now: the totals over every device (the seed's figures) and, when known, each device."""

    source: str
    total_gb: float
    used_gb: float
    per_model: dict[str, float] = field(default_factory=dict)
    name: str = ""
    devices: tuple[DeviceReading, ...] = ()

    @property
    def free_gb(self) -> float:
        return max(self.total_gb - self.used_gb, 0.0)

    def by_device(self) -> tuple[DeviceReading, ...]:
        """Each device; a reading made without device detail counts as one device holding everything."""
        if self.devices:
            return self.devices
        return (DeviceReading(0, self.total_gb, self.used_gb, dict(self.per_model), self.name),)

    def device(self, index: int) -> DeviceReading | None:
        return next((d for d in self.by_device() if d.index == index), None)

    def models_on(self) -> dict[str, tuple[int, ...]]:
        """Where each model is seen holding memory (device indices, ascending)."""
        seen: dict[str, list[int]] = {}
        for device in self.by_device():
            for model_id, gb in device.per_model.items():
                if gb > 0:
                    seen.setdefault(model_id, []).append(device.index)
        return {m: tuple(sorted(d)) for m, d in seen.items()}


def combined(source: str, devices: Sequence[DeviceReading], name: str = "") -> GpuReading:
    """The seed's totals from per-device readings (sums; each model's share over all its devices)."""
    per_model: dict[str, float] = {}
    for device in devices:
        for model_id, gb in device.per_model.items():
            per_model[model_id] = per_model.get(model_id, 0.0) + gb
    return GpuReading(source, sum(d.total_gb for d in devices), sum(d.used_gb for d in devices), per_model,
                      name or describe([d.name for d in devices]), tuple(devices))


def describe(names: Sequence[str]) -> str:
    """``NVIDIA H100`` for one device, ``4 × NVIDIA H100`` for four alike, else the names joined."""
    counts = Counter(names)
    if len(counts) == 1 and len(names) > 1:
        return f"{len(names)} × {names[0]}"
    return ", ".join(f"{n} × {name}" if n > 1 else name for name, n in counts.items())


class GpuMonitor(Protocol):
    source: str

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        """Memory now, with each engine's share attributed to its model, per device."""
        ...
