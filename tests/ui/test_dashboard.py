"""The dashboard as a researcher uses it, in a real browser."""

from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import Page, expect

from tests.conftest import Server, wait_for
from tests.ui.conftest import LOCAL_USER, model_row, open_tab, pick

NAMES = ["GPT-OSS-120B", "GPT-OSS-20B", "DeepSeek-Coder-33B-Instruct", "Qwen2.5-32B-Instruct",
         "Llama-3.1-8B-Instruct"]


def chat_box(page: Page):
    # The chat's input is the page's only visible text area (Material's grows with a hidden twin).
    return page.locator("textarea:not([aria-hidden='true'])")


def send_button(page: Page):
    return page.get_by_role("button", name="Send")


def expect_reply(page: Page, text: str, timeout: float = 15_000) -> None:
    # Text selectors pierce the shadow DOM Panel renders into (innerText would not).
    expect(page.get_by_text(text, exact=False).first).to_be_visible(timeout=timeout)


def percent(page: Page) -> int:
    """The banner's percentage (-1 while the banner is between renders)."""
    text = page.locator(".switch-banner .percent").first.text_content(timeout=2000) or ""
    return int(text.rstrip("%")) if text.rstrip("%").isdigit() else -1


def wait_percent_above(page: Page, floor: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = percent(page)
        if value > floor:
            return value
        page.wait_for_timeout(100)
    raise AssertionError(f"the banner's percentage never rose above {floor}")


def wait_idle(server: Server) -> None:
    with httpx.Client(headers=server.headers, timeout=5) as client:
        wait_for(lambda: client.get(f"{server.url}/v1/models/status").json()["switch"] is None, timeout=60,
                 message="the running switch to end")


def test_every_model_is_listed_with_its_status_and_no_stopped_text(open_page) -> None:
    page = open_page()
    expect(page.locator(".picker-trigger")).to_contain_text("Pick a model")
    expect(page.locator(".chat-header")).to_contain_text("No model loaded")
    page.locator(".picker-trigger").click()
    for name in NAMES:
        expect(model_row(page, name)).to_be_visible()
    assert page.locator(".model-option").count() == 5
    # Grouped under stable headings; a stopped model shows its size, no status words.
    expect(page.locator(".picker-group")).to_have_text(["Available"])
    expect(model_row(page, "GPT-OSS-20B")).to_have_text(re.compile(r"^\s*GPT-OSS-20B\s*40 GB\s*$"))
    assert page.get_by_text(re.compile("Stopped|Not Found", re.I)).count() == 0
    page.keyboard.press("Escape")
    expect(page.locator(".picker-menu")).to_be_hidden()
    expect(chat_box(page)).to_be_disabled()
    expect(chat_box(page)).to_have_attribute("placeholder", "Select a model to start chatting")


def test_switch_shows_progress_locks_chat_then_chat_streams(open_page, demo_server: Server) -> None:
    page = open_page()
    pick(page, "Llama-3.1-8B-Instruct")
    banner = page.locator(".switch-banner")
    expect(banner).to_contain_text("Switching to Llama-3.1-8B-Instruct...", timeout=5000)
    expect(banner.locator(".eta")).to_contain_text("left")
    expect(page.locator(".picker-trigger")).to_contain_text("Llama-3.1-8B-Instruct")
    expect(chat_box(page)).to_be_disabled()
    expect(send_button(page)).to_be_disabled()
    expect(chat_box(page)).to_have_attribute("placeholder", re.compile(r"Switching to Llama-3\.1-8B-Instruct\.\.\."))
    first = wait_percent_above(page, -1)
    wait_percent_above(page, first)
    expect(page.locator(".switch-banner .stage")).to_contain_text("Loading")
    expect(page.locator(".switch-banner .steps li.now")).to_have_count(1)
    # The banner gives way to the chat's header, and the chat opens, once the model answers its health check.
    expect(banner).to_have_count(0, timeout=30_000)
    expect(page.locator(".chat-header")).to_contain_text("Llama-3.1-8B-Instruct")
    expect(page.locator(".chat-header")).to_contain_text("ready")
    expect(chat_box(page)).to_be_enabled(timeout=5000)
    expect(model_row(page, "Llama-3.1-8B-Instruct")).to_have_class(re.compile("status-running"))

    chat_box(page).fill("what is a shard?")
    expect(send_button(page)).to_be_enabled()  # it has something to send
    chat_box(page).press("Enter")
    expect_reply(page, "[simulated reply from llama-3.1-8b-instruct] You said: what is a shard?")

    pick(page, "GPT-OSS-20B")
    expect(banner).to_contain_text("Switching from Llama-3.1-8B-Instruct to GPT-OSS-20B...", timeout=5000)
    expect(banner).to_have_count(0, timeout=30_000)
    expect(chat_box(page)).to_be_enabled(timeout=5000)
    # The conversation outlives the switch.
    expect_reply(page, "what is a shard?", timeout=1000)
    chat_box(page).fill("and now?")
    chat_box(page).press("Enter")
    expect_reply(page, "[simulated reply from gpt-oss-20b] You said: and now?")
    expect_reply(page, "[simulated reply from llama-3.1-8b-instruct] You said: what is a shard?", timeout=1000)


def test_a_second_tab_shows_the_switch_as_it_starts_and_locks_its_chat(open_page, demo_server: Server) -> None:
    wait_idle(demo_server)
    first = open_page()
    status = httpx.get(f"{demo_server.url}/v1/models/status", headers=demo_server.headers).json()["models"]
    if status["llama-3.1-8b-instruct"]["status"] != "running":
        pick(first, "Llama-3.1-8B-Instruct")
        wait_idle(demo_server)
    # The second tab chats with a running model: its input is live when the other tab starts a switch.
    second = open_page()
    pick(second, "Llama-3.1-8B-Instruct")
    expect(chat_box(second)).to_be_enabled(timeout=5000)
    chat_box(second).fill("before the switch")
    chat_box(second).press("Enter")
    expect_reply(second, "[simulated reply from llama-3.1-8b-instruct] You said: before the switch")
    pick(first, "Qwen2.5-32B-Instruct")
    expect(first.locator(".switch-banner")).to_be_visible(timeout=5000)
    # Pushed by the orchestrator's events, not polled: the other tab shows it as soon as it paints.
    expect(second.locator(".switch-banner")).to_contain_text("Switching", timeout=1500)
    expect(chat_box(second)).to_have_attribute("placeholder", re.compile("Switching to Qwen2.5-32B-Instruct"))
    expect(chat_box(second)).to_be_disabled()
    # One number everywhere: the two tabs' banners agree with the picker's row on the percent.
    percent_now = wait_percent_above(second, 0)
    expect(model_row(second, "Qwen2.5-32B-Instruct")).to_contain_text(re.compile(r"loading \d+%"))
    assert percent_now >= 0
    expect(second.locator(".switch-banner")).to_have_count(0, timeout=30_000)
    expect(chat_box(second)).to_be_enabled(timeout=5000)


def test_cancel_stops_the_switch_and_keeps_the_previous_model(open_page, demo_server: Server) -> None:
    wait_idle(demo_server)
    page = open_page()
    models = httpx.get(f"{demo_server.url}/v1/models/status", headers=demo_server.headers).json()["models"]
    running = sorted(m["name"] for m in models.values() if m["status"] == "running")
    assert running, "earlier tests leave models running"
    pick(page, "GPT-OSS-120B")
    # Past the plan (unloading, or already loading): something was unloaded that a cancel must bring back.
    expect(page.locator(".switch-banner")).to_contain_text(re.compile("Unloading|Loading model"), timeout=10_000)
    page.locator(".cancel-switch").click()
    # At once the banner says what happens now: what was unloaded comes back, a reload of each.
    expect(page.locator(".switch-banner")).to_contain_text(re.compile("restoring", re.I), timeout=3000)
    expect(page.locator(".switch-banner")).to_have_count(0, timeout=60_000)
    expect(model_row(page, "GPT-OSS-120B")).not_to_contain_text("loading", timeout=5000)
    for name in running:
        expect(model_row(page, name)).to_have_class(re.compile("status-running"), timeout=5000)
    expect(page.locator(".model-option.status-running")).to_have_count(len(running))
    expect(chat_box(page)).to_be_enabled()


def test_replacing_a_switch_past_half_way_asks_first(open_page, demo_server: Server) -> None:
    wait_idle(demo_server)
    page = open_page()
    pick(page, "GPT-OSS-120B")
    expect(page.locator(".switch-banner")).to_be_visible(timeout=5000)
    wait_percent_above(page, 50, timeout=40)
    pick(page, "Llama-3.1-8B-Instruct")
    confirm = page.locator(".confirm-plan")
    expect(confirm).to_contain_text("Switch to Llama-3.1-8B-Instruct?", timeout=5000)
    expect(confirm).to_contain_text("This cancels the switch to GPT-OSS-120B")
    expect(confirm).to_contain_text("GPU memory free:")
    page.locator(".reject-switch").click()
    expect(confirm).to_have_count(0, timeout=5000)
    # Nothing changed: the big switch goes on to the end.
    expect(page.locator(".switch-banner")).to_contain_text("to GPT-OSS-120B...")
    expect(page.locator(".switch-banner")).to_have_count(0, timeout=40_000)
    expect(model_row(page, "GPT-OSS-120B")).to_have_class(re.compile("status-running"))


def select_running_llama(page: Page, server: Server):
    """Load Llama through the API, then open the manager; returns Llama's row there."""
    wait_idle(server)
    httpx.post(f"{server.url}/v1/models/switch", json={"target_model": "llama-3.1-8b-instruct", "stream": False},
               headers=server.headers, timeout=60)
    open_tab(page, "Models")
    row = page.locator(".model-table .tabulator-row", has_text="Llama-3.1-8B-Instruct")
    expect(row).to_contain_text("running", timeout=5000)
    return row


def act(row, action: str) -> None:
    """Click the row's own action (its cell is empty where the action does not apply)."""
    cell = row.locator(f'.tabulator-cell[tabulator-field="act_{action}"]')
    expect(cell).to_have_text(action.capitalize(), timeout=5000)
    cell.click()


def test_model_manager_unloads_a_model_and_the_activity_log_shows_it(open_page, demo_server: Server) -> None:
    page = open_page()
    row = select_running_llama(page, demo_server)
    expect(row.locator('.tabulator-cell[tabulator-field="act_load"]')).to_have_text("")  # running: no Load
    act(row, "unload")
    expect(page.get_by_text("Unload Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=30_000)
    # A stopped model shows its name and size only: no status words.
    expect(model_row(page, "Llama-3.1-8B-Instruct")).to_have_text(
        re.compile(r"^\s*✓?\s*Llama-3\.1-8B-Instruct\s*16 GB\s*$"), timeout=5000)
    expect(row).not_to_contain_text("running")
    act(row, "load")  # and now it offers Load
    expect(page.get_by_text("Load Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=30_000)
    open_tab(page, "Activity")
    expect(page.locator(".activity .tabulator-row", has_text="unload").first).to_contain_text(
        f"dashboard:{LOCAL_USER}", timeout=5000)


def test_model_manager_sleeps_wakes_and_pins_a_model(open_page, demo_server: Server) -> None:
    page = open_page()
    row = select_running_llama(page, demo_server)

    act(row, "sleep")
    expect(page.get_by_text("Sleep Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=30_000)
    expect(row).to_contain_text("sleeping", timeout=5000)
    # Asleep, it holds only a sliver of the GPU, and the picker says so.
    expect(model_row(page, "Llama-3.1-8B-Instruct")).to_contain_text("asleep")

    act(row, "wake")
    expect(page.get_by_text("Wake Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=30_000)
    expect(row).to_contain_text("running", timeout=5000)

    def pinned() -> bool:
        return httpx.get(f"{demo_server.url}/v1/models/status",
                         headers=demo_server.headers).json()["models"]["llama-3.1-8b-instruct"]["pinned"]

    act(row, "pin")
    expect(page.get_by_text("Pin Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=10_000)
    assert pinned()
    expect(model_row(page, "Llama-3.1-8B-Instruct").locator(".pin")).to_have_count(1, timeout=5000)
    act(row, "unpin")
    expect(page.get_by_text("Unpin Llama-3.1-8B-Instruct: done")).to_be_visible(timeout=10_000)
    assert not pinned()
    open_tab(page, "Activity")
    for action in ("sleep", "wake", "pin", "unpin"):
        expect(page.locator(".activity .tabulator-row", has_text=action).first).to_contain_text(
            f"dashboard:{LOCAL_USER}", timeout=5000)
