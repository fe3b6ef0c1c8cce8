"""Chat conversations as people use them: kept across a reload and a server restart, live in every tab of the
same user, never shown to another user.

Users are told apart by the dashboard's own login: the data dir's users file (``smartswitch users add``) makes
the server ask for one, and each user signs in in a browser context of their own (its tabs share the login
cookie, as a person's tabs do).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect

from tests.conftest import TEST_CATALOG, Server, serve_catalog, sim_processes, wait_for

USERS = {"alice": "alice-password", "bob": "bob-password"}
CATALOG = serve_catalog(TEST_CATALOG, switches_per_minute=1000)
ELSEWHERE = re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*")  # nothing leaves the machine
# Generous: the box may be busy (Chromium, the server and its engines share a few cores).
REPLY_MS = 30_000  # from Enter to the reply shown
LIVE_MS = 15_000  # from one tab showing a change to another tab showing it


class Box:
    """A `smartswitch serve` with a login, restartable on the same data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "server-data"  # where Server keeps it
        self.starts = 0
        for name, password in USERS.items():
            subprocess.run([sys.executable, "-m", "dashboard.cli", "users", "add", name, "--password-stdin",
                            "--data-dir", str(self.data_dir)], input=password, text=True, check=True, timeout=60,
                           capture_output=True)
        self.server = self._start()

    def _start(self) -> Server:
        server = Server(self.root, CATALOG)
        assert server.data_dir == self.data_dir
        switch(server, "small")  # the chat opens on the model that runs
        return server

    def restart(self) -> None:
        self.stop()
        self.server = self._start()

    def stop(self) -> None:
        self.server.stop()
        self.starts += 1
        self.server.log_path.rename(self.root / f"server.{self.starts}.log")  # the next start writes its own
        wait_for(lambda: not sim_processes(), timeout=15, message="every sim engine to exit with the server")


def switch(server: Server, model: str) -> None:
    done = httpx.post(f"{server.url}/v1/models/switch", json={"target_model": model, "stream": False},
                      headers=server.headers, timeout=120).json()
    assert done["event"] == "complete", done


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    box = Box(tmp_path_factory.mktemp("conversations"))
    yield box
    box.stop()


@pytest.fixture
def sign_in(browser: Browser, box: Box) -> Iterator[Callable[[str], Page]]:
    """A browser of the user's own, signed in through the login page: its first dashboard tab."""
    contexts: list[BrowserContext] = []

    def sign_in_(user: str) -> Page:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(context)
        context.route(ELSEWHERE, lambda route: route.abort())
        page = context.new_page()
        page.goto(box.server.url + "/")
        page.fill("#username", user)
        page.fill("#password", USERS[user])
        page.click("button[type=submit]")
        ready(page)
        return page

    yield sign_in_
    for context in contexts:
        context.close()


def another_tab(page: Page, box: Box) -> Page:
    """One more tab of the same browser, so of the same user."""
    tab = page.context.new_page()
    tab.goto(box.server.url + "/")
    ready(tab)
    return tab


# One element per message (Material's message repeats the class inside its own shadow root).
MESSAGES = ".chat-user, .chat-assistant, .chat-system-note"


def ready(page: Page) -> None:
    expect(page.locator(".new-conversation button")).to_be_visible(timeout=30_000)


def message(page: Page, text: str) -> Locator:
    """The first message of the feed that contains ``text`` (a reply contains its question)."""
    return page.locator(MESSAGES, has_text=text).first


def say(page: Page, text: str, model: str = "small") -> str:
    """Send ``text`` from this tab; the model's reply once this tab shows it."""
    textarea = page.locator("textarea:not([aria-hidden='true'])")  # not Material UI's hidden sizing copy
    expect(textarea).to_be_enabled(timeout=REPLY_MS)
    textarea.fill(text)
    textarea.press("Enter")
    reply = f"[simulated reply from {model}] You said: {text}"
    expect(message(page, reply)).to_be_visible(timeout=REPLY_MS)
    return reply


def start_new_conversation(page: Page) -> None:
    page.locator(".new-conversation button").click()
    expect(page.locator(MESSAGES)).to_have_count(0, timeout=LIVE_MS)


def test_a_conversation_survives_a_reload_and_shows_live_in_the_users_other_tab(sign_in, box: Box) -> None:
    first = sign_in("alice")
    start_new_conversation(first)
    second = another_tab(first, box)
    expect(second.locator(MESSAGES)).to_have_count(0)

    reply = say(first, "where do shards go?")
    # The other tab shows it without a reload: the store tells each tab of its user.
    expect(message(second, "where do shards go?")).to_be_visible(timeout=LIVE_MS)
    expect(message(second, reply)).to_be_visible(timeout=LIVE_MS)
    later = say(second, "and the KV cache?")
    expect(message(first, later)).to_be_visible(timeout=LIVE_MS)

    first.reload()
    ready(first)
    # In the order they were said, under who said them (text filters see into Panel's shadow DOM).
    feed = first.locator(MESSAGES)
    expect(feed).to_have_count(4)
    for i, (who, text) in enumerate([("alice", "where do shards go?"), ("Small-8B", reply),
                                     ("alice", "and the KV cache?"), ("Small-8B", later)]):
        expect(feed.nth(i).filter(has_text=text).filter(has_text=who)).to_have_count(1)


def test_a_model_change_shows_as_a_divider_in_every_tab(sign_in, box: Box) -> None:
    first = sign_in("alice")
    start_new_conversation(first)
    say(first, "hello small")
    second = another_tab(first, box)
    try:
        switch(box.server, "medium")
        reply = say(first, "hello medium", model="medium")
        for page in (first, second):
            expect(message(page, "— switched to Medium-30B —")).to_be_visible(timeout=LIVE_MS)
            expect(message(page, reply)).to_be_visible(timeout=LIVE_MS)
    finally:
        switch(box.server, "small")


def test_another_users_tabs_never_show_it(sign_in, box: Box) -> None:
    alices, bobs = sign_in("alice"), sign_in("bob")
    alices_other = another_tab(alices, box)
    reply = say(alices, "alice only: the answer is 42")
    expect(message(alices_other, reply)).to_be_visible(timeout=LIVE_MS)  # her tabs have all been told by now
    expect(message(bobs, "alice only")).to_have_count(0)
    bobs.reload()
    ready(bobs)
    expect(message(bobs, "alice only")).to_have_count(0)
    say(bobs, "bob asks his own")
    expect(message(alices, "bob asks his own")).to_have_count(0)


def test_clear_removes_the_conversation_from_every_tab(sign_in, box: Box) -> None:
    first = sign_in("alice")
    second = another_tab(first, box)
    say(first, "soon forgotten")
    expect(message(second, "soon forgotten")).to_be_visible(timeout=LIVE_MS)
    first.locator(".clear-conversation button").click()
    for page in (first, second):
        expect(message(page, "soon forgotten")).to_have_count(0, timeout=LIVE_MS)
    second.reload()
    ready(second)
    expect(message(second, "soon forgotten")).to_have_count(0)


def test_a_conversation_survives_a_server_restart(sign_in, box: Box) -> None:
    alices, bobs = sign_in("alice"), sign_in("bob")
    reply = say(alices, "remember this across a restart")
    box.restart()  # the same data dir; the login cookie is signed with the data dir's secret, so it stays good
    again = another_tab(alices, box)
    expect(message(again, "remember this across a restart")).to_be_visible(timeout=LIVE_MS)
    expect(message(again, reply)).to_be_visible()
    expect(message(another_tab(bobs, box), "remember this")).to_have_count(0)
