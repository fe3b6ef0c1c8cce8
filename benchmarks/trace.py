"""A working day of a lab, replayed against a real ``smartswitch serve``: the wait people see, per policy.

    python -m benchmarks.trace                 # generate (seeded) or reuse lab-day.json, replay 4 policies
    python -m benchmarks.trace --quick         # 4 researchers, half a day: a smoke run
    python -m benchmarks.trace --generate-only # write lab-day.json and stop

The day: N researchers arrive in the morning and work in sessions until 18:00. Each session picks a model
(usually the researcher's favourite for that time of day, else one by the lab's Zipf popularity) and sends
several chat requests with think times between them. The trace is generated from a seed and stored
(``lab-day.json``), together with the lab's five previous days, which go into the history of every
server as what people asked for (only the pre-warmer reads it).

The replay sends each request through the OpenAI-compatible proxy with ``switch_on_request`` on, so a
request for a model that is not serving waits in the queue while the orchestrator switches: that wait is
what a researcher sees. Engines are sim processes whose start is scaled from a real GPU box: the checkpoint
read at a disk's rate plus the engine's own start (``--read-gbps``, ``--load-seconds``), so a 30B model
takes 47 s cold as vLLM reports; waking from sleep takes the sim's 0.3 s, 3 s at this scale, as vLLM
reports 2.9 s. Time runs ``--speed`` times faster than the trace while anything happens (a load, a queued
request, the pre-warmer deciding) and jumps over stretches where nothing does, so a day replays in
minutes; every figure is given back in the trace's own seconds.

Policies, each on a fresh server with the same history: **cold** (one model at a time, as on-demand
swappers do: each model declares more than half the GPU), **keep-resident** (today's planner: models stay
until the room is needed, largest first), **+ sleep** (victims sleep: weights to host RAM), **+ pre-warm**
(and the pre-warmer fills free room with the likeliest next model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import free_port
from benchmarks.report import markdown_table, percentile, write_section

HERE = Path(__file__).resolve().parent
TRACE_FILE = HERE / "lab-day.json"
SEED = 13
DAY_START_H = 9.0
DAY_END_H = 18.0
HISTORY_DAYS = 5
SPEED = 10.0  # trace seconds per wall second while something happens
BEGIN, END = "<!-- trace:begin -->", "<!-- trace:end -->"

# The lab's GPU box: the demo catalog's models on its 95.9 GB GPU; a real box reads ~2 GB/s from NVMe and
# vLLM's own start (imports, KV cache profile, CUDA graphs, server) takes ~17 s: 60 GB -> 30 + 17 = 47 s.
GPU_GB = 95.9
DISK_GBPS = 2.0
ENGINE_START_S = 17.0
HOST_RAM_GB = 400.0
SLEEP_RESIDUAL = 0.05
MODELS: dict[str, dict[str, Any]] = {
    "gpt-oss-120b": {"name": "GPT-OSS-120B", "size_gb": 183, "gpu_gb": 84},
    "gpt-oss-20b": {"name": "GPT-OSS-20B", "size_gb": 40, "gpu_gb": 20},
    "deepseek-coder-33b": {"name": "DeepSeek-Coder-33B", "size_gb": 66, "gpu_gb": 43},
    "qwen2.5-32b": {"name": "Qwen2.5-32B", "size_gb": 65, "gpu_gb": 38},
    "llama-3.1-8b": {"name": "Llama-3.1-8B", "size_gb": 16, "gpu_gb": 18},
}
POLICIES = ("cold", "keep-resident", "+ sleep", "+ pre-warm")


def cold_load_s(model_id: str) -> float:
    """A cold start on the real box: the checkpoint at the disk's rate plus the engine's own start."""
    return MODELS[model_id]["size_gb"] / DISK_GBPS + ENGINE_START_S


# The day ------------------------------------------------------------------------------------------------
@dataclass
class Session:
    researcher: str
    start: float  # trace seconds since 09:00
    model: str
    think_s: list[float]  # between its requests: len(think_s) + 1 requests


@dataclass
class LabDay:
    seed: int
    researchers: int
    day_s: float
    sessions: list[Session]
    history: list[tuple[float, str, str]]  # (seconds before the replayed day's 09:00, researcher, model)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(len(s.think_s) + 1 for s in self.sessions)


def zipf_weights(count: int, s: float) -> list[float]:
    return [1 / (rank + 1) ** s for rank in range(count)]


def generate_day(rng: random.Random, researchers: list[dict[str, Any]], popularity: list[str],
                 weights: list[float], day_s: float) -> list[Session]:
    """One working day: each researcher's sessions, in the order they start."""
    sessions = []
    for who in researchers:
        t = rng.uniform(0, 1.5 * 3600)  # arrives between 09:00 and 10:30
        while t < day_s - 600:
            morning = t < (13 - DAY_START_H) * 3600
            favourite = who["morning"] if morning else who["afternoon"]
            roll = rng.random()
            model = (favourite if roll < 0.6 else who["afternoon"] if morning and roll < 0.75
                     else who["morning"] if roll < 0.75 else rng.choices(popularity, weights)[0])
            count = min(1 + int(math.log(1 - rng.random()) / math.log(0.75)), 12)  # geometric, mean about 4
            thinks = [min(rng.lognormvariate(math.log(45), 0.8), 600.0) for _ in range(count - 1)]
            sessions.append(Session(who["id"], round(t, 1), model, [round(x, 1) for x in thinks]))
            t += sum(thinks) + rng.expovariate(1 / 3600)  # about an hour until the next session
    return sorted(sessions, key=lambda s: s.start)


def make_lab_day(seed: int = SEED, researchers: int = 8, hours: float = DAY_END_H - DAY_START_H) -> LabDay:
    """The replayed day and the five before it, from one seed: the same seed gives the same day."""
    rng = random.Random(seed)
    popularity = list(MODELS)
    rng.shuffle(popularity)  # which model the lab likes most is part of the seed
    weights = zipf_weights(len(popularity), 1.2)
    people = []
    for n in range(researchers):
        picks = []
        while len(picks) < 2:  # two personal favourites, drawn by popularity
            model = rng.choices(popularity, weights)[0]
            if model not in picks:
                picks.append(model)
        rng.shuffle(picks)
        people.append({"id": f"r{n + 1}", "morning": picks[0], "afternoon": picks[1]})
    day_s = hours * 3600
    history = []
    for back in range(HISTORY_DAYS, 0, -1):
        for session in generate_day(rng, people, popularity, weights, day_s):
            history.append((round(back * 86_400 - session.start, 1), session.researcher, session.model))
    sessions = generate_day(rng, people, popularity, weights, day_s)
    return LabDay(seed, researchers, day_s, sessions, history,
                  {"popularity": popularity, "zipf_s": 1.2, "researchers": people})


def save_day(day: LabDay, path: Path) -> None:
    path.write_text(json.dumps(asdict(day), indent=1))


def load_day(path: Path) -> LabDay:
    raw = json.loads(path.read_text())
    raw["sessions"] = [Session(**s) for s in raw["sessions"]]
    raw["history"] = [tuple(h) for h in raw["history"]]
    return LabDay(**raw)


# The server per policy ----------------------------------------------------------------------------------
def catalog(policy: str, speed: float) -> str:
    """The lab's catalog for one policy, its sim engines scaled ``speed`` times faster than the real box."""
    sleep = policy in ("+ sleep", "+ pre-warm")
    lines = ["[gpu]", 'source = "virtual"', f"total_gb = {GPU_GB}", "", "[switching]",
             'strategy = "largest_first"', f"host_ram_gb = {HOST_RAM_GB:g}", "stall_timeout_s = 60",
             "stop_timeout_s = 10", f"prewarm = {'true' if policy == '+ pre-warm' else 'false'}", "", "[server]",
             "switches_per_minute = 10000", "switch_on_request = true", "queue_timeout_s = 1200", ""]
    for model_id, m in MODELS.items():
        # Cold: every model declares more than half the GPU, so the planner never keeps two.
        declared = max(m["gpu_gb"], GPU_GB / 2 + 1) if policy == "cold" else m["gpu_gb"]
        lines += [f'[models."{model_id}"]', f'name = "{m["name"]}"', f"size_gb = {m['size_gb']}",
                  f"gpu_memory_gb = {declared:g}", f"sleep = {'true' if sleep else 'false'}",
                  f'args = ["--read-gbps", "{DISK_GBPS * speed:g}", "--load-seconds", "{ENGINE_START_S / speed:g}", '
                  '"--token-delay", "0.005"]', ""]
    return "\n".join(lines)


def seed_history(data_dir: Path, day: LabDay, keys: dict[str, str]) -> None:
    """The lab's previous days in the audit log, as the switches its people asked for."""
    from dashboard.orchestrator.history import History

    path = data_dir / "smartswitch.sqlite"
    History(path).close()  # the schema
    now = time.time()
    rows = [(now - before, f"api:{keys[who]}", "switch", model, "success", "{}") for before, who, model in day.history]
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executemany("INSERT INTO audit (at, actor, action, target, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
                       rows)
        db.commit()


class Server:
    """``smartswitch serve`` for one policy, one API key per researcher."""

    def __init__(self, root: Path, text: str, researchers: list[str]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir(mode=0o700)
        self.keys = {who: f"trace-key-{who}-0123456789" for who in researchers}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "catalog.toml").write_text(text)
        self.log = open(root / "server.log", "wb")  # noqa: SIM115 - open as long as the server runs
        self.admin = self.keys[researchers[0]]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "SMARTSWITCH_API_KEYS": ",".join(self.keys.values())}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.cli", "serve", "--config", str(self.root / "catalog.toml"),
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smartswitch serve exited; see {self.root / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("smartswitch serve did not come up in 90 s")

    def key_ids(self) -> dict[str, str]:
        """Each researcher's key id, as the audit log names it (the data dir's salt makes it)."""
        from dashboard.api.auth import key_id, key_salt

        salt = key_salt(self.data_dir)
        return {who: key_id(key, salt) for who, key in self.keys.items()}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# The replay -------------------------------------------------------------------------------------------
class ReplayClock:
    """Trace time against the wall: ``speed`` times faster, jumping ahead over stretches where nothing happens."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._wall0 = time.monotonic()
        self._t0 = 0.0
        self._moved = asyncio.Event()
        self.sleepers: list[float] = []
        self.skipped = 0.0

    def now(self) -> float:
        return self._t0 + (time.monotonic() - self._wall0) * self.speed

    def jump(self, to: float) -> None:
        now = self.now()
        if to > now:
            self.skipped += to - now
            self._t0, self._wall0 = to, time.monotonic()
            self._moved.set()
            self._moved = asyncio.Event()

    async def until(self, t: float) -> None:
        self.sleepers.append(t)
        try:
            while (left := t - self.now()) > 0:
                moved = self._moved
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left / self.speed):
                        await moved.wait()
        finally:
            self.sleepers.remove(t)


@dataclass
class Request:
    researcher: str
    model: str
    session: int
    index: int
    sent: float  # trace seconds
    latency_wall: float = 0.0
    hit: bool = False  # its model was serving when it was sent
    error: str | None = None


@dataclass
class Replay:
    policy: str
    requests: list[Request] = field(default_factory=list)
    memory: list[tuple[float, float]] = field(default_factory=list)  # (trace seconds, GB of the real footprints)
    cold_loads: int = 0
    wakes: int = 0
    prewarm_loads: int = 0
    wall_s: float = 0.0
    skipped_s: float = 0.0
    in_flight: int = 0
    done: bool = False


def real_gb(models: dict[str, Any]) -> float:
    """GPU memory the models really hold (the cold policy's catalog over-declares on purpose)."""
    total = 0.0
    for model_id, entry in models.items():
        if entry["status"] in ("running", "loading", "unloading"):
            total += MODELS[model_id]["gpu_gb"]
        elif entry["status"] == "sleeping":
            total += MODELS[model_id]["gpu_gb"] * SLEEP_RESIDUAL
    return total


async def watch(server: Server, clock: ReplayClock, replay: Replay, serving: dict[str, bool]) -> None:
    """Poll the status: what serves, loads and wakes, memory; and jump the clock when all is quiet."""
    headers = {"Authorization": f"Bearer {server.admin}"}
    before: dict[str, str] = {}
    calm = 0
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        while not replay.done:
            status = (await http.get(f"{server.url}/v1/models/status")).json()
            models = status["models"]
            op = status.get("operation") or {}
            for model_id, entry in models.items():
                was, now = before.get(model_id, "stopped"), entry["status"]
                serving[model_id] = now == "running"
                if now == "loading" and was != "loading":
                    if was == "sleeping":
                        replay.wakes += 1
                    else:
                        replay.cold_loads += 1
                        replay.prewarm_loads += op.get("kind") == "prewarm"
                before[model_id] = now
            replay.memory.append((clock.now(), real_gb(models)))
            prewarm = (status.get("prewarm") or {}).get("state", "off")
            quiet = (not status.get("operation") and not status.get("request_queue") and replay.in_flight == 0
                     and prewarm in ("idle", "off") and all(m["status"] not in ("loading", "unloading")
                                                            for m in models.values()))
            calm = calm + 1 if quiet else 0
            if calm >= 3 and clock.sleepers:  # quiet for three polls in a row: nothing will happen until then
                clock.jump(min(clock.sleepers))
                calm = 0
            await asyncio.sleep(0.02)


async def run_session(server: Server, clock: ReplayClock, replay: Replay, number: int, session: Session,
                      serving: dict[str, bool]) -> None:
    await clock.until(session.start)
    key = server.keys[session.researcher]
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=1800) as http:
        for index in range(len(session.think_s) + 1):
            request = Request(session.researcher, session.model, number, index, clock.now(),
                              hit=serving.get(session.model, False))
            replay.in_flight += 1
            began = time.monotonic()
            try:
                response = await http.post(f"{server.url}/v1/chat/completions", json={
                    "model": session.model, "max_tokens": 2, "stream": False,
                    "messages": [{"role": "user", "content": f"question {index + 1}"}]})
                if response.status_code != 200:
                    request.error = f"{response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                request.error = f"{type(exc).__name__}: {exc}"
            finally:
                request.latency_wall = time.monotonic() - began
                replay.in_flight -= 1
            replay.requests.append(request)
            if index < len(session.think_s):
                await clock.until(clock.now() + session.think_s[index])


async def replay_day(server: Server, day: LabDay, policy: str, speed: float) -> Replay:
    replay = Replay(policy)
    clock = ReplayClock(speed)
    serving: dict[str, bool] = {}
    began = time.monotonic()
    watcher = asyncio.ensure_future(watch(server, clock, replay, serving))
    try:
        await asyncio.gather(*(run_session(server, clock, replay, n, s, serving) for n, s in enumerate(day.sessions)))
    finally:
        replay.done = True
        await asyncio.gather(watcher, return_exceptions=True)
    replay.wall_s, replay.skipped_s = time.monotonic() - began, clock.skipped
    replay.memory.append((day.day_s, replay.memory[-1][1] if replay.memory else 0.0))
    return replay


def run_policy(root: Path, day: LabDay, policy: str, speed: float) -> Replay:
    researchers = sorted({s.researcher for s in day.sessions} | {who for _, who, _ in day.history})
    server = Server(root / re.sub(r"\W+", "-", policy).strip("-"), catalog(policy, speed), researchers)
    try:
        ids = server.key_ids()
        seed_history(server.data_dir, day, ids)
        server.start()
        return asyncio.run(replay_day(server, day, policy, speed))
    finally:
        server.stop()


# Figures ----------------------------------------------------------------------------------------------
def waits(replay: Replay, speed: float) -> list[float]:
    """Each request's wait in the trace's seconds: its latency beyond a served request's, scaled back."""
    served = [r.latency_wall for r in replay.requests if r.hit and r.error is None]
    base = statistics.median(served) if served else 0.0
    return [max(r.latency_wall - base, 0.0) * speed for r in replay.requests if r.error is None]


def summary(replay: Replay, speed: float, day_s: float) -> dict[str, Any]:
    every = waits(replay, speed)
    ordered = sorted(replay.requests, key=lambda r: (r.session, r.index))
    served = [r.latency_wall for r in replay.requests if r.hit and r.error is None]
    base = statistics.median(served) if served else 0.0
    first = [max(r.latency_wall - base, 0.0) * speed for r in ordered if r.index == 0 and r.error is None]
    weighted = sum((t2 - t1) * gb for (t1, gb), (t2, _) in zip(replay.memory, replay.memory[1:], strict=False)
                   if t2 > t1)
    span = replay.memory[-1][0] - replay.memory[0][0] if len(replay.memory) > 1 else day_s
    return {
        "policy": replay.policy, "requests": len(replay.requests),
        "errors": sum(r.error is not None for r in replay.requests),
        "wait_p50": statistics.median(every), "wait_p90": percentile(every, 90), "wait_max": max(every),
        "waited_over_5s": sum(w > 5 for w in every) / len(every),
        "first_p50": statistics.median(first), "first_p90": percentile(first, 90), "first_max": max(first),
        "memory_mean_gb": weighted / span if span > 0 else 0.0,
        "memory_peak_gb": max(gb for _, gb in replay.memory),
        "cold_loads": replay.cold_loads, "wakes": replay.wakes, "prewarm_loads": replay.prewarm_loads,
        "wall_s": replay.wall_s, "skipped_s": replay.skipped_s, "served_latency_wall_s": base,
    }


def render(results: dict[str, Any]) -> str:
    rows = [[s["policy"], f"{s['wait_p50']:.1f} s", f"{s['wait_p90']:.1f} s", f"{s['wait_max']:.0f} s",
             f"{100 * s['waited_over_5s']:.0f} %", f"{s['first_p50']:.1f} s", f"{s['first_p90']:.1f} s",
             f"{s['memory_mean_gb']:.0f} GB ({100 * s['memory_mean_gb'] / GPU_GB:.0f} %)",
             f"{s['memory_peak_gb']:.0f} GB", f"{s['cold_loads']} ({s['prewarm_loads']} pre-warm)", str(s["wakes"])]
            for s in results["policies"]]
    day = results["day"]
    loads = ", ".join(f"{m} {cold_load_s(m):.0f} s" for m in MODELS)
    errors = sum(s["errors"] for s in results["policies"])
    lines = [
        BEGIN, "## A lab's working day, replayed", "",
        f"Produced by `{results['command']}` on {results['date']} in {results['duration_s'] / 60:.1f} minutes "
        f"({results['machine']}).", "",
        f"The day (`benchmarks/lab-day.json`, seed {day['seed']}): {day['researchers']} researchers from 09:00 to "
        f"18:00, {day['sessions']} sessions, {day['requests']} chat requests; model popularity Zipf (s = 1.2), "
        "each researcher with a morning and an afternoon favourite, sessions of 1 to 12 requests with think times "
        "of about 45 s. The five days before it are in every server's history as what people asked for.", "",
        f"The box: the demo's five models on its {GPU_GB} GB GPU; a cold start is the checkpoint at "
        f"{DISK_GBPS:g} GB/s plus {ENGINE_START_S:g} s of engine start ({loads}); waking from sleep 3 s. "
        f"Sim engines run this {results['speed']:g} times faster; the replay runs the trace at that speed "
        "while anything happens and jumps over the stretches where nothing does. Every figure below is in "
        "the trace's own seconds.", "",
        markdown_table(["policy", "wait: median", "p90", "max", "requests that waited > 5 s",
                        "session's first request: median", "p90", "GPU memory in use (mean)", "peak",
                        "cold loads", "wakes"], rows), "",
        "A request's wait is its time to answer beyond that of a request whose model was serving (measured in"
        " the same run: about"
        f" {1000 * statistics.median(s['served_latency_wall_s'] for s in results['policies']):.0f} ms of wall"
        " time), scaled back to the trace. GPU memory is what the models really hold (running or loading: their"
        " footprint; asleep: 5 % of it), averaged over the day. **cold** makes every model declare more than"
        " half the GPU so the planner never keeps two; its memory figure still counts the real footprints.", "",
        "Reading the table: most requests of a session find their model serving under every policy, so the"
        " medians are small everywhere but for cold; the p90 and the maximum are the loads people sat through."
        " A session's first request is the wait a researcher notices when coming back to work.", "",
        "Limits of the replay: the server's clock runs at wall speed, so within the replayed day the pre-warmer's"
        " time-of-day view sees its history's hours, not the trace's (recency and frequency act as they would);"
        " its 3 s quiet period before a pre-warm is 30 s of the trace. Orchestrator overheads (process spawn,"
        " readiness polling) are real wall time and are scaled up with the rest."
        + (f" {errors} request(s) failed and are left out." if errors else ""), "",
        END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trace", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--researchers", type=int, default=8)
    parser.add_argument("--speed", type=float, default=SPEED, help="trace seconds per wall second while busy")
    parser.add_argument("--quick", action="store_true", help="4 researchers, half a day; nothing is written")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma separated, of: " + ", ".join(POLICIES))
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--out", default=str(HERE), help="where RESULTS.md and trace.json go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.quick:
        day = make_lab_day(args.seed, 4, hours=4.5)
    else:
        day = make_lab_day(args.seed, args.researchers)
        stored = out / TRACE_FILE.name
        if stored.exists() and load_day(stored) != day:
            print(f"{stored} differs from seed {args.seed}'s day: it is written anew")
        save_day(day, stored)
    print(f"day: {len(day.sessions)} sessions, {day.requests} requests, {len(day.history)} earlier asks")
    if args.generate_only:
        return 0
    policies = [p.strip() for p in args.policies.split(",")]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="smartswitch-trace-"))
    summaries = []
    raw = []
    try:
        for policy in policies:
            print(f"{policy}: replaying", flush=True)
            replay = run_policy(root, day, policy, args.speed)
            summaries.append(summary(replay, args.speed, day.day_s))
            raw.append({"policy": policy, "requests": [asdict(r) for r in replay.requests]})
            s = summaries[-1]
            print(f"{policy}: wait median {s['wait_p50']:.1f} s, p90 {s['wait_p90']:.1f} s, max {s['wait_max']:.0f} s; "
                  f"memory {s['memory_mean_gb']:.0f} GB; {s['cold_loads']} cold loads, {s['wakes']} wakes; "
                  f"{s['wall_s']:.0f} s wall", flush=True)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    import platform

    results = {"command": "python -m benchmarks.trace" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d"), "duration_s": time.monotonic() - began, "speed": args.speed,
               "machine": f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores",
               "day": {"seed": day.seed, "researchers": day.researchers, "sessions": len(day.sessions),
                       "requests": day.requests},
               "policies": summaries, "raw": raw}
    section = render(results)
    print(section)
    if not args.quick:
        (out / "trace.json").write_text(json.dumps(results, indent=1))
        write_section(out / "RESULTS.md", section, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
