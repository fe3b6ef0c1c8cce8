"""GPU memory sources. NVML needs a GPU, so it is tested here with a thin fake of the pynvml calls
(the only mock in the suite); benchmarks/nvml_check.py verifies it on a real GPU where one is lent."""

import json
import os
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


def test_nvml_reads_each_device_and_what_each_model_holds_on_it() -> None:
    reading = NvmlGpu(FakeNvml()).read([EngineMemory("gpt-oss-120b", (100, 101), declared_gb=84, devices=(0, 1))])
    first, second = reading.devices
    assert (first.index, first.total_gb, first.used_gb, first.free_gb) == (0, 80, 50, 30)
    assert first.per_model == {"gpt-oss-120b": 40} and second.per_model == {"gpt-oss-120b": 30}
    assert reading.models_on() == {"gpt-oss-120b": (0, 1)}
    assert reading.name == "2 × NVIDIA H100 80GB HBM3" and first.name == "NVIDIA H100 80GB HBM3"


def test_virtual_devices_split_each_model_over_its_set() -> None:
    gpu = VirtualGpu(0, devices_gb=[80, 80, 80, 80])
    reading = gpu.read([EngineMemory("wide", (), 150, devices=(1, 2)), EngineMemory("one", (), 30, devices=(2,))])
    assert reading.total_gb == 320 and reading.used_gb == 180
    assert [d.used_gb for d in reading.devices] == [0, 75, 105, 0]
    assert reading.devices[2].per_model == {"wide": 75, "one": 30}
    assert reading.per_model == {"wide": 150, "one": 30}


def test_the_ledger_says_where_an_engine_sits_and_what_is_held(tmp_path) -> None:
    ledger = tmp_path / "ledger"
    gpu = VirtualGpu(0, devices_gb=[80, 80], ledger_dir=ledger)
    me = os.getpid()  # a live process stands in for the engine
    (ledger / str(me)).write_text(json.dumps({"model": "wide", "held": False, "devices": {"1": 20.0}}))
    # The engine booked GPU 1: that is where it is, whatever the orchestrator thought.
    reading = gpu.read([EngineMemory("wide", (), 20, devices=(0,))])
    assert [d.per_model for d in reading.devices] == [{}, {"wide": 20}]
    # Once its engine is stopped, a booking left behind is memory used by nobody of ours.
    (ledger / str(me)).write_text(json.dumps({"model": "wide", "held": True, "devices": {"1": 20.0}}))
    reading = gpu.read([])
    assert [d.used_gb for d in reading.devices] == [0, 20] and reading.per_model == {}
    assert gpu.held_gb() == 20
    (ledger / "999999999").write_text("5")  # a process that is gone: removed, the memory is back
    gpu.read([])
    assert not (ledger / "999999999").exists()


def test_a_bare_number_in_the_ledger_is_held_on_device_0(tmp_path) -> None:
    ledger = tmp_path / "ledger"
    gpu = VirtualGpu(95.9, ledger_dir=ledger)
    (ledger / str(os.getpid())).write_text("12.5")
    reading = gpu.read([])
    assert reading.used_gb == 12.5 and len(reading.by_device()) == 1
