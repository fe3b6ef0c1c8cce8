"""The orchestrator driving a real vLLM (CPU build) with tiny local models, through the real API.

`make test` creates the vLLM venv and the models once (scripts/setup_vllm.sh, cached outside the repo).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from httpx_sse import connect_sse

from dashboard.engines.process import INSTANCE_ENV, MODEL_ENV, instance_marker
from tests.conftest import API_KEY, Server, serve_catalog, wait_for

VLLM_HOME = Path(os.environ.get("SMARTSWITCH_VLLM_HOME", Path.home() / ".cache/smartswitch/vllm"))
VLLM_PYTHON = VLLM_HOME / "venv" / "bin" / "python"

pytestmark = pytest.mark.vllm

if not VLLM_PYTHON.exists():  # `make test` always creates it; a bare `pytest` run may not have
    pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/setup_vllm.sh (make test does)", pytrace=False)


def catalog(broken: Path) -> str:
    # Each tiny model "needs" 6 of 10 virtual GB, so a switch must unload the other one first.
    model = """
[models.{id}]
name = "{name}"
engine = "vllm"
path = "{path}"
size_gb = 0.002
gpu_memory_gb = 6
args = ["--max-model-len", "256", "--dtype", "float32", "--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
"""
    return ('[gpu]\nsource = "virtual"\ntotal_gb = 10\n\n[switching]\nstall_timeout_s = 240\nstop_timeout_s = 20\n'
            + model.format(id="tiny-a", name="Tiny-A", path=VLLM_HOME / "models" / "tiny-a")
            + model.format(id="tiny-b", name="Tiny-B", path=VLLM_HOME / "models" / "tiny-b")
            + model.format(id="broken", name="Broken", path=broken))


def vllm_processes(server: Server) -> list[int]:
    """vLLM processes started by this test's server (not a developer's own, running beside the tests)."""
    marker = instance_marker(str(server.data_dir))
    return [p.pid for p in psutil.process_iter(["environ", "cmdline"])
            if (p.info["environ"] or {}).get(INSTANCE_ENV) == marker]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("vllm")
    broken = root / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    srv = Server(root, serve_catalog(catalog(broken), switches_per_minute=100),
                 extra_env={"SMARTSWITCH_VLLM_PYTHON": str(VLLM_PYTHON)})
    yield srv
    srv.stop()
    wait_for(lambda: not vllm_processes(srv), timeout=30, message="every vLLM process to exit with the server")


def switch(server: Server, target: str) -> list[tuple[str, dict]]:
    with httpx.Client(timeout=httpx.Timeout(10, read=300)) as client, connect_sse(
            client, "POST", f"{server.url}/v1/models/switch", json={"target_model": target},
            headers=server.headers) as source:
        return [(sse.event, sse.json()) for sse in source.iter_sse()]


def status(server: Server) -> dict:
    return httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=10).json()


def test_real_vllm_loads_with_shard_progress_and_answers_through_the_proxy(vllm_server: Server) -> None:
    events = switch(vllm_server, "tiny-a")
    assert events[-1][0] == "complete" and events[-1][1]["status"] == "success", events[-1]
    messages = [data["message"] for kind, data in events if kind == "progress"]
    assert any("shard 10/10" in m for m in messages), messages
    phases = [data["phase"] for kind, data in events if kind == "progress"]
    assert phases.index("loading_weights") < phases.index("initializing") < phases.index("warming_up")
    progress = [data["progress"] for kind, data in events if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    assert status(vllm_server)["models"]["tiny-a"]["status"] == "running"

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(model="tiny-a", max_tokens=5,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny-a", max_tokens=5, stream=True,
                                            messages=[{"role": "user", "content": "hello"}])
    assert sum(1 for chunk in stream if chunk.choices) >= 2


def test_switching_between_two_real_models_and_back(vllm_server: Server) -> None:
    events = switch(vllm_server, "tiny-b")
    assert events[-1][0] == "complete", events[-1]
    stages = [data["stage"] for kind, data in events if kind == "stage"]
    assert stages == ["checking_memory", "unloading_models", "loading_target"]
    models = status(vllm_server)["models"]
    assert (models["tiny-a"]["status"], models["tiny-b"]["status"]) == ("stopped", "running")
    assert len(vllm_processes(vllm_server)) >= 1
    events = switch(vllm_server, "tiny-a")
    assert events[-1][0] == "complete"
    models = status(vllm_server)["models"]
    assert (models["tiny-a"]["status"], models["tiny-b"]["status"]) == ("running", "stopped")
    # The second load of tiny-a was planned with its own measured history.
    assert models["tiny-a"]["estimated_load_time_seconds"] > 5


def test_broken_model_directory_fails_with_vllms_own_error_and_rolls_back(vllm_server: Server) -> None:
    events = switch(vllm_server, "broken")
    kind, data = events[-1]
    assert kind == "error" and data["error"] == "engine_failed"
    assert "config.json" in data["message"]
    assert data["restoring"] == ["tiny-a"]
    models = status(vllm_server)["models"]
    assert models["broken"]["status"] == "failed" and "config.json" in models["broken"]["error"]
    wait_for(lambda: status(vllm_server)["models"]["tiny-a"]["status"] == "running", timeout=240,
             message="the rollback to restore Tiny-A")


def engine_leader(server: Server, model_id: str) -> psutil.Process | None:
    """The main process of this server's engine for ``model_id`` (found by the marker it carries)."""
    for proc in psutil.process_iter(["environ"]):
        env = proc.info["environ"] or {}
        if env.get(MODEL_ENV) == model_id and env.get(INSTANCE_ENV) == instance_marker(str(server.data_dir)) \
                and proc.pid == os.getpgid(proc.pid):
            return proc
    return None


def test_real_vllm_killed_mid_load_is_reported_within_seconds(vllm_server: Server) -> None:
    import signal
    import threading
    import time

    if status(vllm_server)["models"]["tiny-a"]["status"] != "running":
        switch(vllm_server, "tiny-a")
    events: list[tuple[str, float]] = []
    thread = threading.Thread(target=lambda: events.extend((kind, time.monotonic()) for kind, _ in
                                                          switch(vllm_server, "tiny-b")), daemon=True)
    thread.start()
    leader = wait_for(lambda: engine_leader(vllm_server, "tiny-b"), timeout=60, message="Tiny-B's engine")
    log = vllm_server.data_dir / "logs" / "tiny-b.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 2000, timeout=60, message="Tiny-B to be loading")
    group = os.getpgid(leader.pid)
    killed = time.monotonic()
    leader.send_signal(signal.SIGKILL)
    wait_for(lambda: status(vllm_server)["models"]["tiny-b"]["status"] == "failed", timeout=1,
             message="Tiny-B failed within 1 s of its exit")
    thread.join(10)
    assert events and events[-1][0] == "error" and events[-1][1] - killed < 5.0

    def group_left() -> list[int]:
        return [p.pid for p in psutil.process_iter() if _pgid(p.pid) == group]
    wait_for(lambda: not group_left(), timeout=3, message="no process of the dead engine left")
    wait_for(lambda: status(vllm_server)["switch"] is None, timeout=240, message="the rollback to end")
    assert status(vllm_server)["models"]["tiny-a"]["status"] == "running"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_streamed_reply_is_not_cut_by_a_switch(vllm_server: Server) -> None:
    """Drain before stop: a reply streaming from Tiny-A finishes whole while the switch to Tiny-B waits for it."""
    import json
    import threading
    import time

    if status(vllm_server)["models"]["tiny-a"]["status"] != "running":
        switch(vllm_server, "tiny-a")
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events: list[tuple[str, dict]] = []
    switcher = threading.Thread(target=lambda: events.extend(switch(vllm_server, "tiny-b")), daemon=True)
    tokens, done, errors, usage = 0, False, [], None
    with httpx.Client(timeout=httpx.Timeout(10, read=120)) as client, client.stream(
            "POST", f"{vllm_server.url}/v1/chat/completions", json=body, headers=vllm_server.headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data:"):
                chunk = json.loads(line[5:])
                errors += [chunk["error"]] if "error" in chunk else []
                usage = chunk.get("usage") or usage
                if any(choice["delta"].get("content") for choice in chunk.get("choices", [])):
                    tokens += 1
                    if tokens == 1:
                        switcher.start()  # the switch comes while the reply streams
                    time.sleep(0.01)  # a reader that takes its time keeps the reply in flight longer
    switcher.join(300)
    assert done and not errors, errors
    assert usage is not None and usage["completion_tokens"] == 200
    assert events and events[-1][0] == "complete", events[-1:]
    # Whether the switch had to wait depends on how far the tiny model had got (it generates faster than this
    # reader reads, and the server buffers); the sim tier checks the "Waiting for N requests" message itself.
    models = status(vllm_server)["models"]
    assert (models["tiny-a"]["status"], models["tiny-b"]["status"]) == ("stopped", "running")
