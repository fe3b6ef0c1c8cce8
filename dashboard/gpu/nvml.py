"""GPU memory from NVML (pynvml): each device's memory and its processes' usage attributed to models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashboard.gpu.base import DeviceReading, EngineMemory, GpuReading, combined

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
        # Indices as NVML counts them, which is what CUDA_VISIBLE_DEVICES and Docker's device ids name
        # (with CUDA_DEVICE_ORDER=PCI_BUS_ID, which engines are started with).
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.names = [_text(nvml.nvmlDeviceGetName(h)) for h in self.handles]
        self.name = combined(self.source, [DeviceReading(i, 0, 0, name=n) for i, n in enumerate(self.names)]).name

    def read(self, engines: Sequence[EngineMemory]) -> GpuReading:
        owner = {pid: engine.model_id for engine in engines for pid in engine.pids}
        devices = []
        for index, handle in enumerate(self.handles):
            info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            per_model: dict[str, float] = {}
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                model_id = owner.get(proc.pid)
                # usedGpuMemory is None where the driver hides it (e.g. inside containers).
                if model_id is not None and proc.usedGpuMemory:
                    per_model[model_id] = per_model.get(model_id, 0.0) + proc.usedGpuMemory / GB
            devices.append(DeviceReading(index, info.total / GB, info.used / GB, per_model, self.names[index]))
        return combined(self.source, devices, self.name)


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def find_nvml_gpu() -> NvmlGpu | None:
    """An NVML monitor when a driver and a GPU are present, else None."""
    try:
        return NvmlGpu()
    except Exception:  # no library, no driver, no device: all mean "no NVIDIA GPU here"
        return None
