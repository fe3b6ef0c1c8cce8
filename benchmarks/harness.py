"""What the benchmark measures with: a real ``smartswitch serve``, an outside prober, a progress bar.

The prober runs in the benchmark's process, not the server's, so it sees the engine as any outsider
would: when its process was spawned (from /proc) and when its /health first answered 200.
"""

from __future__ import annotations

import datetime
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from dashboard.client import SmartswitchClient
from dashboard.engines.process import INSTANCE_ENV, MODEL_ENV, group_pids, pid_alive, pid_cmdline
from dashboard.events import CompleteEvent, ErrorEvent, ProgressEvent, SwitchEvent

API_KEY = "bench-key-0123456789"  # the server refuses keys shorter than 16 characters


def now() -> float:
    """The clock /proc start times are on (seconds since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_time(pid: int) -> float | None:
    try:  # psutil adds the boot time to the start ticks; take it off again to stay on now()'s clock
        return psutil.Process(pid).create_time() - psutil.boot_time()
    except psutil.Error:
        return None


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def pid_listening_on(port: int) -> int | None:
    """The engine's leader process: the one whose command line serves ``--port N``."""
    pattern = re.compile(rf"--port\s+{port}(\s|$)")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmd = pid_cmdline(int(entry.name))
            if pattern.search(cmd) and "dashboard.cli" not in cmd:
                return int(entry.name)
    return None


def health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class ServerProcess:
    """``smartswitch serve`` on a free port with its own catalog and data directory."""

    def __init__(self, root: Path, catalog: str, env: dict[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "catalog.toml").write_text(catalog)
        self.log_path = root / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - open as long as the server runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.cli", "serve", "--config", str(root / "catalog.toml"),
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "SMARTSWITCH_API_KEYS": API_KEY, **(env or {})})
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smartswitch serve exited; see {root / 'server.log'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("smartswitch serve did not come up in 90 s")
        self.client = SmartswitchClient(self.url, API_KEY, timeout=600)

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def became_running_at(self, model_id: str) -> float | None:
        """When the server last logged ``model_id`` becoming running (wall clock, to the millisecond): the
        moment itself, where a status poll sees it only once the server has time to answer."""
        self.log.flush()
        pattern = re.compile(rf"^(\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}}) INFO \S+: {re.escape(model_id)}: "
                             r"\w+ -> running ")
        stamps = [m.group(1) for line in self.log_path.read_text(errors="replace").splitlines()
                  if (m := pattern.match(line))]
        if not stamps:
            return None
        return datetime.datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the server's local time

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@dataclass
class SwitchSample:
    """One switch as seen from outside: every time is on the boot clock (seconds)."""

    engine: str
    target: str
    started: float
    done: float = 0.0
    spawned: float | None = None  # the target engine's process start
    healthy: float | None = None  # its /health first answered 200
    victim_gone: float | None = None  # the unloaded engine's process exited
    progress: list[tuple[float, int, float | None]] = field(default_factory=list)  # (time, %, ETA)
    outcome: str = ""

    @property
    def wall(self) -> float:
        return self.done - self.started

    @property
    def engine_start(self) -> float | None:
        return self.healthy - self.spawned if self.healthy and self.spawned else None

    @property
    def readiness(self) -> float | None:
        return self.done - self.healthy if self.healthy else None

    @property
    def load_overhead(self) -> float | None:
        """Switch time that is not the engine's own work: before the spawn, and after /health said 200."""
        if self.spawned is None or self.healthy is None:
            return None
        start = self.victim_gone or self.started
        return (self.spawned - start) + (self.done - self.healthy)


def timed_switch(server: ServerProcess, engine: str, target: str) -> SwitchSample:
    """Switch through the API's SSE stream while a prober watches the engines from outside."""
    before = server.status()
    victims = {mid: m["endpoint"] for mid, m in before["models"].items()
               if m.get("endpoint") and mid != target}
    victim_pids = {p for p in (pid_listening_on(int(url.rsplit(":", 1)[1])) for url in victims.values()) if p}
    sample = SwitchSample(engine, target, now())
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(headers=server.headers, timeout=5) as http:
            watch(http)

    def watch(http: httpx.Client) -> None:
        port = None
        while not stop.is_set():
            if victim_pids and sample.victim_gone is None and not any(pid_alive(p) for p in victim_pids):
                sample.victim_gone = now()
            if port is None:
                endpoint = http.get(f"{server.url}/v1/models/status").json()["models"][target].get("endpoint")
                if endpoint:
                    port = int(endpoint.rsplit(":", 1)[1])
            elif sample.spawned is None:
                pid = pid_listening_on(port)
                if pid:
                    sample.spawned = start_time(pid)
            elif health_ok(port):
                sample.healthy = now()
                return
            time.sleep(0.005 if sample.spawned else 0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    final: SwitchEvent | None = None
    for event in server.client.switch_events(target):
        if isinstance(event, ProgressEvent):
            sample.progress.append((now(), event.progress, event.eta_seconds))
        final = event
    sample.done = now()
    stop.set()
    prober.join(5)
    sample.outcome = final.status if isinstance(final, CompleteEvent) else type(final).__name__
    return sample


@dataclass
class FailureSample:
    """An engine SIGKILLed while it loads: seconds from the kill to each sign of it (None: not seen in time)."""

    to_error: float | None = None  # the switch stream's ``error`` event
    to_failed: float | None = None  # ``GET /v1/models/status`` says the target failed
    group_gone: float | None = None  # no live process of the engine's process group
    error: str = ""  # the error event's code, or what the stream ended with instead
    killed_after: float = 0.0  # seconds from the engine's spawn to the kill
    active_after: str | None = None  # the model in use once the rollback ended

    def as_dict(self) -> dict[str, Any]:
        return {"to_error": self.to_error, "to_failed": self.to_failed, "group_gone": self.group_gone,
                "error": self.error, "killed_after": self.killed_after, "active_after": self.active_after}


def engine_leader(data_dir: Path, model_id: str) -> psutil.Process | None:
    """This server's engine for ``model_id``: the group leader carrying both of the orchestrator's markers."""
    marker = str(data_dir.resolve())  # the orchestrator writes the resolved data dir
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != proc.pid:
                continue
            env = proc.environ()
        except (psutil.Error, OSError):  # gone, a zombie, or another user's
            continue
        if env.get(INSTANCE_ENV) == marker and env.get(MODEL_ENV) == model_id:
            return proc
    return None


def timed_failure(server: ServerProcess, target: str, kill_after_s: float, timeout_s: float) -> FailureSample:
    """Switch to ``target``, SIGKILL its engine once it is loading, and time how the orchestrator finds out.

    The kill waits for the switch's ``loading_target`` stage, the target's ``loading`` status, some
    output in the engine's log and ``kill_after_s`` since its spawn. Returns once the switch and its
    rollback are over (``switch`` is null in the status).
    """
    sample = FailureSample()
    killed: list[float] = []  # the kill's time, once it happened: read by the threads
    stop = threading.Event()
    events: list[tuple[float, SwitchEvent]] = []

    def follow() -> None:
        with SmartswitchClient(server.url, API_KEY, timeout=600) as client:
            for event in client.switch_events(target):
                events.append((time.monotonic(), event))

    def poll_status(http: httpx.Client) -> None:
        while not stop.is_set():
            state = http.get(f"{server.url}/v1/models/status").json()["models"][target]["status"]
            at = time.monotonic()
            if killed and state == "failed":  # loading when the kill was decided: this is the kill's doing
                sample.to_failed = at - killed[0]
                return
            time.sleep(0.005)

    log = server.data_dir / "logs" / f"{target}.log"  # truncated at each spawn, so any bytes are this start's
    stream = threading.Thread(target=follow, daemon=True)
    stream.start()
    deadline = time.monotonic() + timeout_s
    leader: psutil.Process | None = None
    while True:
        if not stream.is_alive():
            last = events[-1][1] if events else None
            raise RuntimeError(f"the switch to {target} ended before its engine was killed: {last}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the switch to {target} never reached a loading engine to kill")
        leader = leader or engine_leader(server.data_dir, target)
        status = server.status()
        if (leader is not None and status["switch"] is not None and status["switch"]["stage"] == "loading_target"
                and status["models"][target]["status"] == "loading" and log.exists() and log.stat().st_size > 0
                and time.time() - leader.create_time() >= kill_after_s):
            break
        time.sleep(0.02)
    assert leader is not None  # the loop only breaks with one

    http = httpx.Client(headers=server.headers, timeout=5)
    http.get(f"{server.url}/v1/models/status")  # a warm connection, so the first poll is not a connect
    poller = threading.Thread(target=poll_status, args=(http,), daemon=True)
    poller.start()
    sample.killed_after = time.time() - leader.create_time()
    pgid = leader.pid
    leader.kill()  # psutil checks the pid still names this process before it signals
    killed.append(time.monotonic())
    try:
        while time.monotonic() < deadline and (sample.group_gone is None or stream.is_alive() or poller.is_alive()):
            # Zombies are dead and hold nothing but their pid; they are not counted as left.
            if sample.group_gone is None and not group_pids(pgid):
                sample.group_gone = time.monotonic() - killed[0]
            time.sleep(0.005)
    finally:
        stop.set()
        poller.join(5)
        http.close()
    for at, event in events:
        if isinstance(event, ErrorEvent):
            sample.to_error, sample.error = at - killed[0], event.error
            break
    else:
        sample.error = type(events[-1][1]).__name__ if events else "no event"
    while time.monotonic() < deadline + timeout_s:  # the rollback that restores the previous model
        status = server.status()
        if status["switch"] is None:
            sample.active_after = status["active_model"]
            return sample
        time.sleep(0.1)
    raise RuntimeError(f"the operation after the killed load of {target} did not end: {status['switch']}")


class ProgressBar:
    """One line on stderr: ``[#####.....] 12/30  what is running now``."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        self.done = min(self.done + 1, self.total)
        self.show(label)

    def show(self, label: str) -> None:
        filled = round(self.width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{elapsed:5.0f}s  {label[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


async def hammer_status(port: int, clients: int, seconds: float) -> tuple[list[float], float]:
    """``clients`` keep-alive connections each GETting /v1/models/status back to back.

    A bare asyncio client rather than httpx: at 64 connections on 2 cores, the client's own cost
    would otherwise be most of what is measured. Returns each request's latency and the run's length.
    """
    import asyncio

    request = (f"GET /v1/models/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {API_KEY}\r\n\r\n").encode()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"status answered {head[:40]!r}")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, time.monotonic() - began
