"""Reads the GPU through smartswitch's NVML source and prints what a switch would plan with.

Run on a machine with an NVIDIA GPU: ``python benchmarks/nvml_check.py [PID ...]``; the pids (an
engine's processes) are attributed to a model named "engine" as the orchestrator would do.
"""

from __future__ import annotations

import sys
import time

from dashboard.gpu.base import EngineMemory
from dashboard.gpu.nvml import find_nvml_gpu


def main(pids: list[int]) -> int:
    gpu = find_nvml_gpu()
    if gpu is None:
        print("No NVIDIA GPU (NVML found no driver or device).")
        return 1
    started = time.perf_counter()
    reading = gpu.read([EngineMemory("engine", tuple(pids), 0.0)] if pids else [])
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"device: {reading.name}")
    print(f"total {reading.total_gb:.2f} GB, used {reading.used_gb:.2f} GB, free {reading.free_gb:.2f} GB")
    print(f"attributed: {reading.per_model or 'nothing'}")
    print(f"one reading took {elapsed_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(p) for p in sys.argv[1:]]))
