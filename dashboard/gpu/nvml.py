"""GPU memory from NVML (pynvml): totals over all devices, per-process usage attributed to models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashboard.gpu.base import EngineMemory, GpuReading

GB = 1e9


class NvmlGpu:
    source = "nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise RuntimeError("NVML found no GPU")
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        names = [nvml.nvmlDeviceGetName(h) for h in self.handles]
        self.name = ", ".join(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        total = used = 0
        by_pid: dict[int, int] = {}
        for handle in self.handles:
            info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            total += info.total
            used += info.used
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                # usedGpuMemory is None where the driver hides it (e.g. inside containers).
                by_pid[proc.pid] = by_pid.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
        per_model = {}
        for engine in engines:
            owned = sum(by_pid.get(pid, 0) for pid in engine.pids)
            if owned:
                per_model[engine.model_id] = owned / GB
        return GpuReading(self.source, total / GB, used / GB, per_model, self.name)


def find_nvml_gpu() -> NvmlGpu | None:
    """An NVML monitor when a driver and a GPU are present, else None."""
    try:
        return NvmlGpu()
    except Exception:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return None
