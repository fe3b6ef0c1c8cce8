"""Chromium (Debian's, driven by Playwright) against a real `smartswitch serve` on the demo catalog."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from dashboard.config import demo_path
from tests.conftest import Server, sim_processes, wait_for

CHROMIUM = os.environ.get("SMARTSWITCH_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync", "--disable-quic"]


def running_server(factory: pytest.TempPathFactory, name: str, catalog: str) -> Iterator[Server]:
    """A module's own `smartswitch serve`; every engine must be gone once it stops."""
    srv = Server(factory.mktemp(name), catalog)
    yield srv
    srv.stop()
    wait_for(lambda: not sim_processes(), timeout=15, message="every sim engine to exit with the server")


@contextmanager
def pages_on(browser: Browser, server: Server) -> Iterator[Callable[[], Page]]:
    """Open dashboard pages on ``server`` (each ready to use); all are closed afterwards."""
    pages: list[Page] = []

    def open_() -> Page:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url + "/")
        page.locator(".model-option").first.wait_for(timeout=30_000)
        pages.append(page)
        return page

    try:
        yield open_
    finally:
        for page in pages:
            page.close()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The demo allows 6 switches a minute per user; this module's tests make more than that in a minute.
    catalog = demo_path().read_text().replace("switches_per_minute = 6", "switches_per_minute = 100")
    assert "switches_per_minute = 100" in catalog
    yield from running_server(tmp_path_factory, "ui", catalog)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser, demo_server: Server) -> Iterator[Callable[[], Page]]:
    with pages_on(browser, demo_server) as open_:
        yield open_
