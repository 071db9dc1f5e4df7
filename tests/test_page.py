"""The registry's page at /, in a real browser (tests/browser.py), against the real app under uvicorn."""

from __future__ import annotations

import httpx
import pytest
from browser import browser  # noqa: F401  (the fixture)
from test_service import LiveServer

from deltakit_service.settings import Settings
from deltakit_service.store import Store


@pytest.fixture
def served(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "jobs.sqlite3")
    tokens = {"read": store.create_token("read"), "write": store.create_token("write")}
    store.close()
    with LiveServer(Settings(home=home)) as url:
        yield url, tokens


def test_the_page_asks_for_a_token_and_keeps_a_good_one(served, browser):  # noqa: F811
    url, tokens = served
    page = browser.new_page()
    page.goto(url + "/")
    assert page.locator("input[name=token]").count() == 1
    page.fill("input[name=token]", "not-a-token")
    page.click("button[type=submit]")
    assert page.locator("#failed").is_visible()
    page.fill("input[name=token]", tokens["read"])
    page.click("button[type=submit]")
    assert page.locator("#no-models").is_visible()
    assert page.locator("#model-count").inner_text() == "0"
    # the cookie reads the API too, as the page's own event streams need
    assert page.request.get(url + "/v1/jobs").status == 200
    page.click("text=Sign out")
    assert page.locator("input[name=token]").count() == 1
    page.close()


def test_the_page_cookie_never_writes(served):
    url, tokens = served
    with httpx.Client(base_url=url, cookies={"deltakit_token": tokens["write"]}) as http:
        assert http.get("/v1/jobs").status_code == 200
        # a cross-site form could make a browser send the cookie: writes take the Authorization header only
        answer = http.post("/v1/jobs", json={"kind": "verify", "delta": "x"})
        assert answer.status_code == 401
    with httpx.Client(base_url=url) as http:
        assert http.get("/v1/jobs").status_code == 401
        assert 'name="token"' in http.get("/").text
