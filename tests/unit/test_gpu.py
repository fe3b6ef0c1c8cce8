"""GPU memory sources. NVML needs a GPU, so it is tested here with a thin fake of the pynvml calls
(the only mock in the suite); benchmarks/nvml_check.py verifies it on a real GPU where one is lent."""

from types import SimpleNamespace

from dashboard.gpu.base import EngineMemory
from dashboard.gpu.nvml import NvmlGpu
from dashboard.gpu.virtual import VirtualGpu

GB = 10**9


class FakeNvml:
    """Two devices; pids 100 and 101 belong to one engine, 200 to a process that is not ours."""

    def nvmlInit(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * GB, used=[50, 30][handle] * GB, free=[30, 50][handle] * GB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        if handle == 0:
            return [SimpleNamespace(pid=100, usedGpuMemory=40 * GB), SimpleNamespace(pid=200, usedGpuMemory=10 * GB)]
        return [SimpleNamespace(pid=101, usedGpuMemory=30 * GB), SimpleNamespace(pid=102, usedGpuMemory=None)]


def test_nvml_sums_devices_and_attributes_processes_to_models() -> None:
    gpu = NvmlGpu(FakeNvml())
    reading = gpu.read([EngineMemory("gpt-oss-120b", (100, 101), declared_gb=84),
                        EngineMemory("idle", (999,), declared_gb=20)])
    assert reading.source == "nvml"
    assert (reading.total_gb, reading.used_gb, reading.free_gb) == (160, 80, 80)
    assert reading.per_model == {"gpt-oss-120b": 70}
    assert "H100" in reading.name


def test_virtual_gpu_counts_what_running_engines_declare() -> None:
    reading = VirtualGpu(95.9).read([EngineMemory("a", (), 84), EngineMemory("b", (), 0)])
    assert reading.per_model == {"a": 84}
    assert round(reading.free_gb, 1) == 11.9
