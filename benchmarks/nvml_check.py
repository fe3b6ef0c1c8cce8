"""Reads the GPUs through smartswitch's NVML source and prints each device and what each model holds on it.

Run on a machine with an NVIDIA GPU::

    python benchmarks/nvml_check.py                      # engines found by their smartswitch marker
    python benchmarks/nvml_check.py llama=4242,4243 1234  # MODEL=PID,... (bare pids count as "engine")
    python benchmarks/nvml_check.py --place 150 2         # also: where a 150 GB model over 2 GPUs would go

Attribution is the orchestrator's: a process's usage on a device counts for the model whose engine it
belongs to. The planner's view (free per device) is printed with the device set it would choose.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import psutil

from dashboard.engines.process import MODEL_ENV
from dashboard.gpu.base import EngineMemory
from dashboard.gpu.nvml import find_nvml_gpu
from dashboard.orchestrator.planner import Device, LoadedModel, place


def marked_engines() -> list[EngineMemory]:
    """smartswitch engines on this machine (their processes carry the model id), readable by this user."""
    pids: dict[str, list[int]] = defaultdict(list)
    for proc in psutil.process_iter(["pid", "environ"]):
        model_id = (proc.info.get("environ") or {}).get(MODEL_ENV)
        if model_id:
            pids[model_id].append(proc.info["pid"])
    return [EngineMemory(model_id, tuple(found), 0.0) for model_id, found in sorted(pids.items())]


def named_engines(args: list[str]) -> list[EngineMemory]:
    pids: dict[str, list[int]] = defaultdict(list)
    for arg in args:
        model_id, _, listed = arg.rpartition("=")
        pids[model_id or "engine"] += [int(p) for p in listed.split(",") if p]
    return [EngineMemory(model_id, tuple(found), 0.0) for model_id, found in pids.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engines", nargs="*", help="MODEL=PID,PID or PID (default: engines found by marker)")
    parser.add_argument("--place", nargs=2, type=float, metavar=("GB", "TP"), help="plan a target of GB over TP GPUs")
    args = parser.parse_args(argv)
    gpu = find_nvml_gpu()
    if gpu is None:
        print("No NVIDIA GPU (NVML found no driver or device).")
        return 1
    engines = named_engines(args.engines) if args.engines else marked_engines()
    started = time.perf_counter()
    reading = gpu.read(engines)
    elapsed_ms = (time.perf_counter() - started) * 1000
    print(f"{reading.name}: total {reading.total_gb:.2f} GB, used {reading.used_gb:.2f} GB, "
          f"free {reading.free_gb:.2f} GB ({len(reading.by_device())} device(s))")
    for device in reading.by_device():
        ours = sum(device.per_model.values())
        print(f"  GPU {device.index} {device.name}: total {device.total_gb:7.2f} GB  used {device.used_gb:7.2f} GB  "
              f"free {device.free_gb:7.2f} GB  (ours {ours:.2f} GB, others {device.used_gb - ours:.2f} GB)")
        for model_id, gb in sorted(device.per_model.items()):
            print(f"      {model_id:<32} {gb:8.2f} GB")
    print("engines: " + (", ".join(f"{e.model_id} (pids {', '.join(map(str, e.pids))})" for e in engines)
                         or "none found"))
    for model_id, devices in sorted(reading.models_on().items()):
        print(f"  {model_id}: {reading.per_model[model_id]:.2f} GB on GPU(s) {', '.join(map(str, devices))}")
    print(f"one reading took {elapsed_ms:.2f} ms")
    if args.place:
        gb, tp = args.place[0], int(args.place[1])
        loaded = [LoadedModel(m, reading.per_model[m], devices=d) for m, d in reading.models_on().items()]
        free = [Device(d.index, d.free_gb) for d in reading.by_device()]
        started = time.perf_counter()
        result = place(loaded, free, "target", gb, tp=tp)
        print(f"a {gb:g} GB model over {tp} GPU(s): " + (
            f"GPU(s) {', '.join(map(str, result.gpus))}, unloading {list(result.unload) or 'nothing'}"
            if result.feasible else result.reason) + f" (planned in {(time.perf_counter() - started) * 1000:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
