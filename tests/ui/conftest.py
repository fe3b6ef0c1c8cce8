"""Chromium (Debian's, driven by Playwright) against a real `smartswitch serve` on the demo catalog."""

from __future__ import annotations

import getpass
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Browser, Locator, Page, sync_playwright

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


def demo_catalog(extra: str = "") -> str:
    """The demo catalog (plus ``extra`` models) allowing more switches: the demo allows 6 a minute per user,
    and a module's tests make more than that in a minute."""
    catalog = demo_path().read_text().replace("switches_per_minute = 6", "switches_per_minute = 100")
    assert "switches_per_minute = 100" in catalog
    return catalog + extra


OFF_HOST = re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*")
LOCAL_USER = getpass.getuser()  # who a page on an open loopback server acts for


def offline(page: Page) -> list[str]:
    """Block every request off 127.0.0.1 and collect what the page reports as broken: console errors,
    uncaught exceptions, requests that failed. The list should stay empty."""
    problems: list[str] = []
    page.route(OFF_HOST, lambda route: (problems.append(f"left the host: {route.request.url}"), route.abort()))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    return problems


@contextmanager
def pages_on(browser: Browser, server: Server, width: int = 1400,
             color_scheme: str = "light") -> Iterator[Callable[[], Page]]:
    """Open dashboard pages on ``server`` (each ready to use, offline); all are closed afterwards, and none
    may have reported an error or asked anything of another host."""
    pages: list[tuple[Page, list[str]]] = []

    def open_() -> Page:
        page = browser.new_page(viewport={"width": width, "height": 900}, color_scheme=color_scheme)
        problems = offline(page)
        page.goto(server.url + "/")
        page.locator(".picker-trigger").wait_for(timeout=30_000)
        pages.append((page, problems))
        return page

    try:
        yield open_
        for _, problems in pages:
            assert not problems, problems
    finally:
        for page, _ in pages:
            page.close()


def pick(page: Page, name: str) -> None:
    """Choose a model in the header's picker, as a person does: open it, click the row."""
    if not page.locator(".picker-menu").is_visible():
        page.locator(".picker-trigger").click()
    page.locator(".model-option", has_text=name).click()


def model_row(page: Page, name: str) -> Locator:
    """The model's row in the picker (its class says its status, even while the menu is closed)."""
    return page.locator(".model-option", has_text=name)


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_server(tmp_path_factory, "ui", demo_catalog())


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
