"""The registry's page at /, in a real browser (tests/browser.py), against the real app under uvicorn."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from browser import browser  # noqa: F401  (the fixture)
from conftest import finetune_of, llama_like, write_checkpoint
from test_service import LiveServer

from deltakit.modelstore.store import ModelStore
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
        # another site's form cannot sign a visitor in with its own token, nor out
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://elsewhere.example"}):
            posted = http.post("/signin", data={"token": tokens["read"]}, headers=headers)
            assert posted.status_code == 403 and "set-cookie" not in posted.headers
            assert http.post("/signout", headers=headers).status_code == 403
        assert http.get("/v1/jobs").status_code == 401
        assert 'name="token"' in http.get("/").text


@pytest.fixture
def registry_home(tmp_path):
    """A home whose model store holds a base, two revisions of a fine-tune of it, and an unrelated model;
    and a read token."""
    home = tmp_path / "home"
    base = llama_like(torch.bfloat16, vocab=256, hidden=64)
    config = {"config.json": '{"model_type": "llama"}\n'}
    models = ModelStore(home)
    models.import_model("meta/base", write_checkpoint(tmp_path / "base", base, files=config))
    for seed in (1, 2):
        chat = write_checkpoint(tmp_path / f"chat{seed}", finetune_of(base, seed=seed), files=config)
        models.import_model("team/chat", chat, base="meta/base")
    other = llama_like(torch.bfloat16, vocab=256, hidden=64, seed=7)
    models.import_model("team/other", write_checkpoint(tmp_path / "other", other, files=config))
    models.close()
    store = Store(home / "jobs.sqlite3")
    token = store.create_token("read")
    store.close()
    return home, token


def _signed_in(browser, url: str, token: str):  # noqa: F811
    page = browser.new_page()
    page.goto(url + "/")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    return page


def test_the_page_draws_the_lineage_revisions_and_download_line(registry_home, browser):  # noqa: F811
    home, token = registry_home
    with LiveServer(Settings(home=home)) as url:
        page = _signed_in(browser, url, token)
        assert page.locator("#model-count").inner_text() == "3"
        # the fine-tune is drawn inside its base's branch; the unrelated model is a root of its own
        chat = page.locator("#models > li > ul .model[data-repo='team/chat']")
        assert chat.count() == 1
        assert page.locator("#models > li > .model[data-repo='meta/base']").count() == 1
        assert page.locator("#models > li > .model[data-repo='team/other']").count() == 1
        assert "stored as a delta" in chat.inner_text()
        assert "finetune of meta/base" in chat.inner_text()
        chat.locator("summary").click()
        assert chat.locator("tr.revision").count() == 2
        stored, full = (chat.locator(f".sizes .{k}").inner_text() for k in ("stored", "full"))
        assert stored != full
        line = chat.locator(".copy input").input_value()
        assert line == f"HF_ENDPOINT={url}/hub hf download team/chat"
        page.close()


def test_a_running_rebuild_shows_live_progress_until_it_ends(registry_home, browser, monkeypatch):  # noqa: F811
    home, token = registry_home
    started, release = threading.Event(), threading.Event()
    ensure = ModelStore.ensure_cached

    def held(self, revision, **kw):  # the rebuild waits until the page is open, so the page sees it run
        started.set()
        release.wait(30)
        return ensure(self, revision, **kw)

    monkeypatch.setattr(ModelStore, "ensure_cached", held)
    with LiveServer(Settings(home=home)) as url:
        headers = {"Authorization": f"Bearer {token}"}
        httpx.head(f"{url}/hub/team/chat/resolve/main/model.safetensors", headers=headers, timeout=30)
        assert started.wait(30)
        page = _signed_in(browser, url, token)
        row = page.locator("tr.job")
        assert row.count() == 1
        assert row.get_attribute("data-state") == "running"
        release.set()
        # no reload: the page's event stream (its cookie as the token) moves the row on
        page.wait_for_selector("tr.job[data-state='succeeded']", timeout=30_000)
        assert row.locator(".state").inner_text() == "succeeded"
        bar = row.locator("progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") != "1"
        page.close()


def test_the_tree_draws_every_repository_once_even_when_bases_loop():
    from deltakit.modelstore.views import RepoRevision, RepoSummary
    from deltakit_service.routes.page import lineage_forest

    def repo(repo_id: str, base: str | None) -> RepoSummary:
        rev = RepoRevision(repo_id, "0" * 40, 1, 0.0, (), "delta" if base else "whole", 0, base_model=base)
        return RepoSummary(repo_id, (rev,))

    def names(nodes) -> list:
        return [(n.repo.repo_id, names(n.children)) for n in nodes]

    # a revision built on an earlier one of the same repository; two repositories built on each other
    repos = [repo("org/base", None), repo("team/panda", "team/panda"), repo("x/a", "x/b"), repo("x/b", "x/a")]
    forest = names(lineage_forest(repos))
    assert forest[:2] == [("org/base", []), ("team/panda", [])]
    assert forest[2:] in ([("x/a", [("x/b", [])])], [("x/b", [("x/a", [])])])
