"""The orchestrator's faults end to end, with real processes: an engine killed mid-load, a stale
engine record pointing at somebody else's process, the server killed mid-switch."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
from httpx_sse import connect_sse

from dashboard.orchestrator.history import EngineRecord, History
from tests.conftest import TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for

# A model whose engine has worker children that ignore SIGTERM for 20 s, as vLLM's EngineCore does.
SLOW_CATALOG = TEST_CATALOG + """
[models.slow]
name = "Slow-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "8", "--workers", "2", "--worker-term-delay", "20"]
"""


def engine_leader(model_id: str) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"--model-id {model_id} " in cmd and proc.pid == os.getpgid(proc.pid):
            return proc
    raise AssertionError(f"no engine for {model_id}")


def test_engine_killed_mid_load_is_reported_at_once_and_its_group_is_gone(make_port) -> None:
    port = make_port(SLOW_CATALOG)
    assert port.switch_and_wait("big", "test", timeout=60).status == "success"
    events: list = []
    arrived: dict[str, float] = {}

    def follow() -> None:
        port.switch_and_wait("slow", "test", on_event=lambda e: (events.append(e), arrived.setdefault(
            e.kind, time.monotonic())), timeout=60)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_for(lambda: port.status()["models"]["slow"]["status"] == "loading"
             and any(e.kind == "stage" and e.stage == "loading_target" for e in events),
             message="Slow-70B to be loading")
    leader = engine_leader("slow")
    wait_for(lambda: len(leader.children()) == 2, message="its two workers")
    group = [leader.pid, *(c.pid for c in leader.children())]
    killed = time.monotonic()
    leader.send_signal(signal.SIGKILL)
    wait_for(lambda: port.status()["models"]["slow"]["status"] == "failed", timeout=1,
             message="status failed within 1 s of the exit")
    thread.join(5)
    assert arrived["error"] - killed < 2.0
    error = events[-1]
    assert error.kind == "error" and "exited with code -9" in error.message and "Restoring Big-60B" in error.message
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in group), timeout=3, message="no process of the dead engine left")
    progress = [e.progress for e in events if e.kind == "progress"]
    assert max(progress, default=0) < 90  # a failed load is never shown as nearly done
    wait_for(lambda: port.status()["models"]["big"]["status"] == "running", timeout=30,
             message="the rollback to restore Big-60B")
    assert port.status()["active_model"] == "big"


def test_a_stale_engine_record_never_signals_an_unrelated_process(tmp_path, make_port) -> None:
    data_dir = tmp_path / "data"
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        history = History(data_dir / "smartswitch.sqlite")
        # A kill -9 left this row; after a reboot its pid belongs to somebody's shell.
        history.save_engine(EngineRecord("small", "process", str(bystander.pid), 1, 20.0, time.time()))
        history.save_engine(EngineRecord("big", "process", f"{bystander.pid}@1.0", 1, 60.0, time.time()))
        if hasattr(history, "flush"):
            history.flush(5)
        history.close()
        port = make_port(data_dir=data_dir)
        assert bystander.poll() is None  # untouched
        statuses = {m: port.status()["models"][m]["status"] for m in ("small", "big")}
        assert statuses == {"small": "stopped", "big": "stopped"}
        assert port.history.engines() == []
    finally:
        bystander.kill()
        bystander.wait()


SLOW_GIANT = TEST_CATALOG.replace('''name = "Giant-400B"
size_gb = 800
gpu_memory_gb = 95
args = ["--load-seconds", "1.0"]''', '''name = "Giant-400B"
size_gb = 800
gpu_memory_gb = 95
args = ["--load-seconds", "6"]''')


def test_server_killed_mid_switch_restores_what_the_switch_unloaded(tmp_path) -> None:
    catalog = serve_catalog(SLOW_GIANT, switches_per_minute=100)
    first = Server(tmp_path, catalog)
    done = httpx.post(f"{first.url}/v1/models/switch", json={"target_model": "small", "stream": False},
                      headers=first.headers, timeout=60)
    assert done.json()["status"] == "success"
    started = httpx.post(f"{first.url}/v1/models/switch", json={"target_model": "giant", "wait": False},
                         headers=first.headers, timeout=10)
    assert started.status_code == 202

    def status(server: Server) -> dict:
        return httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=5).json()

    wait_for(lambda: (status(first)["switch"] or {}).get("stage") == "loading_target", timeout=20,
             message="Giant-400B to be loading, Small-8B unloaded")
    assert status(first)["models"]["small"]["status"] in ("stopped", "sleeping")
    first.proc.send_signal(signal.SIGKILL)  # no clean-up: the loading engine is left behind
    first.proc.wait(10)
    first._log.close()

    second = Server(tmp_path, catalog)  # same data dir
    try:
        def settled() -> bool:
            now = status(second)
            return now["switch"] is None and (now["models"]["giant"]["status"] == "running"
                                              or now["models"]["small"]["status"] == "running")
        wait_for(settled, timeout=30, message="the interrupted switch to complete or be rolled back")
        now = status(second)
        running = [m for m, v in now["models"].items() if v["status"] == "running"]
        assert running in (["giant"], ["small"]) and now["active_model"] == running[0]
        assert len([c for c in sim_processes() if "--model-id giant " in c + " "]) <= int(running == ["giant"])
    finally:
        second.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="nothing orphaned after the restart")


def test_a_second_switch_stream_sees_the_rollback_as_its_own_operation(server: Server) -> None:
    """The rollback after a failure is visible to every client: status and the event stream."""
    httpx.post(f"{server.url}/v1/models/switch", json={"target_model": "big", "stream": False},
               headers=server.headers, timeout=60)
    kinds: list[str] = []
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, connect_sse(
            client, "POST", f"{server.url}/v1/models/switch", json={"target_model": "crasher"},
            headers=server.headers) as source:
        for sse in source.iter_sse():
            kinds.append(sse.event)
    assert kinds[-1] == "error" and "stage" in kinds

    def rollback_seen() -> bool:
        switch = httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=5).json()["switch"]
        return switch is None or switch["kind"] == "rollback"
    assert rollback_seen()
    wait_for(lambda: httpx.get(f"{server.url}/v1/models/status", headers=server.headers,
                               timeout=5).json()["models"]["big"]["status"] == "running", timeout=30,
             message="Big-60B restored")
    audit = httpx.get(f"{server.url}/v1/audit", headers=server.headers, timeout=5).json()["entries"]
    assert any(e["action"] == "rollback" and e["outcome"] == "success" for e in audit)


def test_sigterm_while_a_model_loads_stops_every_engine_without_a_traceback(tmp_path) -> None:
    server = Server(tmp_path, serve_catalog(SLOW_CATALOG, switches_per_minute=100))
    httpx.post(f"{server.url}/v1/models/switch", json={"target_model": "small", "stream": False},
               headers=server.headers, timeout=60)
    httpx.post(f"{server.url}/v1/models/switch", json={"target_model": "slow", "wait": False},
               headers=server.headers, timeout=10)
    wait_for(lambda: httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=5)
             .json()["models"]["slow"]["status"] == "loading", message="Slow-70B to be loading")
    wait_for(lambda: any("--model-id slow " in c + " " for c in sim_processes()), message="its engine")
    server.stop()  # SIGTERM, and waits for the exit
    assert server.proc.returncode == 0
    log = server.log_path.read_text()
    assert "Traceback" not in log
    on_the_way_out = log.split("slow: stopped -> loading", 1)[1]
    assert "-> loading" not in on_the_way_out and "rollback" not in on_the_way_out  # nothing started
    wait_for(lambda: not sim_processes(server.data_dir), timeout=5, message="no engine left behind, workers included")
