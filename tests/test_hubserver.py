"""The fake Hub of ``hubserver.py``, exercised only through the real huggingface_hub client."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import FakeHub, configure_client, git_blob_sha1, set_offline

hf = pytest.importorskip("huggingface_hub")
hf_errors = pytest.importorskip("huggingface_hub.errors")
file_download = pytest.importorskip("huggingface_hub.file_download")

TOKEN = "hf_test"
REPO = "dandelion/panda-delta"
BIG = os.urandom(10 * 1024 * 1024 + 123)  # over the 10 MB LFS threshold


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The LFS path, whose protocol most tests here pin down; the Xet tests below turn Xet on."""
    with FakeHub(tmp_path / "hub", token=TOKEN) as server:
        configure_client(monkeypatch, server.endpoint, tmp_path / "hf-home", xet=False)
        yield server


@pytest.fixture
def xet_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub(tmp_path / "hub", token=TOKEN) as server:
        configure_client(monkeypatch, server.endpoint, tmp_path / "hf-home", xet=True)
        yield server


@pytest.fixture
def api(hub: FakeHub) -> hf.HfApi:
    return hf.HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def lfs_puts(hub: FakeHub) -> int:
    return sum(1 for method, path in hub.requests if method == "PUT" and path.startswith("/_fakehub/lfs/"))


def test_create_repo_info_and_privacy(hub, api, tmp_path):
    url = api.create_repo(REPO, exist_ok=True)
    assert url == f"{hub.endpoint}/{REPO}"
    assert api.create_repo(REPO, exist_ok=True) == url  # 409 + url, accepted by exist_ok
    with pytest.raises(hf_errors.HfHubHTTPError) as e:
        api.create_repo(REPO)
    assert e.value.response.status_code == 409

    assert api.repo_exists(REPO) and not api.repo_exists("dandelion/nope")
    info = api.model_info(REPO)
    assert info.sha == hub.head(REPO) and [s.rfilename for s in info.siblings] == [".gitattributes"]
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("dandelion/nope")

    api.create_repo("dandelion/secret", private=True)
    assert api.model_info("dandelion/secret").private is True
    anonymous = hf.HfApi(endpoint=hub.endpoint, token=False)
    assert not anonymous.repo_exists("dandelion/secret")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        anonymous.model_info("dandelion/secret")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        hf.hf_hub_download("dandelion/secret", ".gitattributes", cache_dir=tmp_path / "cache", token=False)
    assert anonymous.model_info(REPO).sha == info.sha  # public repos need no token


def test_repos_survive_a_restart_on_the_same_root(hub, api, tmp_path, cache):
    api.create_repo(REPO)
    api.create_commit(REPO, [hf.CommitOperationAdd("w.bin", b"w" * 10)], commit_message="w")
    head = hub.head(REPO)
    hub.stop()
    with FakeHub(tmp_path / "hub", token=TOKEN) as again:
        assert hf.HfApi(endpoint=again.endpoint, token=TOKEN).model_info(REPO).sha == head
        path = hf.hf_hub_download(REPO, "w.bin", endpoint=again.endpoint, cache_dir=cache)
        assert Path(path).read_bytes() == b"w" * 10


def test_upload_folder_then_download_round_trips(hub, api, cache, tmp_path):
    files = {"config.json": b'{"vocab_size": 1}\n', "weights.dat": BIG, "sub/notes.txt": b"hello\n"}
    folder = write_folder(tmp_path / "out", files)
    api.create_repo(REPO)
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="first upload")
    assert info.oid == hub.head(REPO)
    assert hub.commits(REPO)[0].title == "first upload"
    assert hub.lfs_uploads == 1 and hub.lfs_uploaded_oids == [hub.commits(REPO)[0].files["weights.dat"].sha256]

    assert api.list_repo_files(REPO) == [".gitattributes", "config.json", "sub/notes.txt", "weights.dat"]
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == dict.fromkeys([".gitattributes", "config.json", "weights.dat"], "RepoFile") | {"sub": "RepoFolder"}
    meta = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert meta["config.json"].lfs is None and meta["config.json"].blob_id == git_blob_sha1(files["config.json"])
    assert meta["weights.dat"].lfs is not None and meta["weights.dat"].lfs.size == len(BIG)

    snapshot = Path(hf.snapshot_download(REPO, cache_dir=cache))
    assert snapshot.name == info.oid
    for rel, data in files.items():
        assert (snapshot / rel).read_bytes() == data
    single = hf.hf_hub_download(REPO, "sub/notes.txt", cache_dir=tmp_path / "other-cache", token=TOKEN)
    assert Path(single).read_bytes() == b"hello\n"
    # the cache names blobs by ETag: the git blob sha1 for regular files, the sha256 for LFS files
    assert Path(single).resolve().name == git_blob_sha1(b"hello\n")
    assert (snapshot / "weights.dat").resolve().name == meta["weights.dat"].lfs.sha256


def test_client_defaults_follow_configure_client(hub, tmp_path):
    api = hf.HfApi(token=TOKEN)  # endpoint from the patched constants, cache from HF_HUB_CACHE
    api.create_repo("dandelion/data", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id="dandelion/data", repo_type="dataset"
    )
    path = Path(hf.hf_hub_download("dandelion/data", "data.csv", repo_type="dataset"))
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert path.is_relative_to(tmp_path / "hf-home" / "hub")


def test_revision_pinning_by_commit_sha(hub, api, cache):
    api.create_repo(REPO)
    ops = [hf.CommitOperationAdd("config.json", b"v1\n"), hf.CommitOperationAdd("model.safetensors", b"\0" * 64)]
    first = api.create_commit(REPO, ops, commit_message="v1").oid
    second = api.create_commit(REPO, [hf.CommitOperationAdd("config.json", b"v2\n")], commit_message="v2").oid
    assert first != second and hub.head(REPO) == second

    def config(revision: str | None) -> bytes:
        return Path(hf.hf_hub_download(REPO, "config.json", revision=revision, cache_dir=cache)).read_bytes()

    assert (config(first), config(second), config(None), config(first[:10])) == (b"v1\n", b"v2\n", b"v2\n", b"v1\n")
    pinned = Path(hf.snapshot_download(REPO, revision=first, cache_dir=cache))
    assert pinned.name == first and (pinned / "config.json").read_bytes() == b"v1\n"
    assert (pinned / "model.safetensors").read_bytes() == b"\0" * 64
    assert [c.commit_id for c in api.list_repo_commits(REPO)][:2] == [second, first]
    with pytest.raises(hf_errors.RevisionNotFoundError):
        hf.hf_hub_download(REPO, "config.json", revision="nope", cache_dir=cache)
    with pytest.raises(hf_errors.EntryNotFoundError):
        hf.hf_hub_download(REPO, "missing.txt", cache_dir=cache)


def test_second_upload_of_the_same_content_sends_nothing(hub, api, tmp_path):
    folder = write_folder(tmp_path / "out", {"config.json": b"{}\n", "weights.dat": BIG, "a.safetensors": b"x" * 100})
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    head, puts = hub.head(REPO), lfs_puts(hub)
    assert hub.lfs_uploads == 2 and puts == 2

    again = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert hub.lfs_uploads == 2 and lfs_puts(hub) == puts  # the batch API answered "already there"
    assert again.oid == head == hub.head(REPO)  # unchanged files are dropped: no empty commit either


def test_interrupted_upload_resumes_with_only_the_missing_objects(hub, api, tmp_path, cache):
    files = {f"model-{i}.safetensors": os.urandom(1000 + i) for i in range(4)} | {"config.json": b"{}\n"}
    folder = write_folder(tmp_path / "out", files)
    api.create_repo(REPO)
    before = hub.head(REPO)

    hub.fail_uploads_after(1)
    with pytest.raises(RuntimeError) as e:
        api.upload_folder(repo_id=REPO, folder_path=folder)
    assert isinstance(e.value.__cause__, hf_errors.HfHubHTTPError)
    assert e.value.__cause__.response.status_code == 507
    assert hub.lfs_uploads == 1 and hub.head(REPO) == before  # died midway: nothing committed

    hub.fail_uploads_after(None)
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert hub.lfs_uploads == 4 and len(set(hub.lfs_uploaded_oids)) == 4  # the first object was not sent again
    snapshot = Path(hf.snapshot_download(REPO, cache_dir=cache))
    assert all((snapshot / rel).read_bytes() == data for rel, data in files.items())


def test_branches_parent_commit_and_deletions(hub, api):
    api.create_repo(REPO)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    main = hub.head(REPO)
    dev = api.create_commit(
        REPO, [hf.CommitOperationAdd("a.txt", b"a")], commit_message="on dev", revision="dev", parent_commit=main
    ).oid
    assert hub.head(REPO, "dev") == dev and hub.head(REPO) == main
    assert api.list_repo_files(REPO, revision="dev") == [".gitattributes", "a.txt"]
    with pytest.raises(hf_errors.HfHubHTTPError) as e:
        api.create_commit(REPO, [hf.CommitOperationAdd("b.txt", b"b")], commit_message="stale", parent_commit=dev)
    assert e.value.response.status_code == 412
    api.create_commit(REPO, [hf.CommitOperationDelete("a.txt")], commit_message="rm", revision="dev")
    assert api.list_repo_files(REPO, revision="dev") == [".gitattributes"]
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "dev"}


def test_offline_mode_serves_from_the_cache(hub, api, cache, monkeypatch, tmp_path):
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "out", {"c.json": b"{}", "w.bin": b"w" * 9}))
    online = Path(hf.snapshot_download(REPO, cache_dir=cache))
    single = hf.hf_hub_download(REPO, "c.json", cache_dir=cache)
    served = len(hub.requests)

    set_offline(monkeypatch)
    assert Path(hf.snapshot_download(REPO, cache_dir=cache)) == online
    assert hf.hf_hub_download(REPO, "c.json", cache_dir=cache) == single
    assert (online / "w.bin").read_bytes() == b"w" * 9
    with pytest.raises(hf_errors.LocalEntryNotFoundError):
        hf.snapshot_download(REPO, cache_dir=tmp_path / "empty-cache")
    with pytest.raises(hf_errors.OfflineModeIsEnabled):
        api.model_info(REPO)
    assert len(hub.requests) == served  # not a single request reached the server


def test_writes_need_the_token(hub, api):
    api.create_repo(REPO)
    head = hub.head(REPO)
    op = [hf.CommitOperationAdd("a.txt", b"a")]
    for token in (False, "hf_wrong"):
        other = hf.HfApi(endpoint=hub.endpoint, token=token)
        with pytest.raises(hf_errors.HfHubHTTPError) as e:
            other.create_commit(REPO, op, commit_message="nope")
        assert e.value.response.status_code == 401
        with pytest.raises(hf_errors.HfHubHTTPError) as e:
            other.create_repo("dandelion/other")
        assert e.value.response.status_code == 401
    assert hub.head(REPO) == head and not api.repo_exists("dandelion/other")


def test_tampered_content_keeps_the_recorded_headers(hub, api, cache):
    api.create_repo(REPO)
    api.create_commit(REPO, [hf.CommitOperationAdd("model.safetensors", b"good" * 8)], commit_message="w")
    recorded = hub.commits(REPO)[0].files["model.safetensors"]
    hub.tamper(REPO, "model.safetensors", b"evil" * 8)
    path = Path(hf.hf_hub_download(REPO, "model.safetensors", cache_dir=cache))
    assert path.read_bytes() == b"evil" * 8  # the client only checks sizes: corruption gets through
    assert path.resolve().name == recorded.sha256 and hub.read(REPO, "model.safetensors") == b"good" * 8
    meta = hf.get_hf_file_metadata(hf.hf_hub_url(REPO, "model.safetensors", endpoint=hub.endpoint))
    assert (meta.etag, meta.size, meta.commit_hash) == (recorded.sha256, 32, hub.head(REPO))


def test_range_requests_resume_a_download(hub, api):
    api.create_repo(REPO)
    api.create_commit(REPO, [hf.CommitOperationAdd("w.bin", bytes(range(200)))], commit_message="w")
    url = hf.hf_hub_url(REPO, "w.bin", endpoint=hub.endpoint)
    out = io.BytesIO(bytes(range(50)))
    out.seek(50)
    file_download.http_get(url, out, resume_size=50, expected_size=200)
    assert out.getvalue() == bytes(range(200))


def test_the_unmodified_xet_client_uploads_and_downloads_byte_for_byte(xet_hub, tmp_path, cache, monkeypatch):
    """upload_folder through hf_xet (no LFS object at all), every hash checked by the CAS; then downloads
    through Xet, through the plain resolve URL with Xet off, and after the server restarts."""
    from huggingface_hub import constants

    api = hf.HfApi(endpoint=xet_hub.endpoint, token=TOKEN)
    mixed = os.urandom(300_000) + b"compressible text " * 50_000 + BIG[:2_000_000]
    files = {"config.json": b'{"vocab_size": 1}\n', "weights.dat": BIG, "mixed.bin": mixed}
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=write_folder(tmp_path / "out", files), commit_message="xet")
    assert xet_hub.lfs_uploads == 0 and xet_hub.xet.bytes_received > 0
    tree = {f.path: f for f in api.list_repo_tree(REPO) if isinstance(f, hf.hf_api.RepoFile)}
    assert tree["weights.dat"].xet_hash and tree["config.json"].xet_hash is None  # small text stays regular
    for name, data in files.items():
        assert Path(hf.hf_hub_download(REPO, name, endpoint=xet_hub.endpoint, cache_dir=cache)).read_bytes() == data
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    path = hf.hf_hub_download(REPO, "mixed.bin", endpoint=xet_hub.endpoint, cache_dir=tmp_path / "plain")
    assert Path(path).read_bytes() == mixed
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    xet_hub.stop()
    with FakeHub(tmp_path / "hub", token=TOKEN) as again:  # Xet storage is kept on disk too
        path = hf.hf_hub_download(REPO, "weights.dat", endpoint=again.endpoint, cache_dir=tmp_path / "after")
        assert Path(path).read_bytes() == BIG


def test_xet_sends_only_what_storage_lacks(xet_hub, tmp_path):
    api = hf.HfApi(endpoint=xet_hub.endpoint, token=TOKEN)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=BIG, path_in_repo="a.bin", repo_id=REPO)
    first = xet_hub.xet.bytes_received
    assert first > len(BIG) * 0.9  # random bytes: all of it goes up once
    changed = BIG[:5_000_000] + os.urandom(64 << 10) + BIG[5_000_000:]
    api.upload_file(path_or_fileobj=changed, path_in_repo="b.bin", repo_id=REPO)
    assert xet_hub.xet.bytes_received - first < 1_000_000, "a file sharing most of its bytes sends little"


def test_a_shard_that_lies_about_its_hashes_is_refused():
    from xetcas import XetError, XetStore

    store = XetStore()
    body = bytes([0, 3, 0, 0, 0, 3, 0, 0]) + b"abc"
    store.put_xorb("0" * 64, body)
    tag = b"HFRepoMetaData\x00" + bytes(
        [85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
    )
    record = lambda h, *fields: h + b"".join(f.to_bytes(4, "little") for f in fields).ljust(16, b"\0")  # noqa: E731
    shard = tag + (2).to_bytes(8, "little") + bytes(8)
    shard += record(b"\xff" * 32, 0, 0)  # no files
    shard += record(bytes(32), 0, 1, 3, 0) + record(b"\x11" * 32, 0, 3)  # the xorb "000..." with a wrong chunk hash
    shard += record(b"\xff" * 32, 0, 0)
    with pytest.raises(XetError, match="does not hash to what the shard says"):
        store.put_shard(shard)


CARD_CASES = [
    ("---\nlicense: mit\nbase_model: org/base\nbase_model_relation: finetune\n---\n# x\n", [], []),
    ("# no front matter\n", [], ["Empty metadata"]),
    ("---\nlicense: mit-0\n---\n", ['"license" must be one of ['], []),
    ("---\nlicense: [mit, nope]\n---\n", ['"license[1]" must be one of ['], []),
    ("---\nlicense: other\n---\n", [], ['"license_name" should be set']),
    ("---\nbase_model: ./llama-7b\n---\n", ['"base_model" with value "./llama-7b" is not a valid repo id'], []),
    ("---\nbase_model: org/b\nbase_model_relation: fork\n---\n", ['"base_model_relation" must be one of'], []),
    ("---\nbase_model_relation: finetune\n---\n", ['"base_model_relation" needs "base_model"'], []),
    ("---\ndatasets: [ok/data, a b]\n---\n", ['"datasets[1]" with value "a b" is not a valid repo id'], []),
    ("---\nlanguage: {en: 1}\n---\n", ['"language" must be a string or an array of strings'], []),
    ("---\nmodel-index: [{name: m, results: [{task: {}}]}]\n---\n", ['"model-index[0].results[0].task.type"'], []),
    ("---\n- a list\n---\n", ['"value" must be of type object'], []),
    ("---\nlicense: [unclosed\n---\n", ["YAML metadata could not be parsed"], []),
]


@pytest.mark.parametrize(("card", "errors", "warnings"), CARD_CASES)
def test_validate_yaml_follows_the_hubs_documented_rules(hub, api, card, errors, warnings):
    """The answer the client reads: 400 with the errors (``_validate_yaml`` raises ValueError with them),
    200 with warnings (it warns)."""
    import warnings as warnings_module

    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        if errors:
            with pytest.raises(ValueError, match=r"Invalid metadata in README\.md") as e:
                api._validate_yaml(card)
            for expected in errors:
                assert expected in str(e.value)
        else:
            api._validate_yaml(card)
    said = " ".join(str(w.message) for w in caught)
    for expected in warnings:
        assert expected in said
    if not warnings:
        assert "validating metadata" not in said


def test_a_commit_whose_card_the_hub_refuses_does_not_land(hub, api, monkeypatch):
    """The Hub checks a pushed README.md itself, whatever the client checked before."""
    api.create_repo(REPO)
    head = hub.head(REPO)
    monkeypatch.setattr(api, "_validate_yaml", lambda *a, **k: None)  # a client that does not ask first
    with pytest.raises(hf_errors.HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"---\nlicense: mit-0\n---\n", path_in_repo="README.md", repo_id=REPO)
    assert e.value.response.status_code == 400 and '"license" must be one of' in str(e.value)
    assert hub.head(REPO) == head
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n", path_in_repo="README.md", repo_id=REPO)
    assert hub.head(REPO) != head
