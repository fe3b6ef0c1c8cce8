"""The sim engine behaves like `vllm serve` from outside: refused while loading, vLLM logs, real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from dashboard.engines import signals as sig
from dashboard.engines.process import free_port
from dashboard.engines.vllm_logs import parse_line, split_lines
from tests.conftest import wait_for


class Sim:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dashboard.engines.sim", "--model-id", "sim-test", "--port", str(self.port),
             "--size-gb", "40", "--gpu-memory-gb", "20", "--load-seconds", "1.0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code
        except httpx.ConnectError:
            return None


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    started: list[Sim] = []
    yield started
    for sim in started:
        if sim.proc.poll() is None:
            sim.proc.kill()
        sim.proc.wait(5)


def start(sims: list[Sim], *args: str) -> Sim:
    sim = Sim(*args)
    sims.append(sim)
    return sim


def test_refuses_connections_while_loading_then_serves(sims) -> None:
    sim = start(sims, "--load-seconds", "2.0")
    assert sim.health() is None
    wait_for(lambda: sim.health() == 200, timeout=15, message="the sim to serve")
    models = httpx.get(f"{sim.url}/v1/models").json()
    assert models["data"][0]["id"] == "sim-test"


def test_its_log_parses_into_every_load_stage(sims) -> None:
    sim = start(sims)
    wait_for(lambda: sim.health() == 200, timeout=15)
    sim.proc.send_signal(signal.SIGTERM)
    sim.proc.wait(5)
    lines, rest = split_lines(sim.output())
    found = [s for s in (parse_line(line) for line in [*lines, rest]) if s is not None]
    kinds = list(dict.fromkeys(type(s) for s in found))
    assert kinds == [sig.LoadStarted, sig.CheckpointSize, sig.ShardProgress, sig.WeightsLoaded, sig.ModelMemory,
                     sig.KVCache, sig.GraphCapture, sig.EngineInitialized, sig.ServerUp]
    shards = [s for s in found if isinstance(s, sig.ShardProgress)]
    assert [s.done for s in shards] == list(range(11)) and shards[-1].total == 10
    size = next(s for s in found if isinstance(s, sig.CheckpointSize))
    assert abs(size.bytes_total - 40e9) < 0.01e9
    memory = sum(s.gib for s in found if isinstance(s, sig.ModelMemory)) + \
        sum(s.gib or 0 for s in found if isinstance(s, sig.KVCache | sig.GraphCapture))
    assert abs(memory * 2**30 - 20e9) < 0.02e9  # weights + KV cache + graphs = the declared footprint


def test_chat_replies_are_marked_simulated_streamed_or_not(sims) -> None:
    sim = start(sims)
    wait_for(lambda: sim.health() == 200, timeout=15)
    body = {"model": "sim-test", "messages": [{"role": "user", "content": "ping"}]}
    reply = httpx.post(f"{sim.url}/v1/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["content"] == "[simulated reply from sim-test] You said: ping"
    with httpx.stream("POST", f"{sim.url}/v1/chat/completions", json={**body, "stream": True}) as response:
        frames = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]" and len(frames) > 4
    assert httpx.post(f"{sim.url}/v1/chat/completions", content=b"{").status_code == 400
    assert httpx.post(f"{sim.url}/v1/chat/completions", json={**body, "model": "other"}).status_code == 404


def test_sleep_mode_endpoints(sims) -> None:
    sim = start(sims, "--sleep-mode")
    wait_for(lambda: sim.health() == 200, timeout=15)
    assert httpx.get(f"{sim.url}/is_sleeping").json() == {"is_sleeping": False}
    assert httpx.post(f"{sim.url}/sleep", params={"level": 1}).status_code == 200
    assert httpx.get(f"{sim.url}/is_sleeping").json() == {"is_sleeping": True}
    assert httpx.get(f"{sim.url}/health").status_code == 200  # like vLLM: healthy while asleep
    assert httpx.post(f"{sim.url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "x"}]}).status_code == 503
    assert httpx.post(f"{sim.url}/wake_up").status_code == 200
    assert httpx.get(f"{sim.url}/is_sleeping").json() == {"is_sleeping": False}


def test_without_sleep_mode_the_sleep_routes_do_not_exist(sims) -> None:
    sim = start(sims)
    wait_for(lambda: sim.health() == 200, timeout=15)
    assert httpx.post(f"{sim.url}/sleep").status_code == 404


@pytest.mark.parametrize(("args", "words"), [
    (("--fail-at", "start"), "RuntimeError: simulated engine failure at start"),
    (("--fail-at", "weights"), "RuntimeError: simulated engine failure at weights"),
    (("--oom",), "torch.OutOfMemoryError: CUDA out of memory"),
])
def test_fault_options_exit_with_vllms_kind_of_error(sims, args: tuple[str, ...], words: str) -> None:
    sim = start(sims, *args)
    assert sim.proc.wait(15) == 1
    assert words in sim.output()


def test_hang_stops_output_and_never_serves(sims) -> None:
    sim = start(sims, "--hang-at", "kv_cache", "--load-seconds", "0.5")
    time.sleep(2.0)  # the whole load would be over four times; a hung engine must still be silent
    assert sim.proc.poll() is None and sim.health() is None
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(5) == 0
    assert "Available KV cache memory" not in sim.output()


def test_die_after_seconds_crashes_while_serving(sims) -> None:
    sim = start(sims, "--die-after-seconds", "0.5")
    assert sim.proc.wait(15) == 1
    assert "EngineCore encountered a fatal error." in sim.output()
