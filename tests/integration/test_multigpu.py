"""A box with four GPUs, with real sim engine processes: each model goes to its own device set, and where it
sits is read back from the engine itself (its CUDA_VISIBLE_DEVICES) and from the virtual GPU's ledger."""

from __future__ import annotations

import re

import psutil
import pytest

from dashboard.config import resolve_catalog
from dashboard.events import CompleteEvent, StageEvent, SwitchEvent
from dashboard.gpu.virtual import read_ledger

LLAMA70 = "llama-3.3-70b-instruct"  # tensor parallel 2: 75 GB on each of two GPUs
GPT120 = "gpt-oss-120b"  # 72 GB
CODER = "deepseek-coder-33b-instruct"  # 43 GB
QWEN = "qwen2.5-32b-instruct"  # 38 GB
GPT20 = "gpt-oss-20b"  # 20 GB


@pytest.fixture
def catalog_text() -> str:
    """The embedded 4-GPU demo, with fast loads and no sleeping (victims are stopped: easy to read back)."""
    text = resolve_catalog("demo-4gpu").read_text()
    text = re.sub(r'args = \["--load-seconds", "\d+"\]', 'args = ["--load-seconds", "0.3"]', text)
    return text.replace("stall_timeout_s = 30", "stall_timeout_s = 30\nstop_timeout_s = 5\nhost_ram_gb = 0")


def switch(port, target: str) -> tuple[SwitchEvent, list[SwitchEvent]]:
    events: list[SwitchEvent] = []
    final = port.switch_and_wait(target, actor="test", on_event=events.append, timeout=60)
    assert isinstance(final, CompleteEvent), final
    return final, events


def where(port) -> dict[str, list[int]]:
    """Each model's devices as the status reports them (running models only)."""
    return {mid: m["gpus"] for mid, m in port.status()["models"].items() if m["gpus"]}


def engines_say(port) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each engine process's own view: the devices it booked in the ledger and its CUDA_VISIBLE_DEVICES."""
    found = {}
    for entry in read_ledger(port.data_dir / "virtual-gpu"):
        if entry.held:
            continue
        env = psutil.Process(entry.pid).environ()
        found[entry.model_id] = (tuple(sorted(entry.per_device)), env.get("CUDA_VISIBLE_DEVICES", ""))
    return found


def test_models_are_placed_on_their_own_devices_and_run_side_by_side(make_port) -> None:
    port = make_port()
    switch(port, LLAMA70)
    switch(port, GPT120)
    switch(port, CODER)
    # The tensor-parallel model took a pair; each single-GPU model a device of its own, best fit first.
    assert where(port) == {LLAMA70: [0, 1], GPT120: [2], CODER: [3]}
    assert engines_say(port) == {LLAMA70: ((0, 1), "0,1"), GPT120: ((2,), "2"), CODER: ((3,), "3")}
    statuses = {mid: m["status"] for mid, m in port.status()["models"].items()}
    assert statuses[LLAMA70] == statuses[GPT120] == statuses[CODER] == "running"
    devices = port.status()["devices"]
    assert [d["index"] for d in devices] == [0, 1, 2, 3]
    assert [(d["used_gb"], d["free_gb"]) for d in devices] == [(75, 5), (75, 5), (72, 8), (43, 37)]
    assert devices[0]["models"] == {LLAMA70: 75} and devices[3]["models"] == {CODER: 43}
    gpu = port.status()["gpu"]
    assert (gpu["total_memory_gb"], gpu["used_memory_gb"], gpu["available_memory_gb"]) == (320, 265, 55)


def test_a_switch_that_needs_a_pair_unloads_only_models_on_that_pair(make_port) -> None:
    port = make_port()
    for model in (LLAMA70, GPT120, CODER):
        switch(port, model)
    port.unload(LLAMA70, "test")
    switch(port, QWEN)  # 80 GB free on GPUs 0 and 1: the first of the two
    switch(port, GPT20)  # best fit: GPU 3 (37 free) rather than GPU 0 (42 free) or GPU 1 (80 free)
    assert where(port) == {GPT120: [2], CODER: [3], QWEN: [0], GPT20: [3]}
    plan = port.plan(LLAMA70)
    # Of every pair, (0, 1) needs the least unloaded: only Qwen, on GPU 0.
    assert plan["feasible"] and plan["gpus"] == [0, 1] and plan["unload"] == [QWEN]
    assert plan["unload_by_device"] == {"0": [QWEN], "1": []}
    _, events = switch(port, LLAMA70)
    assert [e.message for e in events if isinstance(e, StageEvent) and e.stage == "unloading_models"] == \
        ["Unloading Qwen2.5-32B-Instruct"]
    assert where(port) == {LLAMA70: [0, 1], GPT120: [2], CODER: [3], GPT20: [3]}
    assert engines_say(port)[LLAMA70] == ((0, 1), "0,1")


def test_a_model_that_fits_no_device_is_refused_naming_each_gpu(make_port) -> None:
    port = make_port()
    for model in (LLAMA70, GPT120, CODER):
        switch(port, model)
    for model in (LLAMA70, GPT120, CODER):
        port.set_pinned(model, True, "test")
    plan = port.plan(QWEN)
    assert not plan["feasible"] and plan["unload"] == []
    assert "need 38 GB on one GPU" in plan["reason"]
    assert "GPU 3: 37.0 GB free, 37.0 GB after unloading everything unpinned" in plan["reason"]
    # The pool would say 55 GB free: the sum is no place to put a model.
    assert port.status()["gpu"]["available_memory_gb"] == 55


def test_a_restarted_server_keeps_each_adopted_engine_on_its_devices(make_port, tmp_path) -> None:
    port = make_port(data_dir=tmp_path / "kept")
    switch(port, GPT120)
    switch(port, LLAMA70)
    assert where(port) == {GPT120: [0], LLAMA70: [1, 2]}
    port.close(stop_engines=False)
    again = make_port(data_dir=tmp_path / "kept")
    assert where(again) == {GPT120: [0], LLAMA70: [1, 2]}
    assert [d["used_gb"] for d in again.status()["devices"]] == [72, 75, 75, 0]
    switch(again, CODER)  # placed around the adopted engines
    assert where(again)[CODER] == [3]


TWO_GPUS = """
[gpu]
source = "virtual"
devices_gb = [80, 80]

[switching]
stop_timeout_s = 5
host_ram_gb = 100

[models.sleepy]
name = "Sleepy-20B"
size_gb = 10
gpu_memory_gb = 40
sleep = true
args = ["--load-seconds", "0.3"]

[models.wide]
name = "Wide-120B"
size_gb = 140
gpu_memory_gb = 150
tensor_parallel_size = 2
args = ["--load-seconds", "0.3"]
"""


def test_a_sleeping_model_keeps_its_device_and_wakes_there(make_port) -> None:
    port = make_port(TWO_GPUS)
    switch(port, "sleepy")
    assert where(port) == {"sleepy": [0]}
    # Wide needs 75 GB on both GPUs: Sleepy goes to sleep on GPU 0, keeping its small residual there.
    switch(port, "wide")
    assert port.status()["models"]["sleepy"]["status"] == "sleeping"
    assert where(port) == {"sleepy": [0], "wide": [0, 1]}
    assert port.status()["devices"][0]["models"] == {"sleepy": 2, "wide": 75}
    # Waking needs the rest of its 40 GB on GPU 0, its own device: Wide has to go.
    plan = port.plan("sleepy")
    assert plan["gpus"] == [0] and plan["unload"] == ["wide"]
    switch(port, "sleepy")
    assert where(port) == {"sleepy": [0]}
    assert engines_say(port) == {"sleepy": ((0,), "0")}


MEASURED = """
[gpu]
source = "virtual"
devices_gb = [80, 80]

[models.wide]
name = "Wide"
size_gb = 100
gpu_memory_gb = 100
tensor_parallel_size = 2
# The engine really takes 120 GB (the sim's last --gpu-memory-gb wins): the catalog guessed low.
args = ["--load-seconds", "0.3", "--gpu-memory-gb", "120"]
"""


def test_a_footprint_measured_on_two_gpus_is_kept_for_two_gpus_only(make_port, tmp_path) -> None:
    data = tmp_path / "kept"
    port = make_port(MEASURED, data_dir=data)
    switch(port, "wide")
    port.unload("wide", "test")
    assert port.plan("wide")["required_gb"] == 120
    port.close()
    # The same model on one GPU of 160 GB: what was measured over two says nothing about it.
    one = MEASURED.replace("devices_gb = [80, 80]", "devices_gb = [160]").replace("tensor_parallel_size = 2", "")
    port = make_port(one, data_dir=data)
    assert port.plan("wide")["required_gb"] == 100
    port.close()
    assert make_port(MEASURED, data_dir=data).plan("wide")["required_gb"] == 120
