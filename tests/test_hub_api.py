"""The Hub-compatible read API under /hub, driven by the real clients: huggingface_hub in process, the
``hf`` CLI and transformers in subprocesses with only HF_ENDPOINT, HF_TOKEN and HF_HOME set, against the
real app under uvicorn. The store behind it is ``FolderRepositories`` below: the ``Repositories``
protocol over folders of real files, small enough to read at a glance (the real ModelStore replaces it in
end-to-end tests)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hubserver import configure_client
from test_service import LiveServer
from tinyllama import write_finetune, write_tiny_llama

from deltakit.errors import InputNotFoundError
from deltakit.modelstore.views import Relation, RepoRevision, Repositories, RepoSummary, StoredFile
from deltakit.progress import ProgressFactory, no_progress
from deltakit_service.hubfiles import git_blob_id, is_lfs, lfs_pointer, parse_range
from deltakit_service.settings import Settings
from deltakit_service.store import Store

BASE, TUNE = "team/tiny-llama", "team/panda-tiny"
VENV_BIN = Path(sys.executable).parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FolderRepositories:
    """Repositories over folders: each revision is one folder whose files are served as they are."""

    def __init__(self) -> None:
        self._revisions: dict[str, list[RepoRevision]] = {}
        self._folders: dict[str, Path] = {}  # commit -> folder
        self.opened: list[tuple[str, str]] = []  # (commit, path) of every file_path call

    def add(
        self, repo_id: str, folder: Path, base: str | None = None, relation: Relation | None = None
    ) -> RepoRevision:
        files = tuple(
            StoredFile(p.relative_to(folder).as_posix(), p.stat().st_size, sha256(p))
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        )
        number = len(self._revisions.get(repo_id, [])) + 1
        commit = hashlib.sha1(f"{repo_id}@{number}".encode()).hexdigest()
        size = sum(f.size for f in files)
        rev = RepoRevision(repo_id, commit, number, time.time(), files, "whole", size, base, None, relation)
        self._revisions.setdefault(repo_id, []).append(rev)
        self._folders[commit] = folder
        return rev

    def repositories(self) -> Sequence[RepoSummary]:
        return [RepoSummary(r, tuple(revs)) for r, revs in sorted(self._revisions.items())]

    def revision(self, repo_id: str, revision: str = "main") -> RepoRevision:
        revisions = self._revisions.get(repo_id)
        if not revisions:
            raise InputNotFoundError(f"no repository {repo_id}", argument="repo_id")
        for rev in revisions:
            if revision in (rev.commit, str(rev.revision_number)):
                return rev
        if revision == "main":
            return revisions[-1]
        raise InputNotFoundError(f"{repo_id} has no revision {revision}", argument="revision")

    def file_path(self, revision: RepoRevision, path: str, *, progress: ProgressFactory = no_progress) -> Path:
        self.opened.append((revision.commit, path))
        if revision.file(path) is None:
            raise InputNotFoundError(f"{revision.repo_id} has no file {path}", argument="path")
        return self._folders[revision.commit] / path


class Recorder:
    """ASGI middleware keeping (method, path, status, headers) of every answer."""

    def __init__(self, app, seen: list) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope, receive, send):
        async def recording(message):
            if message["type"] == "http.response.start":
                headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
                self.seen.append((scope["method"], scope["path"], message["status"], headers))
            await send(message)

        await self.app(scope, receive, recording)


class LiveHub(LiveServer):
    """The service under uvicorn on a loopback port, its models the given Repositories, every response
    recorded in ``seen``; entering gives the /hub endpoint."""

    def __init__(self, home: Path, models: Repositories) -> None:
        super().__init__(Settings(home=home))
        self.seen: list[tuple[str, str, int, dict[str, str]]] = []
        self.app.add_middleware(Recorder, seen=self.seen)
        self.models = models

    def __enter__(self) -> str:
        url = super().__enter__()
        self.app.state.models = self.models  # after the lifespan ran: the fixture store wins
        return url + "/hub"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = write_tiny_llama(root / "tiny-llama", seed=3)
    tune1 = write_finetune(base, root / "panda-1", seed=1)
    tune2 = write_finetune(base, root / "panda-2", extra_rows=8, seed=2)
    (tune2 / "notes").mkdir()
    (tune2 / "notes" / "card.txt").write_text("a nested file, so the tree has a folder\n")
    (tune2 / "notes" / "empty.txt").write_bytes(b"")
    return base, tune1, tune2


@pytest.fixture
def hub(folders, tmp_path, monkeypatch):
    """(endpoint, tokens, models, server, folders): the hub serving BASE and two revisions of TUNE."""
    base, tune1, tune2 = folders
    models = FolderRepositories()
    models.add(BASE, base)
    models.add(TUNE, tune1, BASE, "finetune")
    models.add(TUNE, tune2, BASE, "finetune")
    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "jobs.sqlite3")
    tokens = {"read": store.create_token("read"), "write": store.create_token("write")}
    store.close()
    server = LiveHub(home, models)
    with server as endpoint:
        configure_client(monkeypatch, endpoint, tmp_path / "hf", token=tokens["read"])
        yield endpoint, tokens, models, server, folders


def tree_hashes(folder: Path) -> dict[str, str]:
    """path -> SHA-256 of every file under ``folder``, leaving out the client's bookkeeping (``.cache/``)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256(p) for p in files if p.relative_to(folder).parts[0] != ".cache"}


def no_xet(server: LiveHub) -> None:
    assert server.seen
    for method, path, _, headers in server.seen:
        assert "xet" not in path, (method, path)
        assert not [h for h in headers if h.startswith("x-xet") or h == "link"], (path, headers)


# ------------------------------------------------------------------------------------------ huggingface_hub


def test_snapshot_download_gets_every_file_byte_for_byte(hub, tmp_path):
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils._runtime import is_xet_available

    endpoint, tokens, models, server, (_, _, tune2) = hub
    assert is_xet_available() and not constants.HF_HUB_DISABLE_XET  # Xet stays on: the server never offers it

    snapshot = Path(snapshot_download(TUNE, endpoint=endpoint, token=tokens["read"], cache_dir=tmp_path / "cache"))
    assert tree_hashes(snapshot) == tree_hashes(tune2)
    assert snapshot.name == models.revision(TUNE).commit  # the cache's snapshot folder is our commit

    # the cache names blobs by ETag: SHA-256 for LFS files, the git blob id for the others
    blobs = {p.name for p in (tmp_path / "cache" / "models--team--panda-tiny" / "blobs").iterdir()}
    expected = {
        sha256(p) if is_lfs(name, p.stat().st_size) else git_blob_id(p.read_bytes())
        for name, p in ((p.relative_to(tune2).as_posix(), p) for p in tune2.rglob("*") if p.is_file())
    }
    assert blobs == expected
    assert any(is_lfs(n, 0) for n in tree_hashes(tune2)) and not all(is_lfs(n, 0) for n in tree_hashes(tune2))

    # the client's own checksum verification (LFS SHA-256 and git blob ids) against the tree listing
    report = HfApi(endpoint=endpoint, token=tokens["read"]).verify_repo_checksums(TUNE, cache_dir=tmp_path / "cache")
    assert report.checked_count == len(tree_hashes(tune2)) and not report.mismatches
    assert not report.missing_paths and not report.extra_paths
    no_xet(server)

    # a second snapshot is served from the client's cache after one listing: no file is sent again
    sent = len([s for s in server.seen if "/resolve/" in s[1] and s[0] == "GET"])
    snapshot_download(TUNE, endpoint=endpoint, token=tokens["read"], cache_dir=tmp_path / "cache")
    assert len([s for s in server.seen if "/resolve/" in s[1] and s[0] == "GET"]) == sent


def test_hf_hub_download_and_model_info(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    endpoint, tokens, models, _, (_, tune1, tune2) = hub
    first = models.revision(TUNE, "1")
    path = hf_hub_download(
        TUNE, "model.safetensors", revision=first.commit, endpoint=endpoint, token=tokens["read"], cache_dir=tmp_path
    )
    assert sha256(Path(path)) == sha256(tune1 / "model.safetensors")
    assert Path(path).resolve().name == sha256(tune1 / "model.safetensors")  # the blob is named by its SHA-256
    by_number = hf_hub_download(TUNE, "config.json", revision="1", endpoint=endpoint, cache_dir=tmp_path)
    assert Path(by_number).read_bytes() == (tune1 / "config.json").read_bytes()

    api = HfApi(endpoint=endpoint, token=tokens["read"])
    info = api.model_info(TUNE, files_metadata=True)
    assert info.id == TUNE and info.sha == models.revision(TUNE).commit
    assert info.card_data["base_model"] == BASE and info.card_data["base_model_relation"] == "finetune"
    assert f"base_model:finetune:{BASE}" in info.tags and info.library_name == "transformers"
    siblings = {s.rfilename: s for s in info.siblings}
    assert {n: s.size for n, s in siblings.items()} == {n: (tune2 / n).stat().st_size for n in tree_hashes(tune2)}
    assert siblings["model.safetensors"].lfs.sha256 == sha256(tune2 / "model.safetensors")
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_id((tune2 / "config.json").read_bytes())

    at_first = api.model_info(TUNE, revision=first.commit)
    assert at_first.sha == first.commit and "notes/card.txt" not in {s.rfilename for s in at_first.siblings}
    assert api.model_info(BASE).card_data is None

    assert sorted(api.list_repo_files(TUNE)) == sorted(tree_hashes(tune2))
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(TUNE)}
    assert top["notes"] == "RepoFolder" and "notes/card.txt" not in top
    assert [e.path for e in api.list_repo_tree(TUNE, path_in_repo="notes")] == ["notes/card.txt", "notes/empty.txt"]
    asked = api.get_paths_info(TUNE, ["config.json", "notes", "nothing.txt", "model.safetensors"], revision="2")
    assert [(type(e).__name__, e.path) for e in asked] == [
        ("RepoFile", "config.json"),
        ("RepoFolder", "notes"),
        ("RepoFile", "model.safetensors"),
    ]
    assert (
        asked[2].lfs.sha256 == sha256(tune2 / "model.safetensors")
        and asked[0].size == (tune2 / "config.json").stat().st_size
    )
    # safetensors metadata, read by the client with Range requests on the file's header
    from safetensors import safe_open

    served = api.get_safetensors_metadata(TUNE).files_metadata["model.safetensors"].tensors
    with safe_open(str(tune2 / "model.safetensors"), "pt") as original:
        assert {n: t.shape for n, t in served.items()} == {
            n: list(original.get_slice(n).get_shape())
            for n in original.keys()  # noqa: SIM118 - safe_open is no dict
        }
    assert api.file_exists(TUNE, "tokenizer.model") and not api.file_exists(TUNE, "pytorch_model.bin")
    assert api.repo_exists(BASE) and not api.repo_exists("team/nothing")


def test_the_clients_errors(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint, tokens, _, _, _ = hub
    api = HfApi(endpoint=endpoint, token=tokens["read"])
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(TUNE, revision="9")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(TUNE, revision="f" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(TUNE, "missing.json", endpoint=endpoint, token=tokens["read"], cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(TUNE, path_in_repo="additional_chat_templates"))
    with pytest.raises(RepositoryNotFoundError):  # no token: the Hub's 401 for a repo one may not see
        HfApi(endpoint=endpoint, token=False).model_info(TUNE)
    with pytest.raises(HfHubHTTPError) as refused:  # a token the service never issued
        HfApi(endpoint=endpoint, token="dk_forged").model_info(TUNE)
    assert refused.value.response.status_code == 401 and not isinstance(refused.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(TUNE, "config.json", endpoint=endpoint, token=False, cache_dir=tmp_path / "anon")
    assert HfApi(endpoint=endpoint, token=tokens["write"]).model_info(TUNE).id == TUNE  # write scope reads too


# ---------------------------------------------------------------------------------------------- raw HTTP


def test_head_range_and_etags(hub):
    endpoint, tokens, models, _, (_, _, tune2) = hub
    rev = models.revision(TUNE)
    weights = (tune2 / "model.safetensors").read_bytes()
    digest = hashlib.sha256(weights).hexdigest()
    with httpx.Client(base_url=endpoint, headers={"Authorization": f"Bearer {tokens['read']}"}) as http:
        url = f"/{TUNE}/resolve/main/model.safetensors"
        head = http.head(url)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["etag"] == head.headers["x-linked-etag"] == f'"{digest}"'
        assert head.headers["x-linked-size"] == head.headers["content-length"] == str(len(weights))
        assert head.headers["x-repo-commit"] == rev.commit and head.headers["accept-ranges"] == "bytes"

        whole = http.get(url)
        assert whole.status_code == 200 and whole.content == weights

        part = http.get(url, headers={"Range": "bytes=10-99"})
        assert part.status_code == 206 and part.content == weights[10:100]
        assert part.headers["content-range"] == f"bytes 10-99/{len(weights)}"
        assert http.get(url, headers={"Range": "bytes=-16"}).content == weights[-16:]
        tail = http.get(url, headers={"Range": f"bytes={len(weights) - 5}-"})
        assert tail.status_code == 206 and tail.content == weights[-5:]
        capped = http.get(url, headers={"Range": f"bytes=0-{len(weights) * 2}"})
        assert capped.status_code == 206 and capped.content == weights

        past = http.get(url, headers={"Range": f"bytes={len(weights)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(weights)}"
        assert http.get(url, headers={"Range": "bytes=5-"}, params={}).status_code == 206
        stale = http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-this-version"'})
        assert stale.status_code == 200 and stale.content == weights  # another version's bytes: send it whole

        config = http.head(f"/{TUNE}/resolve/{rev.commit}/config.json")
        assert config.headers["etag"] == f'"{git_blob_id((tune2 / "config.json").read_bytes())}"'
        assert "x-linked-etag" not in config.headers and "x-linked-size" not in config.headers

        missing = http.head(f"/{TUNE}/resolve/main/nope.bin")
        assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
        assert missing.headers["x-repo-commit"] == rev.commit
        assert http.get(f"/{TUNE}/resolve/7/config.json").headers["x-error-code"] == "RevisionNotFound"
        assert http.get("/team/nope/resolve/main/config.json").headers["x-error-code"] == "RepoNotFound"


def raw_get(endpoint: str, target: str, token: str) -> tuple[int, dict[str, str], bytes]:
    """A request sent exactly as written: no client normalises its '..' away."""
    parts = urlsplit(endpoint)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("GET", parts.path + target, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def test_hostile_names_reach_no_file(hub, tmp_path):
    endpoint, tokens, models, _, _ = hub
    secret = tmp_path / "secret.txt"
    secret.write_text("not to be served")
    for target in (
        f"/{TUNE}/resolve/main/../../../../../../{secret}",
        f"/{TUNE}/resolve/main/notes/../config.json",
        f"/{TUNE}/resolve/main/%2E%2E/%2E%2E/etc/passwd",
        f"/{TUNE}/resolve/main/..%2F..%2Fconfig.json",
        "/team/../resolve/main/config.json",
        "/team/..%2Fteam%2Fpanda-tiny/resolve/main/config.json",
        "/../team/panda-tiny/resolve/main/config.json",
        "/api/models/team/..",
        "/api/models/..%2F../tiny-llama",
        f"/api/models/{TUNE}/tree/main/..%2F..",
        f"/api/models/{TUNE}/revision/..%2F..",
        "/team/.hidden/resolve/main/config.json",
    ):
        status, _, body = raw_get(endpoint, target, tokens["read"])
        assert status in (400, 404), (target, status)
        assert b"not to be served" not in body and b"root:" not in body, target
    assert all(".." not in path for _, path in models.opened)


def test_tokens_are_required(hub):
    endpoint, _, models, _, _ = hub
    for token in (None, "dk_forged"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for url in (f"/api/models/{TUNE}", f"/{TUNE}/resolve/main/config.json", f"/api/models/{TUNE}/tree/main"):
            answer = httpx.get(endpoint + url, headers=headers)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", url
            assert answer.json()["error"]
    assert not models.opened  # refused before the store was asked for anything


class GatedRepositories(FolderRepositories):
    """file_path waits for ``gate``, as the store's does while a rebuild runs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.waiting = threading.Event(), threading.Event()

    def file_path(self, revision: RepoRevision, path: str, *, progress: ProgressFactory = no_progress) -> Path:
        self.waiting.set()
        assert self.gate.wait(30)
        return super().file_path(revision, path, progress=progress)


def test_a_waiting_download_blocks_nothing_else(folders, tmp_path):
    base, _, _ = folders
    models = GatedRepositories()
    models.add(BASE, base)
    (tmp_path / "home").mkdir()
    store = Store(tmp_path / "home" / "jobs.sqlite3")
    token = store.create_token("read")
    store.close()
    headers = {"Authorization": f"Bearer {token}"}
    with LiveHub(tmp_path / "home", models) as endpoint:
        downloads: list[httpx.Response] = []

        def download() -> None:
            downloads.append(
                httpx.get(f"{endpoint}/{BASE}/resolve/main/model.safetensors", headers=headers, timeout=60)
            )

        waiters = [threading.Thread(target=download) for _ in range(4)]
        for thread in waiters:
            thread.start()
        assert models.waiting.wait(10)
        info = httpx.get(f"{endpoint}/api/models/{BASE}", headers=headers, timeout=5)  # served meanwhile
        assert info.status_code == 200 and info.json()["id"] == BASE
        assert httpx.get(endpoint.removesuffix("/hub") + "/healthz", timeout=5).status_code == 200
        assert not downloads
        models.gate.set()
        for thread in waiters:
            thread.join(60)
    assert [d.status_code for d in downloads] == [200] * 4
    assert {hashlib.sha256(d.content).hexdigest() for d in downloads} == {sha256(base / "model.safetensors")}


def test_a_store_copy_of_the_wrong_size_is_never_sent(folders, tmp_path):
    base, _, _ = folders
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in base.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    models = FolderRepositories()
    models.add(BASE, copy)
    (copy / "config.json").write_bytes(b"{}")  # the store's copy changed after the import was recorded
    (tmp_path / "home").mkdir()
    store = Store(tmp_path / "home" / "jobs.sqlite3")
    headers = {"Authorization": f"Bearer {store.create_token('read')}"}
    store.close()
    server = LiveHub(tmp_path / "home", models)
    with server as endpoint:
        answer = httpx.get(f"{endpoint}/{BASE}/resolve/main/config.json", headers=headers)
        # the store's fault, not the client's: 500, as the Hub answers, naming the file, never a server path
        assert answer.status_code == 500 and "config.json" in answer.json()["error"]
        assert str(copy) not in answer.text
        server.app.state.models = None  # a service without a model store
        unavailable = httpx.get(f"{endpoint}/api/models/{BASE}", headers=headers)
        assert unavailable.status_code == 503 and "store" in unavailable.json()["error"]


def test_range_parsing():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-4", 10).content_range == "bytes 2-4/10"
    assert parse_range("bytes=-3", 10).start == 7
    assert parse_range("bytes=-30", 10).start == 0
    assert parse_range("bytes=4-2", 10) is None  # not a valid range: the whole file
    assert parse_range("bytes=0-1,4-5", 10) is None  # several: the whole file, as S3 answers
    assert parse_range("items=0-1", 10) is None
    for past in ("bytes=10-", "bytes=11-20", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(past, 10)
    assert is_lfs("model.safetensors", 1) and is_lfs("x.gguf", 1) and is_lfs("tokenizer.model", 1)
    assert is_lfs("big.json", 10 * 1024 * 1024) and not is_lfs("config.json", 100)
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git hash-object /dev/null
    assert len(lfs_pointer("a" * 64, 497764107)) == 134  # the pointerSize the Hub lists for such a file


# ------------------------------------------------------------------------------------------ subprocesses


def client_env(endpoint: str, token: str, home: Path) -> dict[str, str]:
    """The environment a user sets: nothing but the endpoint, the token and where the cache goes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return env | {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HOME": str(home), "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


def test_hf_download_cli(hub, tmp_path):
    endpoint, tokens, _, server, (base, _, _) = hub
    env = client_env(endpoint, tokens["read"], tmp_path / "hf-home")
    done = subprocess.run(
        [str(VENV_BIN / "hf"), "download", BASE, "--local-dir", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert tree_hashes(tmp_path / "out") == tree_hashes(base)
    one = subprocess.run(
        [str(VENV_BIN / "hf"), "download", TUNE, "config.json", "--revision", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    assert Path(one.stdout.strip().splitlines()[-1]).name == "config.json"
    no_xet(server)
    assert all(path.startswith("/hub/") or path == "/hub" for _, path, _, _ in server.seen if "agent" not in path)


_LOAD = """
import hashlib, json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

repo, original = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float16)
tokenizer = AutoTokenizer.from_pretrained(repo)
expected = load_file(original + "/model.safetensors")
state = model.state_dict()
same = all(torch.equal(state[n], t) for n, t in expected.items())
print(json.dumps({"same": same, "tensors": len(expected), "ids": tokenizer("the delta base")["input_ids"]}))
"""


def test_transformers_from_pretrained(hub, tmp_path):
    endpoint, tokens, _, server, (_, _, tune2) = hub
    env = client_env(endpoint, tokens["read"], tmp_path / "hf-home")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, TUNE, str(tune2)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["same"] is True and loaded["tensors"] > 0
    from transformers import AutoTokenizer

    assert loaded["ids"] == AutoTokenizer.from_pretrained(tune2)("the delta base")["input_ids"]
    cached = next((tmp_path / "hf-home" / "hub").glob("models--team--panda-tiny/snapshots/*"))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha256(cached / name) == sha256(tune2 / name)
    no_xet(server)


def test_a_range_of_a_number_too_long_for_any_file_is_ignored():
    from deltakit_service.hubfiles import parse_range

    assert parse_range("bytes=" + "1" * 5000 + "-", 10) is None  # the whole file, as for any malformed range
    assert parse_range("bytes=2-5", 10) is not None


def test_what_the_store_imports_the_hub_serves_by_the_same_repo_id_rule():
    from deltakit.errors import UnsupportedInputError
    from deltakit.modelstore.catalog import check_store_repo_id
    from deltakit_service.routes.hub import HubRefusal, _repo_id

    for org, name in (("org", "_model"), ("team", "panda-7b"), ("a", "b.c")):
        assert _repo_id(org, name) == check_store_repo_id(f"{org}/{name}")
    for org, name in (("org", ".."), ("org", "a--b"), ("-x", "y")):
        with pytest.raises(UnsupportedInputError):
            check_store_repo_id(f"{org}/{name}")
        with pytest.raises(HubRefusal):
            _repo_id(org, name)
