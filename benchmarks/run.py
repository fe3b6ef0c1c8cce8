"""The smartswitch benchmark: switching, readiness, ETAs, API load and the dashboard, measured from outside.

    python -m benchmarks.run                # sim and real vLLM (CPU build), writes benchmarks/RESULTS.md
    python -m benchmarks.run --quick        # fewer rounds, for a quick look
    python -m benchmarks.run --skip-vllm    # without the vLLM venv
    python -m benchmarks.run --only-failures  # only the killed-engine rounds, merged into results.json
    python -m benchmarks.run --only-eta       # only the first-load ETA rounds, merged the same way

Every figure comes from a real ``smartswitch serve`` process driven through its HTTP API, with real
engine processes and, for the dashboard, Chromium. The raw samples go to ``results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks import eta as eta_bench
from benchmarks.harness import (
    ProgressBar,
    ServerProcess,
    SwitchSample,
    hammer_status,
    reset_peak_rss,
    rss_mb,
    timed_failure,
    timed_switch,
)
from benchmarks.report import (
    ETA_MARKS,
    eta_errors,
    eta_figure,
    fmt_ms,
    fmt_pct,
    fmt_s,
    machine,
    markdown_table,
    median_or_none,
    percentile,
    save_png,
    timeline_figure,
    verdict,
    vllm_version,
)
from dashboard.events import CompleteEvent

HERE = Path(__file__).resolve().parent
HISTORY_LOADS = 3  # loads of each model before its ETA is judged
CLIENT_COUNTS = (1, 16, 64)
SESSION_COUNTS = (1, 5)  # open pages; more only measures how 2 cores share one browser
LATENCY_ROUNDS = 11  # switches timed in the page: a median of a few would swing with the 2 shared cores
PAGE_VIEWS = 200  # plain `GET /`, each a session the server makes and must give back
FAILURE_ROUNDS = {"sim": 3, "vLLM CPU": 2}  # engines killed mid-load (1 each with --quick)
# Into the load but not near its end: the sim's beta loads in 4 s; vLLM has printed its first lines.
KILL_AFTER_S = {"sim": 1.0, "vLLM CPU": 4.0}
FAILURE_TIMEOUT_S = {"sim": 90.0, "vLLM CPU": 300.0}  # past each catalog's stall timeout
ERROR_TARGET_S = {"sim": 2.0, "vLLM CPU": 5.0}  # kill to the stream's error event
FAILED_TARGET_S = 1.0  # kill to the status saying failed

SIM_CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 60
stop_timeout_s = 10

[server]
switches_per_minute = 1000
page_views_per_minute = 100000

[models.alpha]
name = "Alpha-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "3"]

[models.beta]
name = "Beta-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "4"]
"""

# Two tiny Llama models that "need" 6 of 10 virtual GB each: every switch unloads the other one.
VLLM_MODEL = """
[models.{id}]
name = "{name}"
engine = "vllm"
path = "{path}"
size_gb = 0.002
gpu_memory_gb = 6
args = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
"""


def vllm_catalog(home: Path) -> str:
    return ('[gpu]\nsource = "virtual"\ntotal_gb = 10\n\n[switching]\nstall_timeout_s = 240\nstop_timeout_s = 20\n\n'
            '[server]\nswitches_per_minute = 1000\n'
            + VLLM_MODEL.format(id="alpha", name="Tiny-A", path=home / "models" / "tiny-a")
            + VLLM_MODEL.format(id="beta", name="Tiny-B", path=home / "models" / "tiny-b"))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="smartswitch-bench-"))
        self.measured = 2 if args.quick else 4  # judged loads per engine, after the history
        self.hammer_seconds = 2.0 if args.quick else 5.0
        self.engines = ["sim"] + ([] if args.skip_vllm else ["vLLM CPU"])
        self.switches = 1 + 2 * HISTORY_LOADS + self.measured
        self.failure_rounds = {e: 1 if args.quick else FAILURE_ROUNDS[e] for e in self.engines}
        kills = sum(self.failure_rounds.values())
        if args.only_failures:
            total = kills + len(self.engines) + 1  # a first load of alpha on each engine's own server
        elif args.only_eta:
            total = eta_bench.load_count(self.engines) + 1
        elif args.only_dashboard:
            total = len(SESSION_COUNTS) + 3
        else:
            dashboard = 0 if args.skip_dashboard else len(SESSION_COUNTS) + 2
            total = (len(self.engines) * (self.switches + len(CLIENT_COUNTS)) + kills + dashboard + 1
                     + eta_bench.load_count(self.engines))
        self.bar = ProgressBar(total)
        self.results: dict[str, Any] = {"engines": {}}
        self.samples: dict[str, list[SwitchSample]] = {}

    # Engines ----------------------------------------------------------------------------------
    def engine_server(self, engine: str) -> ServerProcess:
        if engine == "sim":
            return ServerProcess(self.root / "sim", SIM_CATALOG)
        home = Path(self.args.vllm_home)
        return ServerProcess(self.root / "vllm", vllm_catalog(home),
                             env={"SMARTSWITCH_VLLM_PYTHON": str(home / "venv" / "bin" / "python")})

    def run_engine(self, engine: str) -> None:
        self.bar.show(f"{engine}: starting the server")
        server = self.engine_server(engine)
        samples: list[SwitchSample] = []
        growth: list[float] = []
        try:
            first_rss = rss_mb(server.proc.pid)
            for i in range(self.switches):
                target = ("alpha", "beta")[i % 2]
                before = rss_mb(server.proc.pid)
                reset_peak_rss(server.proc.pid)
                sample = timed_switch(server, engine, target)
                growth.append((rss_mb(server.proc.pid, "VmHWM") - before) / before)
                if sample.outcome != "success":
                    raise RuntimeError(f"{engine}: the switch to {target} ended {sample.outcome}")
                samples.append(sample)
                self.bar.step(f"{engine}: switch {i + 1}/{self.switches} to {target} in {sample.wall:.1f} s")
            last_rss = rss_mb(server.proc.pid)
            status = self.hammer(server, engine)
            failure = self.failures(server, engine)
        finally:
            server.stop()
        self.samples[engine] = samples
        judged = samples[1 + 2 * HISTORY_LOADS:]
        errors = [eta_errors(s) for s in judged]
        self.results["engines"][engine] = {
            "switches": [{"target": s.target, "wall": s.wall, "engine_start": s.engine_start,
                          "readiness": s.readiness, "overhead": s.load_overhead,
                          "unload": (s.victim_gone - s.started) if s.victim_gone else None,
                          "progress": s.progress} for s in samples],
            "eta_errors": [{str(k): v for k, v in e.items()} for e in errors],
            "rss_growth_per_switch": growth,
            "rss_mb": {"first": first_rss, "last": last_rss},
            "status": status,
            "failure": failure,
        }

    def hammer(self, server: ServerProcess, engine: str) -> dict[str, dict[str, float]]:
        """Status latency under 1, 16 and 64 clients while switches run back to back."""
        stop = threading.Event()

        def keep_switching() -> None:
            from dashboard.client import SmartswitchClient

            with SmartswitchClient(server.url, server.headers["Authorization"].split()[1], timeout=600) as client:
                i = 0
                while not stop.is_set():
                    client.switch_and_wait(("beta", "alpha")[i % 2])
                    i += 1

        switcher = threading.Thread(target=keep_switching, daemon=True)
        switcher.start()
        out: dict[str, dict[str, float]] = {}
        try:
            for clients in CLIENT_COUNTS:
                self.bar.show(f"{engine}: GET /v1/models/status with {clients} clients during switches")
                latencies, seconds = asyncio.run(hammer_status(server.port, clients, self.hammer_seconds))
                out[str(clients)] = {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                                     "rps": len(latencies) / seconds, "requests": len(latencies)}
                self.bar.step(f"{engine}: {clients} clients: p99 {out[str(clients)]['p99'] * 1000:.1f} ms")
        finally:
            stop.set()
            switcher.join(600)
        return out

    def failures(self, server: ServerProcess, engine: str) -> list[dict[str, Any]]:
        """Alpha running, a switch to beta whose engine is SIGKILLed mid-load; the rollback brings alpha back."""
        if server.status()["models"]["alpha"]["status"] != "running":
            last = server.client.switch_and_wait("alpha")
            if not (isinstance(last, CompleteEvent) and last.status in ("success", "already_loaded")):
                raise RuntimeError(f"{engine}: the switch to alpha ended {last}")
        out = []
        rounds = self.failure_rounds[engine]
        for i in range(rounds):
            self.bar.show(f"{engine}: killing beta's engine mid-load {i + 1}/{rounds}")
            sample = timed_failure(server, "beta", KILL_AFTER_S[engine], FAILURE_TIMEOUT_S[engine])
            out.append(sample.as_dict())
            self.bar.step(f"{engine}: killed mid-load: error after {fmt_s(sample.to_error)}")
            alpha = server.status()["models"]["alpha"]["status"]
            if alpha != "running":  # the next round starts from alpha running, as this one did
                raise RuntimeError(f"{engine}: after the rollback alpha is {alpha}, not running")
        return out

    def run_failures_only(self, engine: str) -> None:
        self.bar.show(f"{engine}: starting the server")
        server = self.engine_server(engine)
        try:
            last = server.client.switch_and_wait("alpha")
            if not (isinstance(last, CompleteEvent) and last.status == "success"):
                raise RuntimeError(f"{engine}: the first switch to alpha ended {last}")
            self.bar.step(f"{engine}: alpha running")
            self.results["engines"][engine]["failure"] = self.failures(server, engine)
        finally:
            server.stop()

    def run_eta(self, command: str) -> None:
        """First-load ETAs, after-3-loads ETAs and the "this may take a while" counts, each engine on a fresh box."""
        began = time.monotonic()
        out: dict[str, Any] = {}
        for engine in self.engines:
            self.bar.show(f"{engine}: ETA rounds: starting a fresh server")
            if engine == "sim":
                server, rotation, extra = eta_bench.sim_server(self.root), eta_bench.SIM_ROTATION, eta_bench.SIM_EXTRA
            else:
                home = Path(self.args.vllm_home)
                server = ServerProcess(self.root / "eta-vllm", vllm_catalog(home),
                                       env={"SMARTSWITCH_VLLM_PYTHON": str(home / "venv" / "bin" / "python")})
                rotation, extra = ("alpha", "beta"), ()
            try:
                out[engine] = eta_bench.run_eta(server, engine, rotation, extra, self.bar.step)
            finally:
                server.stop()
        self.results["eta"] = {"engines": out, "run": {"command": command, "date": dt.date.today().isoformat(),
                                                       "duration_s": time.monotonic() - began}}

    # Dashboard --------------------------------------------------------------------------------
    def run_dashboard(self) -> None:
        from playwright.sync_api import sync_playwright

        self.bar.show("dashboard: starting the server")
        server = ServerProcess(self.root / "dashboard", SIM_CATALOG)
        pid = server.proc.pid
        memory: dict[str, float] = {}
        latency: dict[str, dict[str, list[float]]] = {}
        cpu: dict[str, dict[str, float]] = {}
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=self.args.chromium,
                                            args=["--no-sandbox", "--disable-gpu", "--disable-quic"])
                settle()
                memory["0"] = rss_mb(pid)
                pages: list[Any] = []
                opening = StatusPoller(server)
                for count in SESSION_COUNTS:
                    with opening:
                        while len(pages) < count:
                            page = browser.new_page(viewport={"width": 1400, "height": 900})
                            page.goto(server.url + "/")
                            page.locator(".picker-trigger").first.wait_for(timeout=120_000)
                            pages.append(page)
                    settle()
                    memory[str(count)] = rss_mb(pid)
                    before = cpu_seconds(pid), cpu_seconds_of("chromium")
                    began = time.monotonic()
                    if count == SESSION_COUNTS[0]:
                        latency[str(count)] = self.dashboard_latency(server, pages[0])
                    else:  # 10 rendering pages already take the 2 cores: measure the CPU only
                        server.client.switch_and_wait(other_model(server))
                    spent = time.monotonic() - began
                    cpu[str(count)] = {"server": (cpu_seconds(pid) - before[0]) / spent,
                                       "chromium": (cpu_seconds_of("chromium") - before[1]) / spent}
                    self.bar.step(f"dashboard: {count} sessions, server RSS {memory[str(count)]:.0f} MB")
                for page in pages:
                    page.close()
                browser.close()
            memory["tabs_closed"] = settled_rss(pid, memory["0"])
            views = self.page_views(server, pid)
        finally:
            server.stop()
        self.results["dashboard"] = {"rss_mb": memory, "latency": latency, "cpu": cpu, "page_views": views,
                                     "tabs_opening": opening.figures()}
        self.bar.step("dashboard: done")

    def page_views(self, server: ServerProcess, pid: int) -> dict[str, Any]:
        """PAGE_VIEWS plain page loads (no browser: a link preview, a scanner) while a client reads the status:
        server CPU per view, memory once any session they made is given back, status latency."""
        idle = settled_rss(pid, 0.0)
        before = cpu_seconds(pid)
        began = time.monotonic()
        with StatusPoller(server) as status, httpx.Client(timeout=60) as client:
            for _ in range(PAGE_VIEWS):
                client.get(f"{server.url}/").raise_for_status()
        spent = time.monotonic() - began
        cpu = cpu_seconds(pid) - before
        peak = rss_mb(pid)
        after = settled_rss(pid, idle)
        self.bar.step(f"dashboard: {PAGE_VIEWS} page views, RSS {idle:.0f} -> {after:.0f} MB")
        return {"views": PAGE_VIEWS, "cpu_s_per_view": cpu / PAGE_VIEWS, "views_per_s": PAGE_VIEWS / spent,
                "rss_idle_mb": idle, "rss_peak_mb": peak, "rss_after_mb": after, **status.figures()}

    def dashboard_latency(self, server: ServerProcess, page: Any) -> dict[str, list[float]]:
        """Switch request to the banner shown, and model ready to the chat unlocked, on the page's own clock.

        The page notes (``Date.now()``, the wall clock this process reads too: one machine) the first animation
        frame at which the strip holds the banner, or the chat's input is enabled. Playwright's view of the same
        moments is kept beside: it starts looking only once the API has answered, and each look is a round
        trip to the browser, so it adds the request's answer and its own polling to the figure."""
        shown, unlocked, seen_by_playwright = [], [], []
        page.bring_to_front()  # a page in the background gets no animation frames to poll on
        banner = page.locator(".switch-banner").first
        for _ in range(3 if self.args.quick else LATENCY_ROUNDS):
            target = other_model(server)
            page.evaluate(WATCH_FOR, ["banner", *BANNER])
            began = time.time()
            server.client.switch(target)
            banner.wait_for(state="visible", timeout=60_000)
            seen_by_playwright.append(time.time() - began)
            shown.append(page.wait_for_function("() => window.__seen_banner", timeout=60_000).json_value() / 1000
                         - began)
            page.evaluate(WATCH_FOR, ["chat", *CHAT_INPUT])
            while server.status()["models"][target]["status"] != "running":
                time.sleep(0.005)
            ready = server.became_running_at(target) or time.time()
            unlocked.append(page.wait_for_function("() => window.__seen_chat", timeout=60_000).json_value() / 1000
                            - ready)
            banner.wait_for(state="detached", timeout=60_000)
        return {"banner_shown": shown, "chat_unlocked": unlocked, "banner_seen_by_playwright": seen_by_playwright}

    # Output -----------------------------------------------------------------------------------
    def write_failures_only(self, command: str, began: float) -> None:
        """Only results.json and RESULTS.md: the plots need switch samples this run did not take."""
        out = Path(self.args.out)
        self.results["failure_run"] = {"command": command, "date": dt.date.today().isoformat(),
                                       "duration_s": time.monotonic() - began}
        (out / "results.json").write_text(json.dumps(self.results, indent=1))
        write_results_md(out / "RESULTS.md", render(self.results))

    def write_merged(self, out: Path) -> None:
        """results.json and RESULTS.md with this run's part merged in (the plots stay as they are)."""
        (out / "results.json").write_text(json.dumps(self.results, indent=1))
        write_results_md(out / "RESULTS.md", render(self.results))

    def write(self, command: str, began: float) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.results.update(machine=machine(), command=command, date=dt.date.today().isoformat(),
                            duration_s=time.monotonic() - began)
        if "vLLM CPU" in self.engines:
            self.results["machine"]["vllm"] = vllm_version(str(Path(self.args.vllm_home) / "venv/bin/python"))
        (out / "results.json").write_text(json.dumps(self.results, indent=1))
        judged = {e: s[1 + 2 * HISTORY_LOADS:] for e, s in self.samples.items()}
        save_png({out / "switch_timeline.png": timeline_figure(self.samples),
                  out / "eta_error.png": eta_figure(judged)}, self.args.chromium)
        write_results_md(out / "RESULTS.md", render(self.results))


MARKED_SECTION = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.S)


def write_results_md(path: Path, text: str) -> None:
    """Write RESULTS.md anew, keeping the sections other benchmarks keep between their ``<!-- NAME:begin -->``
    and ``<!-- NAME:end -->`` markers (the placement replay, the lab trace)."""
    kept = [m.group(0) for m in MARKED_SECTION.finditer(path.read_text())] if path.exists() else []
    path.write_text(text.rstrip("\n") + "\n" + "".join(f"\n{section}\n" for section in kept))


# In the page: note the first animation frame at which ``check`` holds for an element, as window.__seen_<name>
# (ms). The element (``selector``, through Panel's shadow roots, then its ``closest(up)``) is found once
# beforehand, not on every frame: the watch must not slow the page it measures.
WATCH_FOR = """([name, selector, up, check]) => {
  const deep = (root) => {
    const hit = root.querySelector(selector);
    if (hit) return hit;
    for (const el of root.querySelectorAll("*")) {
      const inner = el.shadowRoot && deep(el.shadowRoot);
      if (inner) return inner;
    }
    return null;
  };
  const find = () => { const hit = deep(document); return hit && up ? hit.closest(up) : hit; };
  const test = new Function("el", "return " + check);
  let el = find();
  window["__seen_" + name] = null;
  const frame = () => {
    if (!el || !el.isConnected) el = find();
    if (el && test(el)) { window["__seen_" + name] = Date.now(); return; }
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
}"""
# The strip above the chat (one element, its text replaced) holding a switch's banner; the chat's input enabled.
BANNER = [".chat-header", ".live-html", 'el.querySelector(".switch-banner") !== null']
CHAT_INPUT = ["textarea", "", "!el.disabled"]


class StatusPoller:
    """Reads ``GET /v1/models/status`` back to back while its ``with`` blocks run (one can be entered
    several times; the timings add up)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.timings: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        with httpx.Client(headers=self.server.headers, timeout=30) as client:
            while not self._stop.is_set():
                began = time.perf_counter()
                client.get(f"{self.server.url}/v1/models/status")
                self.timings.append(time.perf_counter() - began)

    def __enter__(self) -> StatusPoller:
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def figures(self) -> dict[str, float]:
        return {"status_p50_ms": 1000 * percentile(self.timings, 50),
                "status_p99_ms": 1000 * percentile(self.timings, 99), "status_requests": len(self.timings)}


def other_model(server: ServerProcess) -> str:
    return "beta" if server.status()["models"]["alpha"]["status"] == "running" else "alpha"


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def cpu_seconds_of(name: str) -> float:
    """CPU time of every process whose command line names ``name`` (all of Chromium's processes)."""
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        if name in " ".join(proc.info["cmdline"] or ()):
            total += cpu_seconds(proc.pid)
    return total


def settled_rss(pid: int, floor: float, timeout: float = 30.0) -> float:
    """The server's RSS once closed sessions are given back: unused sessions expire after 3 s, checked
    every 2 s; wait until it stops falling (or reaches ``floor``)."""
    deadline = time.monotonic() + timeout
    last = rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = rss_mb(pid)
        if now <= floor or last - now < 0.5:
            return now
        last = now
    return rss_mb(pid)


def settle() -> None:
    time.sleep(2.0)  # let the server finish the sessions' first renders before reading its memory


def render(r: dict[str, Any]) -> str:
    engines = list(r["engines"])
    m = r["machine"]

    def each(fn: Any) -> list[str]:
        return [fn(r["engines"][e]) for e in engines]

    def med(e: dict[str, Any], key: str) -> float | None:
        return median_or_none([s[key] for s in e["switches"]])

    def ratio(e: dict[str, Any]) -> str:
        overhead, start = med(e, "overhead"), med(e, "engine_start")
        return f"{fmt_s(overhead)} ({fmt_pct(overhead / start)} of the engine's start)" if overhead and start else "n/a"

    def eta(e: dict[str, Any], mark: int) -> str:
        errs = [x[str(mark)] for x in e["eta_errors"] if str(mark) in x]
        worst = max(errs, key=abs) if errs else None
        return f"median {fmt_pct(median_or_none([abs(x) for x in errs]))}, worst {fmt_pct(worst, signed=True)}"

    def spread(e: dict[str, Any]) -> str:
        worst = 0.0
        for target in {s["target"] for s in e["switches"]}:
            walls = [s["wall"] for s in e["switches"] if s["target"] == target]
            worst = max(worst, (max(walls) - min(walls)) / statistics.median(walls))
        return fmt_pct(worst)

    def eta_ok(e: dict[str, Any]) -> bool:
        return all(abs(v) <= 0.15 for x in e["eta_errors"] for v in x.values())

    def failure(e: dict[str, Any], key: str) -> str:
        values = [x[key] for x in e.get("failure", [])]
        if not values:
            return "n/a"
        if None in values:  # never seen within the round's timeout
            return f"{fmt_s(median_or_none(values))} / not seen in {values.count(None)} of {len(values)}"
        return f"{fmt_s(statistics.median(values))} / {fmt_s(max(values))}"

    def failure_ok(key: str, target: Any) -> bool | None:
        judged = [e for e in engines if r["engines"][e].get("failure")]
        if not judged:
            return None
        return all(x[key] is not None and x[key] < target(e) for e in judged for x in r["engines"][e]["failure"])

    overhead_ok = all((med(r["engines"][e], "overhead") or 9) < 0.3 for e in engines)
    ready_ok = all((med(r["engines"][e], "readiness") or 9) < 0.2 for e in engines)
    growth_ok = all(max(r["engines"][e]["rss_growth_per_switch"]) <= 0.10 for e in engines)
    status_ok = all(r["engines"][e]["status"]["16"]["p99"] < 0.020 for e in engines)
    rows = [
        ["1. Switch overhead (median): switch time not spent by the engines", "< 0.3 s",
         *each(ratio), verdict(overhead_ok)],
        ["2. Readiness detection after /health 200 (median / worst)", "< 0.2 s",
         *each(lambda e: f"{fmt_s(med(e, 'readiness'))} / "
                         f"{fmt_s(max(s['readiness'] for s in e['switches'] if s['readiness'] is not None))}"),
         verdict(ready_ok)],
        *[[f"3. ETA error at {mark} % (vs the real remaining time)", "within 15 %",
           *each(lambda e, mark=mark: eta(e, mark)), verdict(all(eta_ok(r["engines"][e]) for e in engines))]
          for mark in ETA_MARKS],
        ["(for 3.) How much the same model's load time varies in this run: (slowest − fastest) / median", "",
         *each(spread), ""],
        ["4. `GET /v1/models/status` p99 at 16 clients during switches", "< 20 ms (2 cores)",
         *each(lambda e: fmt_ms(e["status"]["16"]["p99"])), verdict(status_ok)],
        ["6. Orchestrator memory growth during a switch (worst peak RSS over the RSS before)", "≤ 10 %",
         *each(lambda e: f"{fmt_pct(max(e['rss_growth_per_switch']))} "
                         f"(of {e['rss_mb']['first']:.0f} MB)"), verdict(growth_ok)],
    ]
    if any(r["engines"][e].get("failure") for e in engines):
        rows += [
            ["7. Engine killed mid-load → `error` event on the switch stream (median / worst)",
             "< 2 s sim, < 5 s vLLM CPU", *each(lambda e: failure(e, "to_error")),
             verdict(failure_ok("to_error", lambda e: ERROR_TARGET_S.get(e, max(ERROR_TARGET_S.values()))))],
            ["→ `failed` in `GET /v1/models/status` (median / worst)", f"< {FAILED_TARGET_S:g} s",
             *each(lambda e: failure(e, "to_failed")), verdict(failure_ok("to_failed", lambda e: FAILED_TARGET_S))],
            ["→ no process of the engine's process group left (median / worst)", "(reported)",
             *each(lambda e: failure(e, "group_gone")), ""],
        ]
    status_rows = [[e, str(c), fmt_ms(r["engines"][e]["status"][str(c)]["p50"]),
                    fmt_ms(r["engines"][e]["status"][str(c)]["p99"]),
                    f"{r['engines'][e]['status'][str(c)]['rps']:.0f}"] for e in engines for c in CLIENT_COUNTS]
    switch_rows = [[e, fmt_s(med(r["engines"][e], "wall"), 2), fmt_s(med(r["engines"][e], "unload"), 2),
                    fmt_s(med(r["engines"][e], "engine_start"), 2), fmt_s(med(r["engines"][e], "overhead")),
                    fmt_s(med(r["engines"][e], "readiness"))] for e in engines]
    produced = f"Produced by `{r['command']}` on {r['date']} in {r['duration_s'] / 60:.1f} minutes."
    if "failure_run" in r:
        f = r["failure_run"]
        produced += (f" The killed-engine figures (7.) come from a later `{f['command']}` on {f['date']}"
                     f" ({f['duration_s'] / 60:.1f} minutes), merged into that run's results.")
    text = [
        "# Benchmark results", "",
        produced, "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, Python {m['python']}"
        + (f", vLLM {m['vllm']} (CPU build)" if "vllm" in m else "") + ". No GPU: the GPU is virtual (its memory is"
        " what the engines declare), so the figures are about switching, not about loading weights onto a GPU.", "",
        "Everything is measured from outside a real `smartswitch serve`: the engine's process start comes from"
        " `/proc`, its first `/health` 200 from a prober polling every 5 ms, and the switch's end from the"
        " `complete` event on the API's SSE stream. Times on a 2-core machine are noisy; the ratios travel better.",
        "", "## Against the targets", "",
        markdown_table(["measure", "target", *engines, "verdict"], rows), "",
        "## Where a switch's time goes (medians)", "",
        markdown_table(["engine", "whole switch", "unloading the previous model", "engine: spawn to /health 200",
                        "overhead", "readiness detection"], switch_rows), "",
        "Overhead is what is left of the switch once the engines' own work is taken out: from the previous"
        " engine's exit (or the request) to the new engine's spawn, plus from its `/health` 200 to the"
        " `complete` event reaching the client. Readiness detection is the second part alone.", "",
        "![switch timeline](switch_timeline.png)", "",
        f"## ETA accuracy (after {HISTORY_LOADS} loads of each model)", "",
        "The ETA comes from this model's history: the median duration of each load phase, and, as soon as"
        " the engine prints a log line it printed in earlier loads, that line's usual distance to ready,"
        " scaled by how fast this start has been so far. A stretch of a load in which the engine prints"
        " nothing cannot be predicted better than it varies from one load to the next (the spread row"
        " above); the error is measured against the time really left, so it grows as that time shrinks.", "",
        "![ETA error](eta_error.png)", "",
        "## `GET /v1/models/status` under load, while switches run back to back", "",
        markdown_table(["engine", "clients", "p50", "p99", "requests/s"], status_rows), "",
        "The clients are keep-alive connections in the benchmark's own process, on the same 2 cores as the"
        " server and the engines, so these figures include the client's cost.", "",
    ]
    if "eta" in r:  # first-load ETAs: beside the after-3-loads figures above
        at = text.index("## `GET /v1/models/status` under load, while switches run back to back")
        text[at:at] = eta_bench.render_section(r["eta"])
    failed_rows = [[e, str(i), fmt_s(x["to_error"]), fmt_s(x["to_failed"]), fmt_s(x["group_gone"]),
                    f"`{x.get('error', '')}`", f"{x['killed_after']:.1f} s" if "killed_after" in x else "n/a"]
                   for e in engines for i, x in enumerate(r["engines"][e].get("failure", []), 1)]
    if failed_rows:
        text += [
            "## 7. An engine killed while it loads", "",
            "With alpha running, a switch to beta starts on the API's SSE stream; once the status shows the"
            " switch loading beta, beta's engine has printed something and it has run for at least"
            f" {KILL_AFTER_S['sim']:g} s (sim) or {KILL_AFTER_S['vLLM CPU']:g} s (vLLM), its main process gets"
            " SIGKILL (the last column: when). Times run from the kill: to the stream's `error` event, to"
            " the first `GET /v1/models/status` (polled every 5 ms) saying beta failed, and to the engine's"
            " process group having no live process left (a vLLM engine's workers outlive its main process"
            " until the orchestrator ends them). Each round then waits for the rollback to restore alpha.", "",
            markdown_table(["engine", "round", "→ error event", "→ failed in status", "→ group gone", "error",
                            "killed after spawn"], failed_rows), "",
        ]
    if "dashboard" in r:
        d = r["dashboard"]
        rss = d["rss_mb"]
        per = [[str(n), f"{rss[str(n)]:.0f} MB", f"{(rss[str(n)] - rss['0']) / n:.1f} MB"] for n in SESSION_COUNTS]
        lat = [[n, fmt_ms(median_or_none(v["banner_shown"])), fmt_ms(max(v["banner_shown"])),
                fmt_ms(median_or_none(v["chat_unlocked"])), fmt_ms(max(v["chat_unlocked"])),
                fmt_ms(median_or_none(v.get("banner_seen_by_playwright") or []))]
               for n, v in d["latency"].items()]
        load = [[n, f"{v['server'] * 100:.0f} %", f"{v['chromium'] * 100:.0f} %"] for n, v in d["cpu"].items()]
        text += [
            "## 5. Dashboard in Chromium", "",
            *([f"From `{d['run']['command']}` on {d['run']['date']} ({d['run']['duration_s'] / 60:.1f} minutes),"
               " merged into the run above.", ""] if d.get("run") else []),
            markdown_table(["open sessions", "switch request → banner shown (median)", "worst",
                            "model ready → chat unlocked (median)", "worst",
                            "banner, as Playwright sees it (median)"], lat), "",
            "The page itself notes the first animation frame at which the strip above the chat holds the banner,"
            " or the chat's input is enabled (`Date.now()`, the clock the benchmark reads: one machine). The"
            " request is the API's `POST /v1/models/switch` from another client, timed from just before it is"
            " sent; 'model ready' is the time the server logs the model becoming running. The last column is"
            " Playwright's"
            " `wait_for` on the same banner: it starts only once the POST has been answered and each look is a"
            " round trip to the browser, so it adds those to the figure (earlier runs reported that figure).", "",
            f"Server memory with no session open: {rss['0']:.0f} MB.", "",
            markdown_table(["open sessions", "server RSS", "per session (above no session)"], per), "",
            "CPU used while a switch runs (100 % is one core), server and browser side by side. The browser"
            " runs on the same cores as the server: with several pages rendering, a browser-side latency would"
            " measure that contention, so latency is measured with one page open (target: under 100 ms median"
            " for both).", "",
            markdown_table(["open sessions", "server", "Chromium (all pages)"], load), "",
        ]
        if d.get("tabs_opening"):
            o = d["tabs_opening"]
            text += [f"While those {SESSION_COUNTS[-1]} pages open (each session is made when its browser connects),"
                     f" `GET /v1/models/status` read back to back takes {o['status_p50_ms']:.1f} ms at the median"
                     f" and {o['status_p99_ms']:.1f} ms at p99 ({o['status_requests']} requests).", ""]
        if "tabs_closed" in rss:
            text += [f"With the {SESSION_COUNTS[-1]} pages closed, server memory falls back to "
                     f"{rss['tabs_closed']:.0f} MB ({(rss['tabs_closed'] / rss['0'] - 1) * 100:+.0f} % of the idle "
                     f"{rss['0']:.0f} MB).", ""]
        v = d.get("page_views")
        if v:
            back = (v["rss_after_mb"] / v["rss_idle_mb"] - 1) * 100
            text += [
                f"### {v['views']} page views", "",
                f"`GET /` {v['views']} times in a row ({v['views_per_s']:.1f} a second), no browser (a link preview,"
                " a scanner): each makes a session the server must give back. The page leaves light (header,"
                " GPU gauge, a spinner): its dashboard is made only when a browser has loaded it, which these"
                " views never do. Meanwhile a client reads `GET /v1/models/status` back to back.", "",
                markdown_table(["measure", "value", "target"], [
                    ["server CPU per page view", f"{v['cpu_s_per_view'] * 1000:.0f} ms", ""],
                    ["server memory: idle → peak → sessions given back",
                     f"{v['rss_idle_mb']:.0f} → {v['rss_peak_mb']:.0f} → {v['rss_after_mb']:.0f} MB ({back:+.1f} %)",
                     "within 10 % of idle"],
                    ["`GET /v1/models/status` while pages open: p50 / p99",
                     f"{v['status_p50_ms']:.1f} / {v['status_p99_ms']:.1f} ms ({v['status_requests']} requests)",
                     "< 20 ms p99"],
                ]), "",
            ]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--skip-vllm", action="store_true", help="sim engine only")
    parser.add_argument("--skip-dashboard", action="store_true", help="no browser measurements")
    parser.add_argument("--only-failures", action="store_true",
                        help="only kill engines mid-load; merge into the existing results.json and re-render")
    parser.add_argument("--only-eta", action="store_true",
                        help="only the first-load ETA rounds; merge into the existing results.json and re-render")
    parser.add_argument("--only-dashboard", action="store_true",
                        help="only the browser and page-view rounds; merge into the existing results.json and "
                             "re-render")
    parser.add_argument("--out", default=str(HERE), help="where RESULTS.md, results.json and the PNGs go")
    parser.add_argument("--vllm-home", default=os.environ.get(
        "SMARTSWITCH_VLLM_HOME", str(Path.home() / ".cache/smartswitch/vllm")))
    parser.add_argument("--chromium", default=os.environ.get(
        "SMARTSWITCH_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    if not args.skip_vllm and not (Path(args.vllm_home) / "venv/bin/python").exists():
        parser.error(f"no vLLM venv under {args.vllm_home}: run scripts/setup_vllm.sh, or pass --skip-vllm")
    command = "python -m benchmarks.run" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    earlier: dict[str, Any] = {}
    if args.only_dashboard:
        args.skip_vllm = True  # the dashboard rounds run on the sim engine only
    if args.only_failures or args.only_eta or args.only_dashboard:
        path = Path(args.out) / "results.json"
        if not path.exists():
            parser.error(f"--only-failures, --only-eta and --only-dashboard merge into an earlier run's results: "
                         f"no {path}")
        earlier = json.loads(path.read_text())
        missing = [e for e in ["sim"] + ([] if args.skip_vllm else ["vLLM CPU"]) if e not in earlier["engines"]]
        if missing:
            parser.error(f"{path} has no {', '.join(missing)} figures to merge into: run the whole benchmark first")
    began = time.monotonic()
    bench = Bench(args)
    try:
        if args.only_failures:
            bench.results = earlier
            for engine in bench.engines:
                bench.run_failures_only(engine)
            bench.bar.show("writing the results")
            bench.write_failures_only(command, began)
        elif args.only_eta:
            bench.results = earlier
            bench.run_eta(command)
            bench.bar.show("writing the results")
            bench.write_merged(Path(args.out))
        elif args.only_dashboard:
            bench.results = earlier
            bench.run_dashboard()
            bench.results["dashboard"]["run"] = {"command": command, "date": dt.date.today().isoformat(),
                                                 "duration_s": time.monotonic() - began}
            bench.bar.show("writing the results")
            bench.write_merged(Path(args.out))
        else:
            for engine in bench.engines:
                bench.run_engine(engine)
            bench.run_eta(command)
            if not args.skip_dashboard:
                bench.run_dashboard()
            bench.bar.show("writing the results")
            bench.write(command, began)
        bench.bar.step("done")
    finally:
        bench.bar.close()
        shutil.rmtree(bench.root, ignore_errors=True)
    print(f"Results: {Path(args.out) / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
