"""What a GPU memory source reports, whichever it is (NVML or the virtual GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class EngineMemory:
    """An engine as the GPU source needs to see it: its processes and what it declared."""

    model_id: str
    pids: tuple[int, ...]
    declared_gb: float


@dataclass(frozen=True)
class GpuReading:
    source: str
    total_gb: float
    used_gb: float
    per_model: dict[str, float] = field(default_factory=dict)
    name: str = ""

    @property
    def free_gb(self) -> float:
        return max(self.total_gb - self.used_gb, 0.0)


class GpuMonitor(Protocol):
    source: str

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        """Memory now, with each engine's share attributed to its model."""
        ...
