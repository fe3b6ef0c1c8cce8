"""A virtual GPU of configured size: used memory is what the running (sim) engines declare."""

from __future__ import annotations

from collections.abc import Sequence

from dashboard.gpu.base import EngineMemory, GpuReading


class VirtualGpu:
    source = "virtual"

    def __init__(self, total_gb: float, name: str = "Virtual GPU") -> None:
        self.total_gb = total_gb
        self.name = name

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        per_model = {e.model_id: e.declared_gb for e in engines if e.declared_gb > 0}
        return GpuReading(self.source, self.total_gb, sum(per_model.values()), per_model, self.name)
