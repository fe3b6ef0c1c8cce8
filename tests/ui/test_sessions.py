"""What a page view costs the server: no dashboard until a browser has loaded the page, and once its tab is
closed, nothing; its dashboard is given back.

The server runs in a fresh Python process of its own (an embedded lab, as a notebook makes it) that counts
the dashboards alive in it: labs made earlier in the test process would blur the count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.ui.conftest import ARGS, CHROMIUM

SCRIPT = """
import gc, sys, time
import httpx
from playwright.sync_api import sync_playwright
from dashboard.notebook import connect
from dashboard.ui.app import Dashboard

def alive():
    gc.collect()
    return sum(isinstance(o, Dashboard) for o in gc.get_objects())

lab = connect(data_dir=sys.argv[1])
try:
    for _ in range(3):  # a link preview, a scanner: the page, and no browser running it
        httpx.get(lab.url + "/", timeout=60).raise_for_status()
    if alive():
        sys.exit(f"plain page views built {alive()} dashboard(s)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=sys.argv[2], args=sys.argv[3:])
        pages = []
        for _ in range(2):
            page = browser.new_page()
            page.goto(lab.url + "/")
            page.locator(".picker-trigger").wait_for(timeout=60_000)
            pages.append(page)
        both = alive()
        pages[1].close()
        deadline = time.monotonic() + 30
        while alive() >= both:  # counting walks every object, GIL held: once a second lets the server run
            if time.monotonic() > deadline:
                sys.exit(f"the closed tab's dashboard was not released ({both} alive before, {alive()} after)")
            time.sleep(1)
        browser.close()
finally:
    lab.close()
"""


def test_page_views_build_no_dashboard_and_a_closed_tab_gives_its_back(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "lab"), CHROMIUM, *ARGS],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
