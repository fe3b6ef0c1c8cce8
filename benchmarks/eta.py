"""ETA accuracy on a model's first load and after three loads, and when "this may take a while" fires.

Run by ``python -m benchmarks.run`` (and alone with ``--only-eta``, merged into results.json). Each engine
gets a fresh server: its first load has only the box's prior; the first loads of the other models use what
that load taught (the disk's read rate, the engine's start costs); then every model loads three more times
and the next load is judged with its own history. Loads are switches through the API's SSE stream; the
error of the ETA shown when the bar first reached 25, 50 and 75 % is against the time really left.

The sim box reads checkpoints at one rate with one engine start cost (``--read-gbps``, ``--load-seconds``),
as a real box does; besides it loads a checkpoint big enough to take over a minute, and a model on a disk
four times slower than the box's usual one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import ServerProcess, SwitchSample, now
from benchmarks.report import ETA_MARKS, eta_errors, fmt_pct, markdown_table, median_or_none
from dashboard.events import CompleteEvent, ProgressEvent

AFTER_LOADS = 3
LONG_S = 60.0

# One box, a real one five times faster: checkpoints read at 10 GB/s (an NVMe's 2 GB/s) and 3.4 s of engine start
# (vLLM's 17 s: a 60 GB model takes 47 s cold, here 9.4 s).
SIM_BOX = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 60
stop_timeout_s = 10

[server]
switches_per_minute = 1000
"""
SIM_MODELS = {  # id: (checkpoint GB, read rate GB/s)
    "m16": (16, 10), "m40": (40, 10), "m66": (66, 10), "m120": (120, 10),
    "giant": (600, 10),  # over a minute: 60 s of weights
    "slowdisk": (40, 2.5),  # on a disk four times slower than the box's usual one
}
ENGINE_START_S = 3.4
SIM_ROTATION = ("m40", "m16", "m66", "m120")  # m40 first: the fresh box's only first load with no box figures


def sim_catalog() -> str:
    text = SIM_BOX
    for model_id, (size, rate) in SIM_MODELS.items():
        # Each declares 60 of the 100 GB: every switch unloads the model before, as the main benchmark does.
        text += (f'\n[models.{model_id}]\nname = "{model_id}"\nsize_gb = {size}\ngpu_memory_gb = 60\n'
                 f'args = ["--read-gbps", "{rate}", "--load-seconds", "{ENGINE_START_S}"]\n')
    return text


def timed_load(server: ServerProcess, engine: str, target: str) -> tuple[SwitchSample, bool, float | None]:
    """A switch to ``target`` through the SSE stream: its progress samples, whether it said "this may take a
    while", and the ETA it showed first."""
    sample = SwitchSample(engine, target, now())
    fired, first_eta, final = False, None, None
    for event in server.client.switch_events(target):
        if isinstance(event, ProgressEvent):
            sample.progress.append((now(), event.progress, event.eta_seconds))
            fired = fired or event.slow
            if first_eta is None and event.eta_seconds is not None and event.stage != "checking_memory":
                first_eta = event.eta_seconds
        final = event
    sample.done = now()
    if not (isinstance(final, CompleteEvent) and final.status == "success"):
        raise RuntimeError(f"{engine}: the switch to {target} ended {final}")
    sample.outcome = final.status
    return sample, fired, first_eta


def record(sample: SwitchSample, fired: bool, first_eta: float | None, kind: str) -> dict[str, Any]:
    return {"target": sample.target, "kind": kind, "wall": sample.wall, "fired": fired,
            "first_eta_error": (first_eta - sample.wall) / sample.wall if first_eta is not None else None,
            "errors": {str(k): v for k, v in eta_errors(sample).items()}}


def run_eta(server: ServerProcess, engine: str, rotation: tuple[str, ...], extra: tuple[tuple[str, str], ...],
            step: Callable[[str], None]) -> list[dict[str, Any]]:
    """First loads (the first on a fresh box), three more rounds, one judged round; then ``extra`` loads."""
    loads: list[dict[str, Any]] = []
    rounds = [("first_fresh" if i == 0 else "first_learned") for i in range(len(rotation))]
    plan = list(zip(rotation, rounds, strict=True))
    plan += [(m, "history") for _ in range(AFTER_LOADS - 1) for m in rotation]
    plan += [(m, "after_3") for m in rotation]
    plan += list(extra)
    for n, (target, kind) in enumerate(plan, 1):
        sample, fired, first_eta = timed_load(server, engine, target)
        loads.append(record(sample, fired, first_eta, kind))
        step(f"{engine}: ETA load {n}/{len(plan)}: {target} ({kind}) in {sample.wall:.1f} s")
    return loads


def sim_server(root: Path) -> ServerProcess:
    return ServerProcess(root / "eta-sim", sim_catalog())


# The slow disk's load is kept out of the first-load rows: it is there to show the warning.
SIM_EXTRA = (("giant", "first_learned"), ("m16", "between"), ("giant", "second"), ("slowdisk", "slow_disk"))


def load_count(engines: list[str]) -> int:
    per = {"sim": len(SIM_ROTATION) * (AFTER_LOADS + 1) + len(SIM_EXTRA), "vLLM CPU": 2 * (AFTER_LOADS + 1)}
    return sum(per[e] for e in engines)


# Rendering (called by benchmarks.run's render) -------------------------------------------------------
def _errors(loads: list[dict[str, Any]], kinds: tuple[str, ...], mark: str) -> list[float]:
    return [x["errors"][mark] for x in loads if x["kind"] in kinds and mark in x["errors"]]


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    worst = max(values, key=abs)
    return f"{fmt_pct(median_or_none([abs(v) for v in values]))} / {fmt_pct(worst, signed=True)}"


def _within(values: list[float], limit: float) -> bool:
    return bool(values) and all(abs(v) <= limit for v in values)


def render_section(eta: dict[str, Any]) -> list[str]:
    rows = []
    groups = (("first load on a fresh box (its prior only)", ("first_fresh",), None),
              ("first load of a model, on a box that has loaded others", ("first_learned",), 0.35),
              (f"after {AFTER_LOADS} loads of the model", ("after_3",), 0.15))
    for engine, loads in eta["engines"].items():
        for label, kinds, target in groups:
            picked = [x for x in loads if x["kind"] in kinds]
            if not picked:
                continue
            marks = [_errors(loads, kinds, str(m)) for m in ETA_MARKS]
            starts = [x["first_eta_error"] for x in picked if x["first_eta_error"] is not None]
            goal = "" if target is None else f"within {100 * target:.0f} %"
            judged = engine == "sim" and target is not None
            verdict = ("met" if all(_within(v, target) for v in marks) else "**missed**") if judged else (
                "reported")
            rows.append([engine, label, str(len(picked)), _cell(starts), *[_cell(v) for v in marks],
                         goal if engine == "sim" else "reported", verdict])
    spread = []
    for engine, loads in eta["engines"].items():
        worst = 0.0
        for target in {x["target"] for x in loads if x["kind"] in ("history", "after_3")}:
            walls = [x["wall"] for x in loads if x["target"] == target and x["kind"] in ("history", "after_3")]
            worst = max(worst, (max(walls) - min(walls)) / statistics.median(walls))
        spread.append(f"{engine}: {fmt_pct(worst)}")
    fired = []
    for engine, loads in eta["engines"].items():
        long = [x for x in loads if x["wall"] > LONG_S]
        short = [x for x in loads if x["wall"] <= LONG_S and x["target"] != "slowdisk"]
        slow = [x for x in loads if x["target"] == "slowdisk"]
        fired.append([engine, _share(long), _share(short), _share(slow)])
    run = eta["run"]
    return [
        "## ETA on a model's first load, and after 3 loads", "",
        f"From `{run['command']}` on {run['date']} ({run['duration_s'] / 60:.1f} minutes). Each engine starts on"
        " a fresh box: its first load knows only the box's prior; the first loads of the other models use what"
        " the loads before them taught (the disk's read rate, the engine's start costs for its kind and GPU"
        f" count); then each model loads {AFTER_LOADS - 1} more times and the next load is judged with its own"
        " history. Each cell: median of the absolute errors / the worst, signed (+ means the ETA said more time"
        " than was left). 'At start' is the first ETA the switch showed against its whole time.", "",
        markdown_table(["engine", "load", "loads", "ETA at start", *[f"at {m} %" for m in ETA_MARKS], "target",
                        "verdict"], rows), "",
        "How much the same model's load time varies in this run, (slowest − fastest) / median: "
        + ", ".join(spread) + ". The sim box reads every checkpoint at one rate with one engine start cost, as a"
        " real box does; the vLLM CPU models are tiny, so their whole start is the engine's own cost.", "",
        "\"This may take a while\" (with the bytes read so far) is shown when more than a minute is left or the"
        " checkpoint reads at under half the usual rate. How often it fired:", "",
        markdown_table(["engine", "loads that took over a minute", "loads under a minute at the usual rate",
                        "loads from a disk 4 times slower than usual"], fired), "",
    ]


def _share(loads: list[dict[str, Any]]) -> str:
    if not loads:
        return "none in this run"
    return f"{sum(x['fired'] for x in loads)} of {len(loads)}"
