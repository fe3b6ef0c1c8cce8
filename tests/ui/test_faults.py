"""Faults as a researcher lives through them in the browser: the conversation and the activity log survive."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from dashboard.engines.process import pid_cmdline
from tests.conftest import Server
from tests.ui.conftest import model_row, open_tab, pages_on, pick, running_server
from tests.ui.test_dashboard import chat_box, expect_reply

FAULT_CATALOG = """
[gpu]
source = "virtual"
total_gb = 100

[switching]
stall_timeout_s = 3
stop_timeout_s = 5

[models.steady]
name = "Steady-8B"
size_gb = 16
gpu_memory_gb = 20
args = ["--load-seconds", "0.5"]

[models.crasher]
name = "Crasher-70B"
size_gb = 140
gpu_memory_gb = 90
args = ["--load-seconds", "1.0", "--fail-at", "weights"]
"""


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_server(tmp_path_factory, "ui-faults", FAULT_CATALOG)


@pytest.fixture
def page(browser: Browser, fault_server: Server) -> Iterator[Page]:
    with pages_on(browser, fault_server) as open_:
        yield open_()


def engine_pid(model_id: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and f"--model-id {model_id} " in pid_cmdline(int(entry.name)) + " " \
                and "pytest" not in pid_cmdline(int(entry.name)):
            return int(entry.name)
    raise AssertionError(f"no engine process for {model_id}")


def send(page: Page, text: str) -> None:
    expect(chat_box(page)).to_be_enabled(timeout=30_000)
    chat_box(page).fill(text)
    chat_box(page).press("Enter")


def test_conversation_and_activity_survive_a_failed_load_and_an_engine_crash(page: Page,
                                                                              fault_server: Server) -> None:
    pick(page, "Steady-8B")
    send(page, "first question")
    expect_reply(page, "[simulated reply from steady] You said: first question")

    # 1. A load that fails: the error says why, the previous model comes back, the chat is kept.
    pick(page, "Crasher-70B")
    error = page.locator(".switch-error")
    expect(error).to_contain_text("Switch to Crasher-70B failed", timeout=30_000)
    expect(error).to_contain_text("simulated engine failure at weights")
    expect(error).to_contain_text("at weights. Restoring Steady-8B.")
    expect(model_row(page, "Steady-8B")).to_have_class(re.compile("status-running"), timeout=10_000)
    expect_reply(page, "[simulated reply from steady] You said: first question", timeout=1000)
    send(page, "still there?")
    expect_reply(page, "[simulated reply from steady] You said: still there?")

    # 2. The engine dies while serving: failed in the list, the chat locked with the reason.
    os.kill(engine_pid("steady"), signal.SIGKILL)
    expect(model_row(page, "Steady-8B")).to_have_class(re.compile("status-failed"), timeout=5000)
    expect(chat_box(page)).to_be_disabled(timeout=5000)
    expect(chat_box(page)).to_have_attribute(
        "placeholder", re.compile(r"Steady-8B exited unexpectedly \(code -9\).*Pick Steady-8B again to restart it"))
    expect_reply(page, "[simulated reply from steady] You said: still there?", timeout=1000)

    # 3. Picking it again restarts it; the whole conversation is still there.
    pick(page, "Steady-8B")
    send(page, "back again")
    expect_reply(page, "[simulated reply from steady] You said: back again")
    for said in ("first question", "still there?"):
        expect_reply(page, f"[simulated reply from steady] You said: {said}", timeout=1000)

    # The audit log has every step, in order, and the Activity tab shows them.
    audit = httpx.get(f"{fault_server.url}/v1/audit", headers=fault_server.headers).json()["entries"]
    steps = [(e["action"], e["target"], e["outcome"]) for e in reversed(audit) if e["action"] != "load"]
    assert steps == [("switch", "steady", "success"), ("switch", "crasher", "failed"),
                     ("rollback", "steady", "success"), ("engine_exit", "steady", "failed"),
                     ("switch", "steady", "success")]
    open_tab(page, "Activity")
    expect(page.locator(".activity .tabulator-row", has_text="engine_exit")).to_contain_text("orchestrator",
                                                                                          timeout=5000)
    expect(page.locator(".activity .tabulator-row", has_text="crasher")).to_contain_text("failed")
