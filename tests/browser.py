"""A real browser for the tests: Debian's Chromium (``apt-get install chromium``), driven by Playwright.

Nothing is downloaded at test time: Playwright is pointed at the installed browser. Where it is
missing the tests that need it skip, unless ``DELTAKIT_REQUIRE_BROWSER`` is set (CI sets it): then
they fail, so a green run always means the page was tried in a browser.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root here
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # no connection leaves the machine: without these, Chromium reaches for Google's hosts at start
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    return os.environ.get("DELTAKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing(why: str) -> None:
    if os.environ.get("DELTAKIT_REQUIRE_BROWSER"):
        pytest.fail(f"DELTAKIT_REQUIRE_BROWSER is set, but {why}")
    pytest.skip(why)


# Module scope: Playwright's sync API holds an event loop on this thread while it runs, which would stop
# later tests in the same worker from calling asyncio.run().
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        _missing("no chromium is installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()
