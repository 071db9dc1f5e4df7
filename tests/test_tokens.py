"""Bearer tokens as users expect: create (with a name), list (never the token), revoke (401 at once)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from test_cli import deltakit_cli
from test_service import LiveServer, client

from deltakit.errors import InputNotFoundError, UnsupportedInputError
from deltakit_service.deps import TOKEN_COOKIE
from deltakit_service.settings import Settings
from deltakit_service.store import Store, TokenInfo, token_id


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def test_a_token_is_listed_by_id_scope_name_and_times_never_by_itself(store):
    began = time.time()
    token = store.create_token("read", name="ci pipeline")
    other = store.create_token("write")
    listed = store.list_tokens()
    assert [t.scope for t in listed] == ["read", "write"]
    first = listed[0]
    assert isinstance(first, TokenInfo)
    assert first.id == hashlib.sha256(token.encode()).hexdigest()[:12]
    assert first.name == "ci pipeline" and listed[1].name is None
    assert began - 1 <= first.created <= time.time()
    assert first.last_used is None
    assert token not in repr(listed) and other not in repr(listed)
    assert len({t.id for t in listed}) == 2


def test_using_a_token_records_when(store):
    token = store.create_token("read")
    before = time.time()
    assert store.token_scope(token) == "read"
    (info,) = store.list_tokens()
    assert info.last_used is not None and before - 1 <= info.last_used <= time.time()


def test_a_revoked_token_is_unknown_at_once(store):
    keep = store.create_token("write", name="keep")
    drop = store.create_token("write", name="drop")
    dropped = next(t for t in store.list_tokens() if t.name == "drop")
    revoked = store.revoke_token(dropped.id)
    assert revoked == dropped
    assert store.token_scope(drop) is None
    assert store.token_scope(keep) == "write"
    assert [t.name for t in store.list_tokens()] == ["keep"]


def test_revoking_an_unknown_or_malformed_id_names_it(store):
    store.create_token("read")
    with pytest.raises(InputNotFoundError, match="0123456789ab") as caught:
        store.revoke_token("0123456789ab")
    assert caught.value.argument == "token_id"
    for bad in ("", "xyz", "12'; DROP TABLE tokens; --", "%", "abc"):
        with pytest.raises(UnsupportedInputError, match="token id") as caught:
            store.revoke_token(bad)
        assert caught.value.argument == "token_id"
    assert len(store.list_tokens()) == 1


def test_a_full_hash_or_any_unique_prefix_of_8_or_more_names_a_token(store):
    token = store.create_token("read")
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert store.revoke_token(digest[:8].upper()).id == digest[:12]
    token = store.create_token("read")
    assert store.revoke_token(hashlib.sha256(token.encode()).hexdigest()).scope == "read"
    assert store.list_tokens() == []


@pytest.mark.parametrize("name", ["x" * 101, "line\nbreak", "tab\there", "\x00"])
def test_a_name_must_be_a_short_printable_label(store, name):
    with pytest.raises(UnsupportedInputError, match="token name") as caught:
        store.create_token("read", name=name)
    assert caught.value.argument == "name"
    assert store.list_tokens() == []


def test_tokens_made_before_ids_and_names_keep_working(tmp_path):
    """A job store from before: its tokens table has hash, scope and created only."""
    path = tmp_path / "jobs.sqlite3"
    token = "dk_made-by-an-older-deltakit"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE tokens (hash TEXT PRIMARY KEY, scope TEXT NOT NULL, created REAL NOT NULL)")
    db.execute("INSERT INTO tokens VALUES (?, 'write', 1700000000.0)", (hashlib.sha256(token.encode()).hexdigest(),))
    db.commit()
    db.close()
    store = Store(path)
    try:
        assert store.token_scope(token) == "write"
        (info,) = store.list_tokens()
        assert (info.scope, info.name, info.created) == ("write", None, 1700000000.0)
        assert info.last_used is not None
        store.revoke_token(info.id)
        assert store.token_scope(token) is None
    finally:
        store.close()


# the command line ---------------------------------------------------------------------------------


def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DELTAKIT_HOME", str(home))
    return home


def test_token_create_list_and_revoke_through_the_cli(tmp_path, monkeypatch):
    home = _home(tmp_path, monkeypatch)
    created = deltakit_cli("token", "create", "--scope", "write", "--name", "release bot")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    token_id = hashlib.sha256(token.encode()).hexdigest()[:12]
    assert token_id in created.stderr  # the id to revoke it by is said beside it, off stdout
    store = Store(home / "jobs.sqlite3")
    store.create_token("read")
    store.close()

    listed = deltakit_cli("token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert token not in listed.stdout + listed.stderr
    tokens = json.loads(listed.stdout)["tokens"]
    assert next((t["id"], t["scope"], t["name"], t["last_used"]) for t in tokens) == (
        token_id,
        "write",
        "release bot",
        None,
    )
    assert tokens[1]["scope"] == "read" and tokens[1]["name"] is None
    assert tokens[0]["created"].endswith("Z")

    text = deltakit_cli("token", "list")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["ID", "SCOPE", "CREATED", "LAST", "USED", "NAME"]
    assert lines[1].startswith(token_id) and "write" in lines[1] and lines[1].endswith("release bot")
    assert "never" in lines[1]
    assert token not in text.stdout

    revoked = deltakit_cli("token", "revoke", token_id)
    assert revoked.returncode == 0, revoked.stderr
    assert token_id in revoked.stdout and "release bot" in revoked.stdout
    store = Store(home / "jobs.sqlite3")
    assert [t.scope for t in store.list_tokens()] == ["read"]
    store.close()


def test_revoking_an_unknown_id_fails_with_one_line_naming_it(tmp_path, monkeypatch):
    _home(tmp_path, monkeypatch)
    result = deltakit_cli("token", "revoke", "feedfacecafe")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "feedfacecafe" in result.stderr, result.stderr
    assert "deltakit token list" in result.stderr


def test_an_empty_list_says_so(tmp_path, monkeypatch):
    _home(tmp_path, monkeypatch)
    result = deltakit_cli("token", "list")
    assert result.returncode == 0 and "no tokens" in result.stdout
    assert json.loads(deltakit_cli("token", "list", "--json").stdout) == {"tokens": []}


def test_a_revoked_token_answers_401_at_once_on_every_route_of_a_running_service(tmp_path, monkeypatch):
    home = _home(tmp_path, monkeypatch)
    store = Store(home / "jobs.sqlite3")
    doomed = store.create_token("write", name="doomed")
    kept = store.create_token("read", name="kept")
    store.close()
    routes = ["/v1/models", "/v1/jobs", "/metrics"]
    with LiveServer(Settings(home=home)) as url, client(url, doomed) as http, client(url, kept) as reader:
        for route in routes:
            assert http.get(route).status_code == 200, route
        assert http.get("/hub/api/models/org/name").status_code != 401
        with httpx.Client(base_url=url, cookies={TOKEN_COOKIE: doomed}) as browser:
            assert browser.get("/v1/models").status_code == 200
        doomed_id = token_id(doomed)
        # the service holds the store open meanwhile: the CLI revokes through the same SQLite file
        assert deltakit_cli("token", "revoke", doomed_id).returncode == 0
        for route in routes:
            answer = http.get(route)
            assert answer.status_code == 401, route
            assert answer.headers["www-authenticate"] == "Bearer"
        # the Hub API and the page's cookie read the same store
        assert http.get("/hub/api/models/org/name").status_code == 401
        assert reader.get("/hub/api/models/org/name").status_code != 401
        with httpx.Client(base_url=url, cookies={TOKEN_COOKIE: doomed}) as browser:
            assert browser.get("/v1/models").status_code == 401
        assert http.post("/v1/jobs", json={}).status_code == 401
        for route in routes:
            assert reader.get(route).status_code == 200, route
    store = Store(home / "jobs.sqlite3")
    listed = store.list_tokens()
    store.close()
    assert [t.name for t in listed] == ["kept"] and listed[0].last_used is not None
