"""Per-device placement against the single-pool planner it replaces, on the embedded 4-GPU demo.

    python -m benchmarks.placement            # prints the tables and writes its section of RESULTS.md

A fixed sequence of 200 switches (seeded, models drawn by popularity) is replayed through each planner on
the demo's four 80 GB devices; no process is started. A load costs the model's own load time from the
catalog (the sim's ``--load-seconds``) and its checkpoint size in GB; victims are stopped (no sleeping, so
both planners pay the same for a victim).

The single-pool planner decides victims against the sum of free memory, as smartswitch did before: it
never knows which GPU anything is on. To give it its best chance, its target is then put on the first
device set that really has room (the old engines all went to GPU 0); where no set has room the load runs
out of memory on the real box: the attempt's load time is lost, and the switch is retried with the
victims a per-device planner would pick (counted as evictions too).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import write_section
from dashboard.config import Config, load_config
from dashboard.orchestrator.planner import Device, LoadedModel, Plan, place, plan

HERE = Path(__file__).resolve().parent
SWITCHES = 200
SEED = 11
BEGIN, END = "<!-- placement:begin -->", "<!-- placement:end -->"


@dataclass
class Box:
    """Devices and what sits on them: the replay's whole state."""

    totals: dict[int, float]
    models: dict[str, LoadedModel] = field(default_factory=dict)

    def free(self) -> dict[int, float]:
        free = dict(self.totals)
        for model in self.models.values():
            for d in model.devices:
                free[d] -= model.per_device_gb
        return free

    def devices(self) -> list[Device]:
        return [Device(d, gb) for d, gb in sorted(self.free().items())]

    def fits(self, devices: tuple[int, ...], gb: float) -> bool:
        free = self.free()
        return all(free[d] + 1e-6 >= gb / len(devices) for d in devices)


@dataclass
class Tally:
    switches: int = 0
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    failed_loads: int = 0
    load_s: float = 0.0
    loaded_gb: float = 0.0
    overcommitted: int = 0


def load_seconds(config: Config) -> dict[str, float]:
    found = {}
    for mid, spec in config.models.items():
        args = list(spec.args)
        found[mid] = float(args[args.index("--load-seconds") + 1]) if "--load-seconds" in args else 10.0
    return found


def sequence(config: Config, count: int = SWITCHES, seed: int = SEED) -> list[str]:
    """The fixed replay: models drawn by a popularity that falls with catalog order (1, 1/2, 1/3...)."""
    ids = list(config.models)
    weights = [1 / (rank + 1) for rank in range(len(ids))]
    return random.Random(seed).choices(ids, weights, k=count)


def replay(config: Config, targets: list[str], planner: str, strategy: str) -> Tally:
    box = Box({i: gb for i, gb in enumerate(config.gpu.devices_gb)})
    seconds = load_seconds(config)
    tally = Tally()
    for step, target in enumerate(targets):
        spec = config.models[target]
        tally.switches += 1
        if target in box.models:
            tally.hits += 1
            box.models[target] = LoadedModel(target, spec.gpu_memory_gb, step, devices=box.models[target].devices)
            continue
        if planner == "per_device":
            chosen = place(list(box.models.values()), box.devices(), target, spec.gpu_memory_gb,
                           tp=spec.tensor_parallel_size, gpus=spec.gpus, strategy=strategy)
            evict(box, chosen, tally)
            gpus = chosen.gpus
        else:
            pooled = [LoadedModel(m.id, m.gpu_gb, m.last_used) for m in box.models.values()]
            chosen = plan(pooled, sum(box.free().values()), target, spec.gpu_memory_gb, strategy=strategy)
            evict(box, chosen, tally)
            gpus = first_fit(box, spec.tensor_parallel_size, spec.gpu_memory_gb)
            if not gpus:  # out of memory on the real box: the attempt is lost, then a per-device retry
                tally.failed_loads += 1
                tally.load_s += seconds[target]
                retry = place(list(box.models.values()), box.devices(), target, spec.gpu_memory_gb,
                              tp=spec.tensor_parallel_size, strategy=strategy)
                evict(box, retry, tally)
                gpus = retry.gpus
        if not box.fits(gpus, spec.gpu_memory_gb):
            tally.overcommitted += 1
        box.models[target] = LoadedModel(target, spec.gpu_memory_gb, step, devices=gpus)
        tally.loads += 1
        tally.load_s += seconds[target]
        tally.loaded_gb += spec.size_gb
    return tally


def evict(box: Box, chosen: Plan, tally: Tally) -> None:
    for victim in chosen.unload:
        del box.models[victim]
        tally.evictions += 1


def first_fit(box: Box, tp: int, gb: float) -> tuple[int, ...]:
    from itertools import combinations

    return next((s for s in combinations(sorted(box.totals), tp) if box.fits(s, gb)), ())


def timings(config: Config, targets: list[str]) -> dict[str, float]:
    """Milliseconds per plan on the replay's own states, per device and pooled; and a crowded 8-GPU box."""
    box = Box({i: gb for i, gb in enumerate(config.gpu.devices_gb)})
    per_device: list[float] = []
    pooled: list[float] = []
    for step, target in enumerate(targets):
        spec = config.models[target]
        loaded = [m for m in box.models.values() if m.id != target]
        flat = [LoadedModel(m.id, m.gpu_gb, m.last_used) for m in loaded]
        free = sum(box.free().values())
        pooled.append(_time(plan, flat, free, target, spec.gpu_memory_gb))
        devices = box.devices()
        per_device.append(_time(place, loaded, devices, target, spec.gpu_memory_gb, tp=spec.tensor_parallel_size))
        if target not in box.models:
            chosen = place(list(box.models.values()), devices, target, spec.gpu_memory_gb,
                           tp=spec.tensor_parallel_size)
            for victim in chosen.unload:
                del box.models[victim]
            box.models[target] = LoadedModel(target, spec.gpu_memory_gb, step, devices=chosen.gpus)
    # Eight 80 GB GPUs, twelve models on them, a target over four: 70 candidate sets.
    crowded = [LoadedModel(f"m{i}", 50.0, i, devices=(i % 8,) if i < 8 else (i % 8, (i + 1) % 8))
               for i in range(12)]
    eight = [Device(d, 80 - sum(m.per_device_gb for m in crowded if d in m.devices)) for d in range(8)]
    crowded_ms = [_time(place, crowded, eight, "t", 280, tp=4) for _ in range(200)]
    return {"per_device_p50": statistics.median(per_device), "per_device_p99": _p99(per_device),
            "pooled_p50": statistics.median(pooled), "pooled_p99": _p99(pooled),
            "eight_gpus_tp4_p50": statistics.median(crowded_ms), "eight_gpus_tp4_p99": _p99(crowded_ms)}


def _time(fn: Callable[..., object], *args: Any, **kwargs: Any) -> float:
    """Milliseconds of one call: the median of five, so a context switch on a busy machine is not counted."""
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        fn(*args, **kwargs)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _p99(values: list[float]) -> float:
    return sorted(values)[max(int(len(values) * 0.99) - 1, 0)]


def render(results: dict) -> str:
    lines = [BEGIN, "## Placement on a 4-GPU box (per device vs single pool)", "",
             f"`python -m benchmarks.placement`: {results['switches']} switches (seed {results['seed']}) replayed "
             "on `dashboard/catalogs/demo-4gpu.toml` (4 × 80 GB; one model over 2 GPUs), no processes. Load time "
             "is each model's catalog load time; victims are stopped. The single pool decides victims against "
             "the sum of free memory and its target then goes to the first device set with room; where none "
             "has room the load runs out of memory (its time is lost) and is retried per device.", "",
             "| planner | strategy | loads | evictions | loads out of memory | GB loaded | load time | "
             "devices overcommitted |", "|---|---|---|---|---|---|---|---|"]
    for row in results["replays"]:
        t = row["tally"]
        lines.append(f"| {row['planner'].replace('_', ' ')} | {row['strategy']} | {t['loads']} | {t['evictions']} | "
                     f"{t['failed_loads']} | {t['loaded_gb']:.0f} | {t['load_s']:.0f} s | {t['overcommitted']} |")
    ms = results["timings"]
    lines += ["", "Time to plan one switch (pure function, this machine):", "",
              "| case | median | p99 |", "|---|---|---|",
              f"| single pool, replay states | {ms['pooled_p50']:.3f} ms | {ms['pooled_p99']:.3f} ms |",
              f"| per device, replay states | {ms['per_device_p50']:.3f} ms | {ms['per_device_p99']:.3f} ms |",
              f"| per device, 8 GPUs, 12 models, target over 4 GPUs (70 sets) | {ms['eight_gpus_tp4_p50']:.3f} ms | "
              f"{ms['eight_gpus_tp4_p99']:.3f} ms |", "",
              f"Placement adds {ms['per_device_p99'] - ms['pooled_p99']:.3f} ms to a plan at p99 on the demo "
              f"(target: under 5 ms). {results['machine']}, {results['date']}.", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE), help="the folder of the RESULTS.md to write into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    import os
    import platform

    config = load_config("demo-4gpu")
    targets = sequence(config)
    replays = [{"planner": planner, "strategy": strategy, "tally": replay(config, targets, planner, strategy).__dict__}
               for strategy in ("largest_first", "lru") for planner in ("per_device", "single_pool")]
    results = {"switches": len(targets), "seed": SEED, "sequence": targets, "replays": replays,
               "timings": timings(config, targets),
               "machine": f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d")}
    section = render(results)
    print(section)
    if not args.no_write:
        write_section(Path(args.out) / "RESULTS.md", section, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
