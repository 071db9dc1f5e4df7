"""The model registry end to end: the real app under uvicorn with the real ModelStore; a base and a fine-tune
imported over HTTP (the fine-tune kept as a delta), then downloaded through ``/hub`` by the real clients
(huggingface_hub in process, ``hf download`` and transformers in subprocesses), every file's SHA-256 the
original's. The first download of the cold fine-tune rebuilds it as a job, one however many ask; listing it
rebuilds nothing. Uploads, the lineage API, and hostile requests.

The store's backend is the ``registry`` fixture's parameter (``STORE_BACKENDS``), so the same tests run
against every backend the service can be given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hubserver import configure_client
from test_hub_api import _LOAD, VENV_BIN, client_env, raw_get, tree_hashes
from test_service import LiveServer
from tinyllama import write_finetune, write_tiny_llama

from deltakit.errors import InputNotFoundError, NoSpaceError, UnsupportedInputError
from deltakit.modelstore import Catalog, ModelStore, git_blob_oid
from deltakit.registry import Registry
from deltakit_service.hubfiles import git_blob_id
from deltakit_service.settings import Settings
from deltakit_service.store import Store

BASE, TUNE = "team/tiny-llama", "team/panda-tiny"
UPLOAD_LIMIT = 2 << 20


@contextmanager
def _local_store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    yield {}  # the default: objects under DELTAKIT_HOME/store


@contextmanager
def _s3_store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A bucket on the session's SeaweedFS (tests/seaweed.py), its endpoint and keys in the AWS variables the
    service's boto3 reads, as an operator would set them."""
    seaweed = request.getfixturevalue("seaweed")
    env = {
        "AWS_ENDPOINT_URL": seaweed.endpoint,
        "AWS_ACCESS_KEY_ID": seaweed.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"store": f"s3://{seaweed.bucket}/registry-{uuid.uuid4().hex[:12]}"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The model store's backends: each gives the settings of a service whose store uses it, for as long as the
# block runs.
STORE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[dict[str, Any]]]] = {
    "local": _local_store,
    "s3": _s3_store,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Registered:
    """The running registry: its URL, tokens, the app (for its model store) and the original folders."""

    url: str
    tokens: dict[str, str]
    server: LiveServer
    base: Path
    tune: Path
    home: Path

    @property
    def hub(self) -> str:
        return self.url + "/hub"

    @property
    def models(self) -> ModelStore:
        return self.server.app.state.models

    def http(self, scope: str = "write") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[scope]}"}, timeout=60)

    def cold(self, repo_id: str) -> str:
        """Drop ``repo_id``'s rebuilt files from the cache (once no rebuild runs); returns its commit."""
        with self.http("read") as http:
            for job in self.rebuild_jobs():
                wait_for(http, job["id"])
        rev = self.models.revision(repo_id)
        assert self.models.cache.evict(rev.commit)
        assert not self.models.is_cached(rev)
        return rev.commit

    def rebuild_jobs(self) -> list[dict[str, Any]]:
        with self.http("read") as http:
            return [j for j in http.get("/v1/jobs").json() if j["kind"] == "rebuild"]


def wait_for(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def imported(http: httpx.Client, answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 202, answer.text
    assert answer.json()["kind"] == "import" and answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"
    job = wait_for(http, answer.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"]["bytes_total"] > 0
    return job["report"]


@pytest.fixture(scope="module", params=sorted(STORE_BACKENDS))
def registry(request, tmp_path_factory) -> Iterator[Registered]:
    root = tmp_path_factory.mktemp("registry")
    originals = root / "models"
    base = write_tiny_llama(originals / "tiny-llama", seed=3)
    tune = write_finetune(base, originals / "panda", seed=1)
    (tune / "notes").mkdir()
    (tune / "notes" / "card.txt").write_text("a nested file, so the tree has a folder\n")
    home = root / "home"
    home.mkdir()
    Registry(home).add("panda-src", tune)  # the fine-tune by registered name, the base by folder
    store = Store(home / "jobs.sqlite3")
    tokens = {"read": store.create_token("read"), "write": store.create_token("write")}
    store.close()
    with STORE_BACKENDS[request.param](request) as backend:
        settings = Settings(home=home, roots=[originals], max_upload_bytes=UPLOAD_LIMIT, **backend)
        yield from _serve(settings, tokens, base, tune, home)


def _serve(settings: Settings, tokens: dict[str, str], base: Path, tune: Path, home: Path) -> Iterator[Registered]:
    """The service, with the base (by folder) and the fine-tune (by registered name) imported over HTTP."""
    server = LiveServer(settings)
    with server as url:
        reg = Registered(url, tokens, server, base, tune, home)
        with reg.http() as http:
            whole = imported(http, http.post("/v1/models", json={"repo_id": BASE, "source": "tiny-llama"}))
            delta = imported(http, http.post("/v1/models", json={"repo_id": TUNE, "source": "panda-src", "base": BASE}))
        assert whole["storage"] == "whole" and whole["base_model"] is None
        assert delta["storage"] == "delta" and delta["base_model"] == BASE and delta["relation"] == "finetune"
        assert delta["stored_bytes"] < delta["full_bytes"]
        yield reg


@pytest.fixture
def client(registry, tmp_path, monkeypatch) -> Registered:
    """The registry, with huggingface_hub in this process pointed at its /hub and a read token."""
    configure_client(monkeypatch, registry.hub, tmp_path / "hf", token=registry.tokens["read"])
    return registry


# ------------------------------------------------------------------------------------------------ /hub


def test_listing_a_cold_finetune_rebuilds_nothing(client):
    from huggingface_hub import HfApi

    commit = client.cold(TUNE)
    jobs_before = len(client.rebuild_jobs())
    api = HfApi(endpoint=client.hub, token=client.tokens["read"])
    info = api.model_info(TUNE, files_metadata=True)
    assert info.sha == commit and info.card_data["base_model"] == BASE
    assert info.card_data["base_model_relation"] == "finetune"
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(tree_hashes(client.tune))
    assert siblings["config.json"].blob_id == git_blob_id((client.tune / "config.json").read_bytes())
    assert siblings["model.safetensors"].lfs.sha256 == sha256(client.tune / "model.safetensors")
    tree = {e.path: e for e in api.list_repo_tree(TUNE, recursive=True)}
    assert tree["notes/card.txt"].blob_id == git_blob_id((client.tune / "notes" / "card.txt").read_bytes())
    asked = api.get_paths_info(TUNE, ["tokenizer.json", "notes"])
    assert [e.path for e in asked] == ["tokenizer.json", "notes"]
    assert asked[0].blob_id == git_blob_id((client.tune / "tokenizer.json").read_bytes())
    assert len(client.rebuild_jobs()) == jobs_before  # the listings started no rebuild
    assert not client.models.is_cached(client.models.revision(TUNE))

    # a HEAD is answered from the catalog too, without waiting; it starts the rebuild the GET after it wants
    head = httpx.head(
        f"{client.hub}/{TUNE}/resolve/main/config.json", headers={"Authorization": f"Bearer {client.tokens['read']}"}
    )
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str((client.tune / "config.json").stat().st_size)
    assert head.headers["etag"] == f'"{git_blob_id((client.tune / "config.json").read_bytes())}"'
    assert head.headers["x-repo-commit"] == commit
    started = client.rebuild_jobs()[: len(client.rebuild_jobs()) - jobs_before]
    assert [j["params"]["commit"] for j in started] == [commit]


def test_snapshot_download_rebuilds_the_cold_finetune_once_as_a_job(client, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    commit = client.cold(TUNE)
    before = {j["id"] for j in client.rebuild_jobs()}
    snapshot = Path(snapshot_download(TUNE, endpoint=client.hub, token=client.tokens["read"], cache_dir=tmp_path / "c"))
    assert tree_hashes(snapshot) == tree_hashes(client.tune)
    assert snapshot.name == commit
    report = HfApi(endpoint=client.hub, token=client.tokens["read"]).verify_repo_checksums(
        TUNE, cache_dir=tmp_path / "c"
    )
    assert report.checked_count == len(tree_hashes(client.tune)) and not report.mismatches

    new = [j for j in client.rebuild_jobs() if j["id"] not in before]
    assert len(new) == 1, new
    job = new[0]
    assert job["state"] == "succeeded" and job["params"] == {"repo_id": TUNE, "commit": commit}
    assert job["report"]["rebuilt"] is True and job["report"]["bytes"] == sum(
        p.stat().st_size for p in client.tune.rglob("*") if p.is_file()
    )
    assert job["progress"]["bytes_total"] > 0 and job["progress"]["bytes_done"] == job["progress"]["bytes_total"]
    with client.http("read") as http, http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        lines = [line for line in events.iter_lines() if line.startswith(("event:", "data:"))]
    assert lines[0] == "event: end" and json.loads(lines[1].removeprefix("data: "))["state"] == "succeeded"
    assert client.models.is_cached(client.models.revision(TUNE))

    # warm: served from the cache, no job
    again = Path(snapshot_download(TUNE, endpoint=client.hub, token=client.tokens["read"], cache_dir=tmp_path / "d"))
    assert tree_hashes(again) == tree_hashes(client.tune)
    assert len(client.rebuild_jobs()) == len(before) + 1


def test_eight_concurrent_cold_downloads_cause_one_rebuild(client, tmp_path):
    from huggingface_hub import hf_hub_download

    commit = client.cold(TUNE)
    before = {j["id"] for j in client.rebuild_jobs()}
    models = client.models
    builds: list[tuple[str, bool]] = []
    ensure = ModelStore.ensure_cached

    def counting(rev, **kw):  # every rebuild the store does, through a job or not
        built = ensure(models, rev, **kw)
        builds.append((rev.commit, built))
        return built

    models.ensure_cached = counting  # type: ignore[method-assign]
    try:
        start = threading.Barrier(8)
        got: list[str] = []

        def download(i: int) -> None:
            start.wait()
            got.append(
                hf_hub_download(
                    TUNE,
                    "model.safetensors",
                    endpoint=client.hub,
                    token=client.tokens["read"],
                    cache_dir=tmp_path / str(i),
                )
            )

        threads = [threading.Thread(target=download, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        del models.ensure_cached
    assert len(got) == 8 and {sha256(Path(p)) for p in got} == {sha256(client.tune / "model.safetensors")}
    assert builds.count((commit, True)) == 1  # (a base in a remote store may be fetched once too)
    new = [j for j in client.rebuild_jobs() if j["id"] not in before]
    assert len(new) == 1 and new[0]["state"] == "succeeded", new


def test_a_cold_download_waits_behind_no_other_job(client, monkeypatch):
    """The service runs one job at a time (DELTAKIT_WORKERS=1); a rebuild still starts at once."""
    client.cold(TUNE)
    gate, entered = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert gate.wait(60)
        raise UnsupportedInputError("held by the test, then refused: nothing is stored")

    monkeypatch.setattr(client.models, "import_model", held)
    with client.http() as http:
        job = http.post("/v1/models", json={"repo_id": "team/held", "source": "tiny-llama"}).json()
        try:
            assert entered.wait(30)
            got = http.get(f"/hub/{TUNE}/resolve/main/model.safetensors")
            assert got.status_code == 200
            assert hashlib.sha256(got.content).hexdigest() == sha256(client.tune / "model.safetensors")
            assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        finally:
            gate.set()
        assert wait_for(http, job["id"])["state"] == "failed"


def test_hf_download_cli_gets_the_cold_finetune(client, tmp_path):
    client.cold(TUNE)
    env = client_env(client.hub, client.tokens["read"], tmp_path / "hf-home")
    done = subprocess.run(
        [str(VENV_BIN / "hf"), "download", TUNE, "--local-dir", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert tree_hashes(tmp_path / "out") == tree_hashes(client.tune)
    base = subprocess.run(
        [str(VENV_BIN / "hf"), "download", BASE, "config.json", "--revision", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert base.returncode == 0, base.stderr
    printed = base.stdout.strip().splitlines()[-1].split("path:")[-1].strip()  # 'PATH' or '  path: PATH'
    assert sha256(Path(printed)) == sha256(client.base / "config.json")


def test_transformers_from_pretrained_loads_the_cold_finetune(client, tmp_path):
    client.cold(TUNE)
    env = client_env(client.hub, client.tokens["read"], tmp_path / "hf-home")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, TUNE, str(client.tune)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["same"] is True and loaded["tensors"] > 0
    snapshot = next((tmp_path / "hf-home" / "hub").glob("models--team--panda-tiny/snapshots/*"))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha256(snapshot / name) == sha256(client.tune / name)


def test_hostile_hub_requests(client):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    read = client.tokens["read"]
    for target in ("/api/models/team/..", "/team/../resolve/main/config.json", f"/{TUNE}/resolve/main/../config.json"):
        status, _, _ = raw_get(client.hub, target, read)
        assert status in (400, 404), (target, status)
    size = (client.tune / "model.safetensors").stat().st_size
    past = httpx.get(
        f"{client.hub}/{TUNE}/resolve/main/model.safetensors",
        headers={"Authorization": f"Bearer {read}", "Range": f"bytes={size}-"},
    )
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    missing = httpx.get(
        f"{client.hub}/api/models/{TUNE}/revision/{'a' * 40}", headers={"Authorization": f"Bearer {read}"}
    )
    assert missing.status_code == 404 and missing.headers["x-error-code"] == "RevisionNotFound"
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=client.hub, token=read).model_info(TUNE, revision="7")


# ------------------------------------------------------------------------------------------ /v1/models


def test_the_lineage_api(registry):
    with registry.http("read") as http:
        base = http.get(f"/v1/models/{BASE}").json()
        assert base["derived"] == [TUNE] and [r["storage"] for r in base["revisions"]] == ["whole"]
        base_commit = base["revisions"][0]["commit"]
        tune = http.get(f"/v1/models/{TUNE}").json()
        first = tune["revisions"][0]
        assert first["number"] == 1 and first["storage"] == "delta" and first["relation"] == "finetune"
        assert first["base_model"] == BASE and first["base_commit"] == base_commit
        assert first["built_from"] == [f"{BASE}@{base_commit}"] and tune["derived"] == []
        assert first["stored_bytes"] < first["full_bytes"] == sum(f["size"] for f in first["files"])
        assert {f["path"]: f["sha256"] for f in first["files"]} == tree_hashes(registry.tune)
        assert http.get(f"/v1/models/{TUNE}/revisions/1").json() == first
        assert http.get(f"/v1/models/{TUNE}/revisions/{first['commit']}").json()["number"] == 1
        assert http.get(f"/v1/models/{TUNE}/revisions/main").json()["commit"] == tune["revisions"][-1]["commit"]
        nothing = http.get(f"/v1/models/{TUNE}/revisions/99")
        assert nothing.status_code == 404 and nothing.headers["content-type"] == "application/problem+json"
        assert http.get("/v1/models/team/nothing").status_code == 404
        for hostile in ("/v1/models/team/..", "/v1/models/../..", "/v1/models/team/%2E%2E/revisions/1"):
            assert raw_get(registry.url, hostile, registry.tokens["read"])[0] in (404, 422), hostile
        listed = {m["name"]: m for m in http.get("/v1/models").json()}
        assert listed["panda-src"]["kind"] == "model"  # the registered names, as before
        assert listed[TUNE]["kind"] == "repo" and listed[TUNE]["base_model"] == BASE
        assert listed[BASE]["derived"] == [TUNE]
        assert http.get("/v1/models/panda-src").json()["kind"] == "model"


def test_import_requests_are_checked_before_a_job(registry):
    with registry.http("read") as reader:
        refused = reader.post("/v1/models", json={"repo_id": "team/x", "source": "tiny-llama"})
        assert refused.status_code == 403
        upload = reader.post("/v1/models/upload", params={"repo_id": "team/x"}, files={"files": ("a.json", b"{}")})
        assert upload.status_code == 403
    with registry.http() as http:
        for body, status, field in (
            ({"repo_id": "team/x", "source": "nothing-here"}, 404, "source"),
            ({"repo_id": "team/x", "source": "../home"}, 422, "source"),
            ({"repo_id": "team/x", "source": "/etc"}, 422, "source"),
            ({"repo_id": "team/../x", "source": "tiny-llama"}, 422, "repo_id"),
            ({"repo_id": "team/x", "source": "tiny-llama", "base": "team/nothing"}, 404, "base"),
        ):
            answer = http.post("/v1/models", json=body)
            assert answer.status_code == status, (body, answer.text)
            assert answer.json().get("field") == field, answer.json()
            assert str(registry.home) not in answer.text
    with pytest.raises(InputNotFoundError):  # no refused import reached the store
        registry.models.revision("team/x")


def _upload_files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("files", (p.relative_to(folder).as_posix(), p.read_bytes())) for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def _stored_keys(registry: Registered) -> set[str]:
    return set(registry.models.objects.keys())


def test_an_upload_is_imported_as_a_delta_and_served(registry, tmp_path):
    with registry.http() as http:
        answer = http.post(
            "/v1/models/upload",
            params={"repo_id": "team/panda-upload", "base": BASE},
            files=_upload_files(registry.tune),
        )
        report = imported(http, answer)
    assert (
        report["storage"] == "delta"
        and report["base_model"] == BASE
        and report["files"] == len(tree_hashes(registry.tune))
    )
    assert not any((registry.home / "uploads").iterdir())  # the upload's folder went with its job
    rev = registry.models.revision("team/panda-upload")
    assert {f.path: f.sha256 for f in rev.files} == tree_hashes(registry.tune)
    config = httpx.get(
        f"{registry.hub}/team/panda-upload/resolve/main/notes/card.txt",
        headers={"Authorization": f"Bearer {registry.tokens['read']}"},
    )
    assert config.status_code == 200 and config.content == (registry.tune / "notes" / "card.txt").read_bytes()


def test_an_upload_over_the_limit_or_with_a_bad_path_stores_nothing(registry):
    keys = _stored_keys(registry)
    padding = [("files", ("padding.bin", b"\0" * UPLOAD_LIMIT))]
    with registry.http() as http:
        declared = http.post("/v1/models/upload", params={"repo_id": "team/too-big"}, files=padding)
        assert declared.status_code == 413, declared.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            boundary = b"xyzzy"
            yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n\r\n'
            for _ in range(UPLOAD_LIMIT // (64 << 10) + 2):
                yield b"\0" * (64 << 10)
            yield b"\r\n--" + boundary + b"--\r\n"

        try:
            streamed = http.post(
                "/v1/models/upload",
                params={"repo_id": "team/too-big"},
                content=chunks(),
                headers={"Content-Type": "multipart/form-data; boundary=xyzzy"},
            )
            assert streamed.status_code == 413, streamed.text
        except httpx.TransportError:  # the server may close the connection while the client still sends
            pass
        for name in ("../escape.json", "/etc/passwd", "notes/../../x", ".hidden"):
            bad = http.post(
                "/v1/models/upload",
                params={"repo_id": "team/bad-path"},
                files=[("files", ("config.json", b"{}")), ("files", (name, b"x"))],
            )
            assert bad.status_code == 422 and bad.json()["field"] == "files", (name, bad.text)
        twice = http.post(
            "/v1/models/upload",
            params={"repo_id": "team/bad-path"},
            files=[("files", ("config.json", b"{}")), ("files", ("config.json", b"{}"))],
        )
        assert twice.status_code == 422
        names = {m["name"] for m in http.get("/v1/models").json()}
    assert "team/too-big" not in names and "team/bad-path" not in names
    assert _stored_keys(registry) == keys
    assert not any((registry.home / "uploads").iterdir())
    assert not (registry.home / "escape.json").exists() and not (registry.home / "uploads" / "escape.json").exists()


# -------------------------------------------------------------------------------------------- catalog


def test_git_ids_are_recorded_at_import_and_an_older_catalog_is_migrated(registry, tmp_path):
    rev = registry.models.revision(TUNE)
    for f in rev.files:
        path = registry.tune / f.path
        assert f.git_oid == git_blob_id(path.read_bytes()) == git_blob_oid(path, f.size)
    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as db:
        db.execute(
            "CREATE TABLE files (commit_id TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT "
            "NOT NULL, source TEXT NOT NULL, object_key TEXT, tensor_order TEXT, PRIMARY KEY (commit_id, path))"
        )
        db.execute("INSERT INTO files VALUES ('c', 'config.json', 2, 'ab', 'object', 'k', NULL)")
    catalog = Catalog(old)
    try:
        assert catalog.recipe("c")[0].git_oid is None  # read as before; the Hub API reads such a file's bytes
    finally:
        catalog.close()


def test_a_restart_removes_uploads_no_queued_job_holds(tmp_path):
    home = tmp_path / "home"
    stale = home / "uploads" / "0123abcd"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    store = Store(home / "jobs.sqlite3")
    queued, _ = store.create_job("import", {"repo_id": "team/waiting", "upload": "feedbeef"}, None)
    store.close()
    (home / "uploads" / "feedbeef").mkdir()
    (home / "uploads" / "feedbeef" / "notes.txt").write_text("not a model")
    with LiveServer(Settings(home=home)) as url:
        assert not stale.exists()
        store = Store(home / "jobs.sqlite3")
        token = store.create_token("read")
        store.close()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            job = wait_for(http, queued.id)  # the queued import kept its upload and ran after the restart
        assert job["state"] == "succeeded", job
        assert job["report"]["repo_id"] == "team/waiting" and job["report"]["files"] == 1
        assert not (home / "uploads" / "feedbeef").exists()  # used once, then removed


def test_upload_paths_and_a_full_disk(tmp_path, monkeypatch):
    from deltakit_service import uploads

    for good in ("config.json", "tokenizer/vocab.json", "a/b/c.safetensors"):
        assert uploads.check_upload_path(good) == good
    for bad in ("", "/abs", "../x", "a/../b", "a//b", "./a", ".git/config", "a\\b", "a\0b", "x" * 2000):
        with pytest.raises(UnsupportedInputError):
            uploads.check_upload_path(bad)

    parts = uploads._Parts(tmp_path)
    parts.on_part_begin()
    for name, value in ((b"Content-Disposition", b'form-data; name="files"; filename="w.bin"'),):
        parts.on_header_field(name, 0, len(name))
        parts.on_header_value(value, 0, len(value))
        parts.on_header_end()
    parts.on_headers_finished()
    assert parts.paths == ["w.bin"]

    class FullDisk:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    parts._out = FullDisk()  # type: ignore[assignment]
    with pytest.raises(NoSpaceError):
        parts.on_part_data(b"abc", 0, 3)
