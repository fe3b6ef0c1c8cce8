"""What a page view costs the server: a plain `GET /` builds no dashboard, a closed tab gives its own back.

The server runs in this process (an embedded lab, as a notebook makes it), so the test can count the
dashboards alive in it. One lab for the module: the release is shown for the first lab a process makes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page

from dashboard.notebook import Lab, connect
from dashboard.ui.app import Dashboard
from tests.conftest import wait_for
from tests.ui.conftest import offline


def dashboards_alive() -> int:
    gc.collect()
    return sum(isinstance(o, Dashboard) for o in gc.get_objects())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = connect(data_dir=tmp_path_factory.mktemp("sessions"))
    yield lab
    lab.close()


def open_dashboard(browser: Browser, url: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems = offline(page)
    page.goto(url + "/")
    page.locator(".picker-trigger").wait_for(timeout=60_000)
    return page, problems


def test_a_closed_tab_gives_its_dashboard_back(browser: Browser, lab: Lab) -> None:
    first, first_problems = open_dashboard(browser, lab.url)  # may be the kept session: it stays
    second, second_problems = open_dashboard(browser, lab.url)
    both = dashboards_alive()
    second.close()
    # Its session ends within seconds of the tab closing, and nothing keeps its dashboard alive after that.
    # Counting walks every object with the GIL held: not so often that the server's thread cannot run.
    wait_for(lambda: dashboards_alive() < both, timeout=30, interval=1.0,
             message="the closed tab's dashboard to be released")
    first.close()
    assert not first_problems and not second_problems, first_problems + second_problems


def test_page_loads_without_a_browser_build_no_dashboard(lab: Lab) -> None:
    with httpx.Client(timeout=60) as client:
        client.get(lab.url + "/").raise_for_status()  # the page Panel keeps and answers every later load with
        kept = dashboards_alive()
        for _ in range(5):
            assert "smartswitch" in client.get(lab.url + "/").text
    assert dashboards_alive() == kept
