"""The notebook in a real JupyterLab, offline: the dashboard renders inline and switches from its own picker."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from dashboard.engines.process import free_port
from tests.conftest import sim_processes, wait_for
from tests.ui.conftest import offline

TOKEN = "smartswitch-test-token"
CELLS = ["from dashboard import connect\nlab = connect()", "lab"]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("lab")
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                           "source": source} for source in CELLS],
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    (root / "lab.ipynb").write_text(json.dumps(notebook))
    port = free_port()
    log = open(root / "jupyter.log", "wb")  # noqa: SIM115 - open as long as JupyterLab runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (root / "jupyter.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/api/status?token={TOKEN}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=90, message="JupyterLab to answer")
        yield url
    finally:
        proc.terminate()  # shuts the kernels down: the notebook's lab closes with its kernel
        proc.wait(60)
        log.close()
        wait_for(lambda: not sim_processes(), timeout=30, message="the notebook's engines to stop")


def test_the_dashboard_renders_inline_offline_and_switches_from_its_picker(browser: Browser,
                                                                           jupyterlab: str) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems = offline(page)
    page.goto(f"{jupyterlab}/lab/tree/lab.ipynb?token={TOKEN}")
    page.locator(".jp-Notebook").wait_for(timeout=60_000)
    expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=90_000)
    page.get_by_role("menuitem", name="Run").click()
    page.get_by_text("Run All Cells", exact=True).click()
    # The inline dashboard, with its picker; nothing fetched from elsewhere.
    trigger = page.locator(".picker-trigger")
    expect(trigger).to_be_visible(timeout=90_000)
    expect(page.locator(".chat-header")).to_contain_text("No model loaded")
    trigger.click()
    page.locator(".model-option", has_text="Llama-3.1-8B-Instruct").click()
    expect(page.locator(".switch-banner")).to_contain_text("Switching to Llama-3.1-8B-Instruct", timeout=10_000)
    chat = page.locator(".jp-OutputArea textarea").first
    expect(chat).to_be_disabled()
    expect(chat).to_have_attribute("placeholder", re.compile("Switching to Llama"))
    expect(page.locator(".chat-header")).to_contain_text("ready", timeout=60_000)
    expect(chat).to_be_enabled(timeout=10_000)
    # Parts drawn after the first render come from the kernel too: a reply, the manager's table, the activity.
    chat.press_sequentially("hello offline", delay=20)
    chat.press("Enter")
    expect(page.locator(".chat-assistant", has_text="You said: hello offline")).to_be_visible(timeout=30_000)
    expect(chat).to_have_value("")
    news = page.get_by_text("Would you like to get notified about official Jupyter news?")
    if news.is_visible():  # JupyterLab's own question, not ours: out of the screenshot
        page.get_by_role("button", name="No", exact=True).click()
    # The chat shows without an inner scroll: the output is as tall as its content.
    area = page.locator(".jp-OutputArea-output").last
    assert area.evaluate("el => el.scrollHeight <= el.clientHeight + 2")
    page.screenshot(path=str(Path(__file__).resolve().parents[2] / "docs" / "jupyterlab-inline.png"))
    page.locator(".main-tabs .bk-tab", has_text="Models").click()
    expect(page.locator(".tabulator-row", has_text="Llama-3.1-8B-Instruct")).to_be_visible(timeout=10_000)
    page.locator(".main-tabs .bk-tab", has_text="Activity").click()
    expect(page.locator(".activity .tabulator-row").first).to_be_visible(timeout=10_000)
    page.close()
    # Every request off 127.0.0.1 was blocked, and none was even tried: every script, stylesheet and icon of
    # the inline dashboard comes from the notebook's own output.
    assert not problems, "\n".join(sorted(set(problems)))
