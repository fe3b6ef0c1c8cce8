"""A box with four GPUs in the browser: one gauge bar per device, and a plan that names the GPUs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server, wait_for
from tests.ui.conftest import pages_on, pick, running_server

DOCS = Path(__file__).resolve().parents[2] / "docs"

FOUR_GPUS = """
[gpu]
source = "virtual"
devices_gb = [80, 80, 80, 80]

[switching]
confirm_before_unload = true

[models.alpha]
name = "Alpha-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "0.5"]

[models.beta]
name = "Beta-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "0.5"]

[models.gamma]
name = "Gamma-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "0.5"]

[models.delta]
name = "Delta-70B"
size_gb = 140
gpu_memory_gb = 70
args = ["--load-seconds", "0.5"]

[models.wide]
name = "Wide-120B"
size_gb = 240
gpu_memory_gb = 120
tensor_parallel_size = 2
args = ["--load-seconds", "0.5"]
"""


@pytest.fixture(scope="module")
def four_gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_server(tmp_path_factory, "ui-4gpu", FOUR_GPUS)


@pytest.fixture
def new_page(browser: Browser, four_gpu_server: Server) -> Iterator[Callable[[], Page]]:
    with pages_on(browser, four_gpu_server) as open_:
        yield open_


def status(server: Server) -> dict:
    return httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=10).json()


def load(server: Server, model_id: str) -> None:
    httpx.post(f"{server.url}/v1/models/{model_id}/load", headers=server.headers, timeout=60)
    wait_for(lambda: status(server)["models"][model_id]["status"] == "running", message=f"{model_id} running")


def test_the_gauge_has_a_bar_per_gpu_and_the_plan_names_the_gpus(new_page, four_gpu_server: Server) -> None:
    for model_id in ("alpha", "beta", "gamma", "delta"):
        load(four_gpu_server, model_id)  # one 70 GB model on each 80 GB device
    page = new_page()
    rows = page.locator(".gpu-gauge .device")
    expect(rows).to_have_count(4, timeout=10_000)
    placed = status(four_gpu_server)["models"]
    for model_id, name in (("alpha", "Alpha-70B"), ("delta", "Delta-70B")):
        (device,) = placed[model_id]["gpus"]
        row = page.locator(f".gpu-gauge .device[data-index='{device}']")
        expect(row.locator(f".share[title^='{name}']")).to_have_count(1)
        expect(row).to_contain_text("70 / 80 GB")

    # The wide model needs a pair of devices: the confirmation says which, and what leaves each.
    pick(page, "Wide-120B")
    confirm = page.locator(".confirm-plan")
    expect(confirm).to_contain_text(re.compile(r"Goes on: GPU \d, GPU \d"), timeout=10_000)
    expect(confirm).to_contain_text(re.compile(r"GPU \d: \w+-70B; GPU \d: \w+-70B"))
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "dashboard-4gpu.png"))
    page.locator(".confirm-switch").click()
    wait_for(lambda: status(four_gpu_server)["models"]["wide"]["status"] == "running", timeout=30,
             message="Wide-120B running on its pair")
    now = status(four_gpu_server)
    pair = now["models"]["wide"]["gpus"]
    assert len(pair) == 2
    # Only the models on that pair were unloaded; the other two still run on their own devices.
    running = {m: v["gpus"] for m, v in now["models"].items() if v["status"] == "running" and m != "wide"}
    assert len(running) == 2 and not any(set(g) & set(pair) for g in running.values())
    expect(page.locator(f".gpu-gauge .device[data-index='{pair[0]}'] .share[title^='Wide-120B']")).to_have_count(
        1, timeout=10_000)
