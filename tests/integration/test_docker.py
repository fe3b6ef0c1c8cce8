"""Containerised engines through the orchestrator, against the real Docker engine (`make test` starts it and
builds `smartswitch-sim:latest`, a stand-in for vllm/vllm-openai that runs the sim engine)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import docker
import pytest

from dashboard.config import ModelSpec, parse_config
from dashboard.engines.docker import LABEL_INSTANCE, LABEL_MODEL, DockerEngine
from dashboard.engines.process import free_port
from dashboard.events import CompleteEvent, ErrorEvent, ProgressEvent, StageEvent, SwitchEvent
from dashboard.gpu.nvml import NvmlGpu
from dashboard.orchestrator.core import OrchestratorPort
from tests.conftest import wait_for

pytestmark = pytest.mark.docker

CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 20
stop_timeout_s = 5

[models.box-a]
name = "Box-A"
runtime = "docker"
image = "smartswitch-sim:latest"
size_gb = 60
gpu_memory_gb = 60
args = ["--load-seconds", "1.5"]

[models.box-b]
name = "Box-B"
runtime = "docker"
image = "smartswitch-sim:latest"
size_gb = 50
gpu_memory_gb = 50
args = ["--load-seconds", "3"]

[models.missing-image]
name = "Missing"
runtime = "docker"
image = "smartswitch-no-such-image:latest"
size_gb = 1
gpu_memory_gb = 1
"""


@pytest.fixture
def catalog_text() -> str:
    return CATALOG


@pytest.fixture
def client():
    client = docker.from_env()
    yield client
    # Whatever a test did, no container of ours may outlive it.
    leftovers = client.containers.list(all=True, filters={"label": LABEL_MODEL})
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, [c.name for c in leftovers]


def ours(client, port) -> dict[str, str]:
    found = client.containers.list(filters={"label": f"{LABEL_INSTANCE}={port.data_dir}"})
    return {c.labels[LABEL_MODEL]: c.status for c in found}


def test_switching_between_containerised_models(client, make_port) -> None:
    port = make_port()
    events: list[SwitchEvent] = []
    assert port.switch_and_wait("box-a", "test", events.append, timeout=60).kind == "complete"
    assert ours(client, port) == {"box-a": "running"}
    events.clear()
    final = port.switch_and_wait("box-b", "test", events.append, timeout=60)
    assert isinstance(final, CompleteEvent) and final.status == "success"
    assert [e.stage for e in events if isinstance(e, StageEvent)] == \
        ["checking_memory", "unloading_models", "loading_target"]
    assert any(isinstance(e, ProgressEvent) and "shard" in e.message for e in events)
    assert ours(client, port) == {"box-b": "running"}
    port.close()
    assert ours(client, port) == {}


def test_container_killed_mid_load_rolls_back(client, make_port) -> None:
    port = make_port()
    port.switch_and_wait("box-a", "test", timeout=60)
    events: list[SwitchEvent] = []
    thread = threading.Thread(target=lambda: port.switch_and_wait("box-b", "test", events.append, 60), daemon=True)
    thread.start()
    wait_for(lambda: any(isinstance(e, ProgressEvent) and e.phase == "loading_weights" for e in events),
             timeout=30, message="box-b to load weights")
    victim = client.containers.list(filters={"label": f"{LABEL_MODEL}=box-b"})[0]
    victim.kill()
    thread.join(60)
    final = events[-1]
    assert isinstance(final, ErrorEvent) and final.error == "engine_failed"
    assert final.details["restoring"] == ["box-a"]
    wait_for(lambda: port.status()["switch"] is None, timeout=60, message="the rollback to end")
    assert ours(client, port) == {"box-a": "running"}
    assert port.status()["models"]["box-b"]["status"] == "failed"


def test_restarted_orchestrator_adopts_the_running_container(client, make_port, tmp_path) -> None:
    port = make_port(data_dir=tmp_path / "kept")
    port.switch_and_wait("box-a", "test", timeout=60)
    container_id = client.containers.list(filters={"label": f"{LABEL_MODEL}=box-a"})[0].id
    port.close(stop_engines=False)
    assert ours(client, port) == {"box-a": "running"}
    again = make_port(data_dir=tmp_path / "kept")
    assert again.status()["models"]["box-a"]["status"] == "running"
    assert again.switch_and_wait("box-a", "test", timeout=30).status == "already_loaded"
    assert client.containers.get(container_id).status == "running"
    assert any(e["action"] == "adopt" and e["outcome"] == "running" for e in again.audit_log())


def test_missing_image_is_a_clear_error(client, make_port) -> None:
    port = make_port()
    final = port.switch_and_wait("missing-image", "test", timeout=30)
    assert isinstance(final, ErrorEvent)
    assert "smartswitch-no-such-image:latest" in final.message and "not on this machine" in final.message


def test_docker_daemon_down_is_a_clear_error(client, make_port, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    port = make_port()
    final = port.switch_and_wait("box-a", "test", timeout=30)
    assert isinstance(final, ErrorEvent)
    assert "Docker daemon is not reachable" in final.message
    assert port.status()["models"]["box-a"]["status"] == "failed"


# GPUs: the device request names exactly the planned devices ------------------------------------------------
GB = 10**9


class FourGpuNvml:
    """NVML as a 4 × 80 GB box answers it; GPUs 0 and 1 are mostly taken by processes that are not ours."""

    def nvmlInit(self) -> None: ...

    def nvmlDeviceGetCount(self) -> int:
        return 4

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        used = [70, 70, 0, 0][handle] * GB
        return SimpleNamespace(total=80 * GB, used=used, free=80 * GB - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return []


WIDE = ModelSpec(id="wide", name="Wide-120B", size_gb=10, gpu_memory_gb=120, runtime="docker",
                 image="smartswitch-sim:latest", tensor_parallel_size=2)


def test_the_container_requests_exactly_its_devices(client, tmp_path) -> None:
    engine = DockerEngine(WIDE, free_port(), instance=str(tmp_path), gpu_total_gb=160, devices=(2, 3))
    # Created, not started: this daemon may have no GPU runtime; what it records is what was asked.
    container = client.containers.create(WIDE.image, **engine.run_options())
    try:
        host = container.attrs["HostConfig"]
    finally:
        container.remove(force=True)
    assert host["DeviceRequests"] == [{"Driver": "", "Count": 0, "DeviceIDs": ["2", "3"],
                                       "Capabilities": [["gpu"]], "Options": {}}]
    assert host["IpcMode"] == "host"


def test_a_switch_on_a_gpu_box_asks_docker_for_the_planned_pair(client, tmp_path) -> None:
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this daemon has the NVIDIA runtime: the container would really start")
    config = parse_config('[gpu]\nsource = "nvml"\n\n[models.wide]\nname = "Wide-120B"\nruntime = "docker"\n'
                          'image = "smartswitch-sim:latest"\nsize_gb = 10\ngpu_memory_gb = 120\n'
                          "tensor_parallel_size = 2\n", "gpu.toml")
    port = OrchestratorPort(config, data_dir=tmp_path / "data", gpu=NvmlGpu(FourGpuNvml())).start()
    try:
        assert port.plan("wide")["gpus"] == [2, 3]  # GPUs 0 and 1 have 10 GB free, not 60
        final = port.switch_and_wait("wide", "test", timeout=60)
        # Without a GPU runtime Docker refuses the request at start; the message names the planned pair.
        assert isinstance(final, ErrorEvent)
        assert "Docker could not start wide on GPU(s) 2, 3" in final.message
        assert "capabilities: [[gpu]]" in final.message
        assert ours(client, port) == {}  # the container that could not start is not left behind
    finally:
        port.close()
