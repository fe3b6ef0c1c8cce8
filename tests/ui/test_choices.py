"""Choices the dashboard puts to the researcher: confirm an unload first, continue with the last model."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server, wait_for
from tests.ui.conftest import model_row, pages_on, pick, running_server
from tests.ui.test_dashboard import chat_box

CONFIRM_CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
confirm_before_unload = true

[models.alpha]
name = "Alpha-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "0.5"]

[models.beta]
name = "Beta-60B"
size_gb = 120
gpu_memory_gb = 60
args = ["--load-seconds", "0.5"]
"""


@pytest.fixture(scope="module")
def confirm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_server(tmp_path_factory, "ui-confirm", CONFIRM_CATALOG)


@pytest.fixture
def new_page(browser: Browser, confirm_server: Server) -> Iterator[Callable[[], Page]]:
    with pages_on(browser, confirm_server) as open_:
        yield open_


def statuses(server: Server) -> dict[str, str]:
    models = httpx.get(f"{server.url}/v1/models/status", headers=server.headers).json()["models"]
    return {mid: m["status"] for mid, m in models.items()}


def test_an_unload_is_shown_and_confirmed_before_anything_stops(new_page, confirm_server: Server) -> None:
    page = new_page()
    pick(page, "Alpha-60B")  # nothing to unload: no question asked
    expect(chat_box(page)).to_be_enabled(timeout=30_000)

    pick(page, "Beta-60B")
    confirm = page.locator(".confirm-plan")
    expect(confirm).to_contain_text("Switch to Beta-60B?", timeout=5000)
    expect(confirm).to_contain_text("Unloads: Alpha-60B")
    expect(confirm).to_contain_text("GPU memory free: 40.0 GB now, 40.0 GB after")
    page.locator(".reject-switch").click()
    expect(confirm).to_have_count(0, timeout=5000)
    assert statuses(confirm_server) == {"alpha": "running", "beta": "stopped"}  # kept as it was

    pick(page, "Beta-60B")
    expect(confirm).to_be_visible(timeout=5000)
    page.locator(".confirm-switch").click()
    expect(model_row(page, "Beta-60B")).to_have_class(re.compile("status-running"), timeout=30_000)
    assert statuses(confirm_server) == {"alpha": "stopped", "beta": "running"}


def test_a_returning_researcher_is_offered_the_last_model(new_page, confirm_server: Server) -> None:
    httpx.post(f"{confirm_server.url}/v1/models/beta/unload", headers=confirm_server.headers, timeout=30)
    wait_for(lambda: statuses(confirm_server)["beta"] == "stopped", message="beta to be unloaded")
    page = new_page()  # the dashboard's last switch (the test above) was to Beta-60B
    resume = page.locator(".last-used")
    expect(resume).to_have_text("Continue with Beta-60B (your last model)", timeout=5000)
    resume.click()
    expect(model_row(page, "Beta-60B")).to_have_class(re.compile("status-running"), timeout=30_000)
    expect(chat_box(page)).to_be_enabled(timeout=5000)
    expect(resume).to_be_hidden()
