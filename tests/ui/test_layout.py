"""What people see, at the widths they use: 1400 px light and dark, 800 px, 420 px; the screenshots in docs/.

Every page here is offline (requests off 127.0.0.1 are blocked) and must report no error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import Server, wait_for
from tests.ui.conftest import demo_catalog, model_row, open_tab, pages_on, pick, running_server
from tests.ui.test_dashboard import chat_box, expect_reply, wait_idle, wait_percent_above

DOCS = Path(__file__).resolve().parents[2] / "docs"
BROKEN = """
[models.broken]
name = "Broken-13B"
size_gb = 26
gpu_memory_gb = 30
args = ["--load-seconds", "1.0", "--fail-at", "weights"]
"""


@pytest.fixture(scope="module")
def layout_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_server(tmp_path_factory, "ui-layout", demo_catalog(BROKEN))


def status(server: Server) -> dict:
    return httpx.get(f"{server.url}/v1/models/status", headers=server.headers, timeout=5).json()


def switch_api(server: Server, model_id: str) -> None:
    wait_idle(server)
    httpx.post(f"{server.url}/v1/models/switch", json={"target_model": model_id, "stream": False},
               headers=server.headers, timeout=60)
    wait_for(lambda: status(server)["models"][model_id]["status"] == "running", timeout=60,
             message=f"{model_id} running")


def shot(page: Page, name: str) -> None:
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / name))


def send(page: Page, text: str) -> None:
    expect(chat_box(page)).to_be_enabled(timeout=30_000)
    chat_box(page).fill(text)
    chat_box(page).press("Enter")


def test_light_and_dark_mid_switch_and_a_failure_with_what_to_do(browser: Browser, layout_server: Server) -> None:
    switch_api(layout_server, "llama-3.1-8b-instruct")
    with pages_on(browser, layout_server) as open_page:
        page = open_page()
        send(page, "Summarise the plan for today in one line.")
        expect_reply(page, "You said: Summarise the plan")
        pick(page, "GPT-OSS-20B")
        banner = page.locator(".switch-banner")
        expect(banner).to_contain_text("Switching from Llama-3.1-8B-Instruct to GPT-OSS-20B", timeout=5000)
        wait_percent_above(page, 25)
        shot(page, "dashboard-switching.png")
        expect(banner).to_have_count(0, timeout=30_000)
        # The conversation shows where the model changed.
        send(page, "And with the bigger model?")
        expect_reply(page, "[simulated reply from gpt-oss-20b]")
        expect(page.get_by_text("switched to GPT-OSS-20B").first).to_be_visible()

        page.get_by_role("button", name="Toggle theme").click()
        pick(page, "Qwen2.5-32B-Instruct")
        expect(banner).to_be_visible(timeout=5000)
        wait_percent_above(page, 25)
        expect(page.locator(".wrap.dark")).to_have_count(1)  # the strip follows the theme
        shot(page, "dashboard-dark.png")
        expect(banner).to_have_count(0, timeout=30_000)
        page.get_by_role("button", name="Toggle theme").click()

        # A load that fails: the reason, and what can be done about it.
        pick(page, "Broken-13B")
        error = page.locator(".switch-error")
        # First the strip says what failed and what comes back; once that is back, the failure and its actions.
        expect(page.locator(".switch-banner")).to_contain_text("Load of Broken-13B failed", timeout=30_000)
        expect(error).to_be_visible(timeout=30_000)
        expect(error).to_contain_text("Switch to Broken-13B failed")
        expect(error).to_contain_text("simulated engine failure at weights")
        for action in ("Retry", "Open model manager", "Dismiss"):
            expect(page.get_by_role("button", name=action)).to_be_visible()
        expect(page.get_by_role("button", name=re.compile("^Unpin"))).to_have_count(0)  # nothing pinned was in the way
        shot(page, "dashboard-failed.png")
        # The failed model says why on hover in the picker, and in the manager.
        expect(model_row(page, "Broken-13B")).to_have_attribute("title", re.compile("simulated engine failure"))
        page.get_by_role("button", name="Open model manager").click()
        row = page.locator(".model-table .tabulator-row", has_text="Broken-13B")
        expect(row).to_contain_text("failed: ", timeout=5000)
        page.get_by_role("button", name="Dismiss").click()
        expect(error).to_be_hidden()
        expect(page.locator(".chat-header")).to_contain_text("Qwen2.5-32B-Instruct")


def usable(page: Page, width: int) -> None:
    """The picker, the chat input (full width) and the manager's actions are within reach."""
    pick(page, "Llama-3.1-8B-Instruct")
    expect(page.locator(".chat-header")).to_contain_text("Llama-3.1-8B-Instruct", timeout=30_000)
    expect(chat_box(page)).to_be_enabled(timeout=10_000)
    chat_box(page).scroll_into_view_if_needed()
    box = chat_box(page).bounding_box()
    # The text area spans the width but for the attach and send icons beside it.
    assert box is not None and box["width"] > 0.65 * width, box
    assert box["x"] + box["width"] <= width
    send(page, "hello from a small screen")
    expect_reply(page, "You said: hello from a small screen")
    open_tab(page, "Models")
    cell = page.locator(".model-table .tabulator-row", has_text="Llama-3.1-8B-Instruct").locator(
        '.tabulator-cell[tabulator-field="act_unload"]')
    expect(cell).to_have_text("Unload", timeout=10_000)
    cell.hover()  # scrolls it into view, as a finger or a pointer would reach it
    expect(cell).to_be_in_viewport()
    open_tab(page, "Chat")


@pytest.mark.parametrize("width", [800, 420])
def test_narrow_screens_keep_the_picker_chat_and_actions_in_reach(browser: Browser, layout_server: Server,
                                                                   width: int) -> None:
    wait_idle(layout_server)
    with pages_on(browser, layout_server, width=width) as open_page:
        page = open_page()
        # The sidebar (GPU gauge) is a drawer here: the main area has the whole width.
        expect(page.locator(".gpu-gauge")).to_be_hidden()
        usable(page, width)
        shot(page, f"dashboard-{width}.png")
        page.get_by_role("button", name="Open drawer").click()
        expect(page.locator(".gpu-gauge")).to_be_visible(timeout=5000)


def test_rows_hold_still_under_the_pointer_while_statuses_change(browser: Browser,
                                                                 layout_server: Server) -> None:
    switch_api(layout_server, "llama-3.1-8b-instruct")
    with pages_on(browser, layout_server) as open_page:
        page = open_page()
        page.locator(".picker-trigger").click()
        rows = page.locator(".model-option")
        before = [rows.nth(i).get_attribute("data-model") for i in range(rows.count())]
        model_row(page, "GPT-OSS-120B").hover()
        # Another person switches: statuses change under the pointer, the rows do not move.
        target = "DeepSeek-Coder-33B-Instruct"
        assert "status-running" not in (model_row(page, target).get_attribute("class") or "")
        httpx.post(f"{layout_server.url}/v1/models/switch",
                   json={"target_model": "deepseek-coder-33b-instruct", "wait": False},
                   headers=layout_server.headers, timeout=10)
        expect(model_row(page, target)).to_have_class(re.compile("status-loading"), timeout=5000)
        assert [rows.nth(i).get_attribute("data-model") for i in range(rows.count())] == before
        expect(model_row(page, target)).to_have_class(re.compile("status-running"), timeout=30_000)
        assert [rows.nth(i).get_attribute("data-model") for i in range(rows.count())] == before
        # Once the pointer leaves, the menu regroups: what runs comes first, under its heading.
        page.mouse.move(5, 890)
        expect(page.locator(".picker-group").first).to_have_text("Running")
        classes = [rows.nth(i).get_attribute("class") or "" for i in range(rows.count())]
        running = [("status-running" in c) for c in classes]
        assert running == sorted(running, reverse=True), classes
