"""Concurrent chat traffic on two models that cannot both fit: smartswitch beside local-engine-router.

Both tools get the very same engine command (smartswitch's own sim command line for each model, with the
same load time and slow tokens) and the same clients. Four scenarios, a few rounds each:

1. chats for A and for B sent at the same moment, nothing loaded;
2. a chat for B (serving) and one for A at the same moment;
3. B streaming a long reply, A requested 0.3 s later;
4. a streaming chat waiting for its model to load (from nothing loaded: cold; from B loaded: swap).

Every chat streams and asks for a known number of tokens. A request is *completed* (HTTP 200, every token
asked for, ``[DONE]``), *failed* (an error status, an error chunk, or no answer) or *cut* (200, then fewer
tokens than asked or no ``[DONE]``). Overhead is a request's wall time minus the sim's configured load time
and the time its tokens take to generate.

``python -m benchmarks.concurrency`` installs ``local-engine-router`` (once) into
``~/.cache/smartswitch/ler-venv``, runs both tools, writes ``benchmarks/concurrency.json`` and its own
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import ServerProcess, free_port, pid_listening_on
from benchmarks.report import write_section
from dashboard.config import parse_config
from dashboard.engines.process import engine_command, pid_cmdline

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- concurrency:begin -->", "<!-- concurrency:end -->"
LER_VERSION = "0.7.1"
LER_VENV = Path.home() / ".cache" / "smartswitch" / "ler-venv"
LOAD_S = 6.0  # past the router's 5 s keep-alive interval, so a waiting stream can hear from either tool
TOKEN_DELAY_S = 0.1  # slow enough that a 46-token reply is still streaming when the other model is asked
SHORT_TOKENS = 5
LONG_TOKENS = 46
LATE_S = 0.3  # scenario 3: A is asked this long after B's request
PROMPT = " ".join(f"w{i}" for i in range(60))  # the sim echoes it: every reply has more words than asked
READ_TIMEOUT_S = 180.0
A, B = "alpha", "beta"

CATALOG = f"""
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 60
stop_timeout_s = 10

[server]
switch_on_request = true
switches_per_minute = 1000
queue_timeout_s = 300

[models.{A}]
name = "Alpha-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "{LOAD_S:g}", "--token-delay", "{TOKEN_DELAY_S:g}"]

[models.{B}]
name = "Beta-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "{LOAD_S:g}", "--token-delay", "{TOKEN_DELAY_S:g}"]
"""


# Clients ------------------------------------------------------------------------------------------
@dataclass
class ChatSample:
    """One streamed chat as its client saw it; times are seconds from when it was sent."""

    tool: str
    scenario: str
    round: int
    model: str
    asked: int
    status: int | None = None
    headers_s: float | None = None
    first_token_s: float | None = None
    wall_s: float = 0.0
    tokens: int = 0
    done: bool = False  # saw ``data: [DONE]``
    comments: int = 0  # SSE comment lines (keep-alives) before the first token
    max_silence_s: float = 0.0  # longest stretch with nothing received before the first token
    error: str = ""
    outcome: str = ""
    overhead_s: float | None = None

    def classify(self) -> None:
        if self.status != 200 or (self.error and self.tokens == 0 and not self.done):
            self.outcome = "failed"
        elif self.error.startswith("error chunk"):
            self.outcome = "failed"  # an explicit error in the stream: the client knows
        elif self.done and self.tokens >= self.asked:
            self.outcome = "completed"
        else:
            self.outcome = "cut"


def chat(base: str, headers: dict[str, str], tool: str, scenario: str, rnd: int, model: str,
         tokens: int) -> ChatSample:
    sample = ChatSample(tool, scenario, rnd, model, tokens)
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
            "stream": True}
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    sent = time.perf_counter()
    last = sent

    def heard() -> float:
        nonlocal last
        at = time.perf_counter()
        if sample.first_token_s is None:
            sample.max_silence_s = max(sample.max_silence_s, at - last)
        last = at
        return at - sent

    try:
        with httpx.Client(timeout=timeout, headers=headers) as http, \
                http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
            sample.status = response.status_code
            sample.headers_s = heard()
            if response.status_code != 200:
                sample.error = f"{response.status_code}: {response.read().decode(errors='replace')[:300]}"
            else:
                for line in response.iter_lines():
                    if not line:
                        continue
                    at = heard()
                    if line.startswith(":"):
                        sample.comments += sample.first_token_s is None
                        continue
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        sample.done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        sample.error = f"error chunk: {json.dumps(chunk['error'])[:300]}"
                        continue
                    for choice in chunk.get("choices", []):
                        if (choice.get("delta") or {}).get("content"):
                            sample.tokens += 1
                            if sample.first_token_s is None:
                                sample.first_token_s = at
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        sample.error = sample.error or f"{type(exc).__name__}: {exc}"[:300]
    sample.wall_s = time.perf_counter() - sent
    sample.classify()
    return sample


def together(*calls: tuple[float, Callable[[], ChatSample]]) -> list[ChatSample]:
    """Run each call in its own thread, each ``delay`` seconds after one common start."""
    results: list[ChatSample | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int, delay: float, call: Callable[[], ChatSample]) -> None:
        start.wait()
        time.sleep(delay)
        results[index] = call()

    threads = [threading.Thread(target=run, args=(i, d, c)) for i, (d, c) in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


# The two tools ------------------------------------------------------------------------------------
class Tool:
    name = ""
    url = ""
    headers: dict[str, str]

    def reset_empty(self) -> None:
        raise NotImplementedError

    def loaded(self) -> set[str]:
        raise NotImplementedError

    def ensure_loaded(self, model: str) -> None:
        """Load ``model`` with a one-token chat (as a user would), unless it is the one loaded already."""
        if self.loaded() == {model}:
            return
        warm = chat(self.url, self.headers, self.name, "setup", 0, model, 1)
        if warm.outcome != "completed":
            raise RuntimeError(f"{self.name}: loading {model} failed: {warm}")
        settle(lambda: self.loaded() == {model}, f"{self.name}: only {model} loaded")

    def stop(self) -> None:
        raise NotImplementedError


def settle(condition: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for: {what}")
        time.sleep(0.1)


class Smartswitch(Tool):
    name = "smartswitch"

    def __init__(self, root: Path) -> None:
        self.server = ServerProcess(root / "smartswitch", CATALOG)
        self.url, self.headers = self.server.url, self.server.headers

    def statuses(self) -> dict[str, str]:
        return {mid: m["status"] for mid, m in self.server.status()["models"].items()}

    def loaded(self) -> set[str]:
        return {mid for mid, status in self.statuses().items() if status != "stopped"}

    def reset_empty(self) -> None:
        for mid in self.loaded():
            self.server.client.action(mid, "unload")
        settle(lambda: not self.loaded() and self.server.status()["switch"] is None, "smartswitch: nothing loaded")

    def stop(self) -> None:
        self.server.stop()


class Router(Tool):
    """local-engine-router with one ``generic_process`` engine per model, started on the sim command."""

    name = "local-engine-router"

    def __init__(self, root: Path) -> None:
        self.root = root / "router"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {}
        config = parse_config(CATALOG)
        self.engine_ports = {mid: free_port() for mid in config.models}
        # The very command line smartswitch runs for each model, only on the router's own port.
        self.commands = {mid: engine_command(spec, self.engine_ports[mid]) for mid, spec in config.models.items()}
        router_config = {
            "host": "127.0.0.1", "port": self.port, "routing_mode": "manual",
            "log_file": str(self.root / "router.log"), "state_file": str(self.root / "state.json"),
            "engines": {mid: {"type": "generic_process", "base_url": f"http://127.0.0.1:{port}",
                              "start_cmd": self.commands[mid], "ready_path": "/health",
                              "start_timeout_s": 120, "stop_timeout_s": 10,
                              "log_file": str(self.root / f"{mid}.log")}
                        for mid, port in self.engine_ports.items()},
            "models": [{"id": mid, "engine": mid, "display_name": spec.name} for mid, spec in config.models.items()],
        }
        self.config_path = self.root / "config.yaml"
        self.config_path.write_text(json.dumps(router_config, indent=2))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        out = open(self.root / "stdout.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([str(LER_VENV / "bin" / "local-engine-router"), "--config", str(self.config_path)],
                                     stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        out.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local-engine-router exited; see {self.root}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("local-engine-router did not come up in 60 s")
            time.sleep(0.1)

    def engine_pid(self, mid: str) -> int | None:
        pid = pid_listening_on(self.engine_ports[mid])
        # Only a sim engine of ours: its command line names our model and our port.
        return pid if pid and "dashboard.engines.sim" in pid_cmdline(pid) else None

    def loaded(self) -> set[str]:
        return {mid for mid in self.engine_ports if self.engine_pid(mid)}

    def kill_engines(self) -> None:
        for mid in self.engine_ports:
            pid = self.engine_pid(mid)
            if pid:
                # The router starts each engine in its own session: its group is the engine's.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
        settle(lambda: not self.loaded(), "router engines gone")

    def stop_router(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def reset_empty(self) -> None:
        # The router has no "unload everything" route: restart it with no engine running.
        self.stop_router()
        self.kill_engines()
        (self.root / "state.json").unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        self.stop_router()
        self.kill_engines()


# Scenarios ----------------------------------------------------------------------------------------
def run_scenarios(tool: Tool, rounds: int, progress: Callable[[str], None]) -> list[ChatSample]:
    samples: list[ChatSample] = []

    def send(scenario: str, rnd: int, model: str, tokens: int) -> Callable[[], ChatSample]:
        return lambda: chat(tool.url, tool.headers, tool.name, scenario, rnd, model, tokens)

    def cold_overhead(sample: ChatSample) -> None:
        sample.overhead_s = sample.wall_s - LOAD_S - sample.asked * TOKEN_DELAY_S

    for rnd in range(1, rounds + 1):
        progress(f"{tool.name}: 1 both at once, round {rnd}")
        tool.reset_empty()
        samples += together((0, send("1", rnd, A, SHORT_TOKENS)), (0, send("1", rnd, B, SHORT_TOKENS)))

        progress(f"{tool.name}: 2 B serving, A and B at once, round {rnd}")
        tool.ensure_loaded(B)
        samples += together((0, send("2", rnd, B, SHORT_TOKENS)), (0, send("2", rnd, A, SHORT_TOKENS)))

        progress(f"{tool.name}: 3 B streaming, A 0.3 s later, round {rnd}")
        tool.ensure_loaded(B)
        samples += together((0, send("3", rnd, B, LONG_TOKENS)), (LATE_S, send("3", rnd, A, SHORT_TOKENS)))

        progress(f"{tool.name}: 4 waiting stream, cold, round {rnd}")
        tool.reset_empty()
        cold = chat(tool.url, tool.headers, tool.name, "4 cold", rnd, A, SHORT_TOKENS)
        cold_overhead(cold)
        samples.append(cold)

        progress(f"{tool.name}: 4 waiting stream, swap, round {rnd}")
        tool.ensure_loaded(B)
        swap = chat(tool.url, tool.headers, tool.name, "4 swap", rnd, A, SHORT_TOKENS)
        cold_overhead(swap)
        samples.append(swap)
    return samples


# Router install -----------------------------------------------------------------------------------
def install_router() -> None:
    """``local-engine-router`` from PyPI into its own venv, once (kept across runs)."""
    marker = LER_VENV / "bin" / "local-engine-router"
    if marker.exists():
        version = subprocess.run([str(LER_VENV / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('local-engine-router'))"],
                                 capture_output=True, text=True).stdout.strip()
        if version == LER_VERSION:
            return
    LER_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(LER_VENV)], check=True)
    subprocess.run([str(LER_VENV / "bin" / "pip"), "install", "-q", f"local-engine-router=={LER_VERSION}"],
                   check=True)


# Report -------------------------------------------------------------------------------------------
SCENARIOS = {
    "1": "chats for A and B at the same moment, nothing loaded",
    "2": "B serving; chats for B and A at the same moment",
    "3": f"B streaming {LONG_TOKENS} tokens, A asked {LATE_S:g} s later",
    "4 cold": "a stream waiting for A to load, nothing loaded",
    "4 swap": "a stream waiting for A to load, B loaded",
}


def tally(samples: list[ChatSample]) -> str:
    counts = {k: sum(s.outcome == k for s in samples) for k in ("completed", "failed", "cut")}
    return f"{counts['completed']} / {counts['failed']} / {counts['cut']}"


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def render(results: dict[str, Any]) -> str:
    samples = [ChatSample(**s) for s in results["samples"]]
    tools = results["tools"]

    def of(tool: str, scenario: str | None = None) -> list[ChatSample]:
        return [s for s in samples if s.tool == tool and (scenario is None or s.scenario == scenario)]

    def row(label: str, fn: Callable[[str], str]) -> str:
        return f"| {label} | " + " | ".join(fn(t) for t in tools) + " |"

    lines = [BEGIN, "## Concurrent chats on two models that cannot both fit (smartswitch vs local-engine-router)", "",
             f"`{results['command']}`: a real `smartswitch serve` (`switch_on_request = true`) and "
             f"`local-engine-router` {LER_VERSION} (engines of type `generic_process`, installed from PyPI into "
             f"`~/.cache/smartswitch/ler-venv`), each starting the very same sim command for two 60 GB models on a "
             f"100 GB virtual GPU (load {results['load_s']:g} s, {results['token_delay_s']:g} s per token). "
             f"Rounds per scenario: {results['rounds']}. Every chat streams and asks for {SHORT_TOKENS} tokens "
             f"({LONG_TOKENS} for B in scenario 3). Completed: 200, every token, `[DONE]`; failed: an error status, "
             "an error chunk or no answer; cut: 200, then fewer tokens or no `[DONE]`.", "",
             "| requests completed / failed / cut | " + " | ".join(tools) + " |",
             "|---|" + "---|" * len(tools)]
    for key, label in SCENARIOS.items():
        lines.append(row(f"{key}: {label}", lambda t, key=key: tally(of(t, key))))
    lines.append(row("**all**", lambda t: f"**{tally(of(t))}**"))
    lines += ["", "| waiting stream (scenario 4), median (min–max) | " + " | ".join(tools) + " |",
              "|---|" + "---|" * len(tools)]
    for case in ("4 cold", "4 swap"):
        kind = case.split()[1]
        lines.append(row(f"time to first token, {kind}",
                         lambda t, c=case: spread([s.first_token_s for s in of(t, c) if s.first_token_s is not None])))
        lines.append(row(f"overhead, {kind} (wall − {results['load_s']:g} s load − token time)",
                         lambda t, c=case: spread([s.overhead_s for s in of(t, c) if s.overhead_s is not None])))
    waiting = ("4 cold", "4 swap")
    lines.append(row("response headers after",
                     lambda t: spread([s.headers_s for s in samples if s.tool == t and s.scenario in waiting
                                       and s.headers_s is not None])))
    lines.append(row("longest silence before the first token",
                     lambda t: spread([s.max_silence_s for s in samples if s.tool == t and s.scenario in waiting])))
    lines.append(row("SSE comment lines before the first token",
                     lambda t: ", ".join(str(s.comments) for s in samples if s.tool == t and s.scenario in waiting)))
    pairs = [[s for s in of(t, "1") if s.round == r] for t in tools for r in range(1, results["rounds"] + 1)]
    lines.append(row("scenario 1: until both answered",
                     lambda t: spread([max(s.wall_s for s in pair) for pair in pairs if pair and pair[0].tool == t])))
    for key in ("2", "3"):
        lines.append(row(f"scenario {key}: A's wall time",
                         lambda t, key=key: spread([s.wall_s for s in of(t, key) if s.model == A])))
    lines.append(row("scenario 3: B's tokens received (asked " + str(LONG_TOKENS) + ")",
                     lambda t: ", ".join(str(s.tokens) for s in of(t, "3") if s.model == B)))
    bad = [s for s in samples if s.outcome != "completed"]
    lines.append("")
    if bad:
        lines.append("Requests not completed:")
        lines.append("")
        lines += [f"- {s.tool}, scenario {s.scenario}, round {s.round}, {s.model}: {s.outcome}, status {s.status}, "
                  f"{s.tokens}/{s.asked} tokens, `[DONE]` {'seen' if s.done else 'not seen'}"
                  f"{', ' + s.error.replace('|', '/') if s.error else ''}" for s in bad]
    else:
        lines.append("Every request of both tools completed.")
    lines += ["", f"Raw samples: `benchmarks/concurrency.json`. {results['machine']}, {results['date']}.", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (2 cores: keep it small)")
    parser.add_argument("--out", default=str(HERE), help="the folder of RESULTS.md and concurrency.json")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    args = parser.parse_args(argv)

    install_router()
    root = Path(tempfile.mkdtemp(prefix="smartswitch-concurrency-"))
    began = time.time()
    samples: list[ChatSample] = []

    def progress(label: str) -> None:
        sys.stderr.write(f"[{time.time() - began:5.0f}s] {label}\n")
        sys.stderr.flush()

    try:
        for make in (Smartswitch, Router):
            tool = make(root)
            try:
                samples += run_scenarios(tool, args.rounds, progress)
            finally:
                tool.stop()
    finally:
        if args.keep:
            print(f"work folder: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    command = "python -m benchmarks.concurrency" + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
    results = {"command": command, "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "load_s": LOAD_S,
               "token_delay_s": TOKEN_DELAY_S, "tools": [Smartswitch.name, Router.name],
               "machine": f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores",
               "seconds": round(time.time() - began, 1), "samples": [asdict(s) for s in samples]}
    section = render(results)
    print(section)
    if not args.no_write:
        out = Path(args.out)
        (out / "concurrency.json").write_text(json.dumps(results, indent=1) + "\n")
        write_section(out / "RESULTS.md", section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
