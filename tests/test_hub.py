"""Publishing and fetching deltas: the model card, and round trips through a local Hub server."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, write_checkpoint

from deltakit import (
    HubError,
    IntegrityError,
    UnsupportedInputError,
    load_manifest,
    make_delta,
    verify_delta,
    verify_model,
)
from deltakit.hub import CardMetadata, fetch_delta, is_repo_spec, model_card, parse_repo_spec, publish_delta

CARD = CardMetadata(base_model="huggyllama/llama-7b", license="apache-2.0")
CARD_FLAGS = ("--base-model", "huggyllama/llama-7b", "--license", "apache-2.0")


@pytest.fixture
def delta(tmp_path):
    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(tmp_path / "panda-7b", finetune_of(base, extra_vocab=3), files={"config.json": "{}"})
    report = make_delta(base_dir, target_dir, tmp_path / "panda-7b-delta")
    return base_dir, tmp_path / "panda-7b-delta", report.manifest


def test_model_card_carries_the_metadata_and_the_rebuild_command(delta):
    from huggingface_hub import ModelCard

    _, _, manifest = delta
    metadata = CardMetadata(
        base_model="huggyllama/llama-7b",
        license="other",
        license_name="llama-license",
        license_link="https://huggingface.co/huggyllama/llama-7b/blob/main/LICENSE",
        language=("en", "zh"),
        datasets=("BelleGroup/train_0.5M_CN",),
    )
    text = model_card(manifest, "dandelion/panda-7b-delta", metadata, config={"architectures": ["LlamaForCausalLM"]})
    card = ModelCard(text)
    assert card.data.base_model == "huggyllama/llama-7b"
    assert card.data.base_model_relation == "finetune"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "deltakit"
    assert (card.data.license, card.data.license_name) == ("other", "llama-license")
    assert card.data.license_link.endswith("/LICENSE")
    assert card.data.language == ["en", "zh"] and card.data.datasets == ["BelleGroup/train_0.5M_CN"]
    assert card.data.tags == ["deltakit", "delta"]
    assert card.text.lstrip().startswith("# panda-7b-delta\n")  # the repo's name, not a folder's
    assert "pip install deltakit-llm\n" in text and "pip install deltakit\n" not in text
    assert "deltakit apply --base huggyllama/llama-7b --delta dandelion/panda-7b-delta --out panda-7b" in text
    assert f"```\n{manifest.base.fingerprint}\n```" in text  # a block of its own, not a long line
    assert "| `rows` | 2 |" in text and "| `copy` |" in text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"base_model": "base"}, None),  # a canonical model id without an org is a Hub id too
        ({"base_model": "/models/llama-7b"}, "base_model '/models/llama-7b' is not a Hub repo id"),
        ({"base_model": "a/b/c"}, "is not a Hub repo id"),
        ({"base_model": "org/llama", "license": "other"}, "license 'other' needs a license_name"),
        ({"base_model": "org/llama", "license": "other", "license_name": "x"}, "and a license_link"),
        ({"base_model": "org/llama", "license": "Apache 2"}, "not a Hub license id"),
        ({"base_model": "org/llama", "license": "mit", "language": ("English",)}, "not an ISO 639 code"),
        ({"base_model": "org/llama", "license": "mit", "datasets": ("a b",)}, "dataset 'a b' is not a Hub repo id"),
    ],
)
def test_card_metadata_the_hub_would_refuse_is_refused_before_anything_is_sent(fields, message):
    from deltakit import UnsupportedInputError

    if message is None:
        CardMetadata(**{"license": "mit", **fields})
        return
    with pytest.raises(UnsupportedInputError, match=message):
        CardMetadata(**fields)


@pytest.mark.parametrize(
    ("fields", "argument"),
    [
        ({"base_model": "a/b/c"}, "base_model"),
        ({"base_model": "org/llama", "license": "other"}, "license_name"),
        ({"base_model": "org/llama", "license": "other", "license_name": "x"}, "license_link"),
        ({"base_model": "org/llama", "license": "mit", "license_name": "Llama License"}, "license_name"),
        ({"base_model": "org/llama", "license": "Apache 2"}, "license"),
        ({"base_model": "org/llama", "license": "mit", "language": ("English",)}, "language"),
        ({"base_model": "org/llama", "license": "mit", "datasets": ("a b",)}, "datasets"),
    ],
)
def test_card_metadata_errors_state_facts_and_name_the_field(fields, argument):
    """The CLI turns ``argument`` into its flag; the message itself names no flag."""
    from deltakit import UnsupportedInputError

    with pytest.raises(UnsupportedInputError) as caught:
        CardMetadata(**fields)
    assert caught.value.argument == argument
    assert "--" not in str(caught.value), str(caught.value)


def test_the_card_base_model_comes_from_the_flag_the_base_name_or_the_registry(tmp_path, delta, hub, monkeypatch):
    from huggingface_hub import ModelCard
    from test_cli import deltakit_cli

    from deltakit.registry import Registry

    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    base_dir, delta_dir, _ = delta
    refused = deltakit_cli("publish", delta_dir, "--repo", "org/p", "--license", "mit")
    assert refused.returncode == 1 and "pass --base-model ORG/NAME" in refused.stderr, refused.stderr
    assert "--hub-id" in refused.stderr
    Registry(tmp_path / "home").add("llama-7b", base_dir, hub_id="huggyllama/llama-7b")
    done = deltakit_cli("publish", delta_dir, "--repo", "org/p", "--license", "mit", "-q")
    assert done.returncode == 0, done.stderr
    assert ModelCard(hub.read("org/p", "README.md").decode()).data.base_model == "huggyllama/llama-7b"
    listed = deltakit_cli("registry", "list", "--json")
    assert '"hub_id": "huggyllama/llama-7b"' in listed.stdout


def test_repo_specs():
    assert parse_repo_spec("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_spec("org/name") == ("org/name", None)
    assert is_repo_spec("org/name") and not is_repo_spec("name") and not is_repo_spec("/abs/path")


def test_dry_run_lists_what_would_be_uploaded_and_sends_nothing(delta):
    _, delta_dir, manifest = delta
    report = publish_delta(delta_dir, "org/panda-7b-delta", dry_run=True, endpoint="http://127.0.0.1:9", metadata=CARD)
    names = [name for name, _ in report.files]
    assert names[:2] == ["README.md", "deltakit.json"]
    assert set(manifest.payload) <= set(names) and "files/config.json" in names
    assert report.commit is None and report.dry_run


# --- round trips through a local Hub server, with the real huggingface_hub client --------------------


@pytest.fixture(params=["xet", "lfs"])
def hub(tmp_path, monkeypatch, request):
    """The test Hub, reached with Xet on (the default, as users have hf_xet) and with it off."""
    from hubserver import FakeHub, configure_client

    with FakeHub(tmp_path / "hub-storage", token="hf_test") as server:  # the Hub's own LFS rules
        xet = request.param == "xet"
        configure_client(monkeypatch, server.endpoint, tmp_path / "hf-home", token="hf_test", xet=xet)
        server.xet_on = xet
        yield server


def test_publish_fetch_apply_round_trip_is_byte_exact(tmp_path, delta, hub):
    from huggingface_hub import ModelCard
    from test_cli import deltakit_cli

    base_dir, delta_dir, manifest = delta
    report = publish_delta(delta_dir, "dandelion/panda-7b-delta", metadata=CARD)
    assert report.commit and not report.dry_run
    card = ModelCard(hub.read("dandelion/panda-7b-delta", "README.md").decode())
    assert card.data.library_name == "deltakit" and card.data.base_model == "huggyllama/llama-7b"
    if hub.xet_on:  # through the real hf_xet client: every payload file reached Xet storage, hashes checked
        assert {f.sha256 for f in hub.xet.files.values()} >= {r.sha256 for r in manifest.payload.values()}
        assert hub.lfs_uploads == 0
    else:
        assert hub.lfs_uploads >= len(manifest.payload)

    result = deltakit_cli(
        "apply", "--base", base_dir, "--delta", "dandelion/panda-7b-delta", "--out", tmp_path / "out", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert "fetched dandelion/panda-7b-delta at main" in result.stdout
    assert verify_model(tmp_path / "out", delta_dir).ok
    assert_same_tensors(load_checkpoint(tmp_path / "out"), load_checkpoint(tmp_path / "panda-7b"))


def test_an_interrupted_publish_resumes_without_sending_again(tmp_path, hub):
    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama", base)
    target_dir = write_checkpoint(tmp_path / "panda", finetune_of(base))
    make_delta(base_dir, target_dir, tmp_path / "d", shard_size=3000)  # several payload files
    assert len(load_manifest(tmp_path / "d").payload) >= 3

    hub.fail_uploads_after(1)  # LFS: one object arrives; Xet: the xorb arrives, its shard does not
    with pytest.raises(HubError, match="run the same command again"):
        publish_delta(tmp_path / "d", "org/d", metadata=CARD)
    assert not hub.commits("org/d")[0].files.get("deltakit.json"), "nothing was committed"
    assert hub.lfs_uploads == (0 if hub.xet_on else 1)
    hub.fail_uploads_after(None)
    publish_delta(tmp_path / "d", "org/d", metadata=CARD)
    sent, received = list(hub.lfs_uploaded_oids), hub.xet.bytes_received
    assert len(sent) == len(set(sent)), "the object that arrived the first time is not sent again"
    assert hub.read("org/d", "deltakit.json") == (tmp_path / "d" / "deltakit.json").read_bytes()
    publish_delta(tmp_path / "d", "org/d", metadata=CARD)
    assert hub.lfs_uploaded_oids == sent, "publishing the same package again sends nothing"
    assert hub.xet.bytes_received == received


def test_fetch_pins_revisions_works_offline_and_refuses_tampered_files(tmp_path, delta, hub, monkeypatch):
    from hubserver import set_offline

    _, delta_dir, manifest = delta
    first = publish_delta(delta_dir, "org/panda", metadata=CARD)
    pinned = fetch_delta(f"org/panda@{first.commit}", cache_dir=tmp_path / "cache")
    assert pinned.commit == first.commit and pinned.revision == first.commit
    latest = fetch_delta("org/panda", cache_dir=tmp_path / "cache")
    assert latest.commit == first.commit and latest.revision == "main"

    set_offline(monkeypatch, True)
    served = len(hub.requests)
    again = fetch_delta("org/panda", cache_dir=tmp_path / "cache")
    assert again.path == pinned.path and len(hub.requests) == served, "offline: served from the cache"
    with pytest.raises(HubError, match="not in the local Hub cache"):
        fetch_delta("org/panda", cache_dir=tmp_path / "empty-cache")
    set_offline(monkeypatch, False)

    payload = next(iter(manifest.payload))
    original = hub.read("org/panda", payload)
    hub.tamper("org/panda", payload, bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        fetch_delta("org/panda", cache_dir=tmp_path / "fresh-cache")


def test_publish_refuses_a_package_that_does_not_verify_and_needs_a_token(tmp_path, delta, hub, monkeypatch):
    _, delta_dir, manifest = delta
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="401"):
        publish_delta(delta_dir, "org/no-token", token=False, metadata=CARD)
    payload = delta_dir / next(iter(manifest.payload))
    data = bytearray(payload.read_bytes())
    data[-1] ^= 1
    payload.write_bytes(bytes(data))
    before = len(hub.requests)
    with pytest.raises(IntegrityError, match="does not verify"):
        publish_delta(delta_dir, "org/panda", token="hf_test", metadata=CARD)
    assert len(hub.requests) == before, "nothing is sent for a package that does not verify"


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("DELTAKIT_CONTRACT_REPO")),
    reason="contract test against the real Hub: set HF_TOKEN and DELTAKIT_CONTRACT_REPO (a scratch repo)",
)
def test_contract_with_the_real_hub(tmp_path, delta):
    _, delta_dir, _ = delta
    repo = os.environ["DELTAKIT_CONTRACT_REPO"]
    report = publish_delta(delta_dir, repo, private=True, metadata=CARD)
    fetched = fetch_delta(f"{repo}@{report.commit}", cache_dir=tmp_path / "cache")
    assert fetched.commit == report.commit


def test_release_makes_verifies_and_publishes_in_one_step(tmp_path, hub, monkeypatch):
    from test_cli import deltakit_cli

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where release builds a package it is not told to keep
    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(tmp_path / "panda-7b", finetune_of(base, extra_vocab=2))
    dry = deltakit_cli(
        "release", "--base", base_dir, "--target", target_dir, "--repo", "org/panda", *CARD_FLAGS, "--dry-run", "-q"
    )
    assert dry.returncode == 0, dry.stderr
    assert "would upload" in dry.stdout and "OK:" in dry.stdout
    assert ("POST", "/api/repos/create") not in hub.requests, "a dry run sends nothing"
    assert list(scratch.iterdir()) == [], "and leaves nothing behind"
    done = deltakit_cli(
        "release",
        "--base",
        base_dir,
        "--target",
        target_dir,
        "--repo",
        "org/panda",
        *CARD_FLAGS,
        "--out",
        tmp_path / "d",
        "-q",
    )
    assert done.returncode == 0, done.stderr
    assert "uploaded" in done.stdout and "commit " in done.stdout
    assert hub.read("org/panda", "deltakit.json") == (tmp_path / "d" / "deltakit.json").read_bytes()


def test_release_whose_reader_goes_away_still_finishes_and_says_so_by_its_status(tmp_path, hub):
    """``deltakit release ... | head -1``: stdout closes early; the release must still be made (exit 0),
    never abandoned half-way with exit 0."""
    import shutil
    import subprocess
    import sys

    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(tmp_path / "panda-7b", finetune_of(base, extra_vocab=2))
    exe = shutil.which("deltakit", path=str(Path(sys.executable).parent)) or "deltakit"
    command = [exe, "release", "--base", base_dir, "--target", target_dir, "--repo", "org/piped", *CARD_FLAGS, "-q"]
    child = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the first line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 0, stderr
    assert hub.read("org/piped", "deltakit.json")  # the release was made


def test_a_bad_cached_copy_is_downloaded_again_and_private_is_not_silently_public(tmp_path, delta, hub):
    _, delta_dir, manifest = delta
    publish_delta(delta_dir, "org/panda", metadata=CARD)
    payload = next(iter(manifest.payload))
    original = hub.read("org/panda", payload)
    hub.tamper("org/panda", payload, bytes([original[0] ^ 1]) + original[1:])
    with pytest.raises(IntegrityError, match=rf"does not match its manifest .*removed from the cache: {payload}$"):
        fetch_delta("org/panda", cache_dir=tmp_path / "cache")
    cached = _cached_files(tmp_path / "cache")
    assert not [n for n in cached if n.endswith(payload)], "the refused copy is not left in the cache"
    assert manifest.payload[payload].size not in cached.values(), "nor its blob"
    hub.tamper("org/panda", payload, original)  # the Hub serves the right bytes again
    assert fetch_delta("org/panda", cache_dir=tmp_path / "cache").commit
    with pytest.raises(HubError, match="exists and is public"):
        publish_delta(delta_dir, "org/panda", private=True, metadata=CARD)


def test_fetch_downloads_only_what_the_manifest_lists(tmp_path, delta, hub):
    from huggingface_hub import HfApi

    _, delta_dir, _ = delta
    publish_delta(delta_dir, "org/panda", metadata=CARD)
    HfApi().upload_file(path_or_fileobj=b"x" * 5000, path_in_repo="extra/unrelated.bin", repo_id="org/panda")
    fetched = fetch_delta("org/panda", cache_dir=tmp_path / "cache")
    assert (fetched.path / "deltakit.json").is_file()
    assert not (fetched.path / "extra").exists(), "files the manifest does not list are not downloaded"
    hub.seed("org/not-a-delta", {"config.json": b"{}"})
    with pytest.raises(HubError, match=r"holds no deltakit\.json"):
        fetch_delta("org/not-a-delta", cache_dir=tmp_path / "cache")


def test_a_base_can_come_from_the_hub_too(tmp_path, delta, hub):
    from huggingface_hub import HfApi
    from test_cli import deltakit_cli

    base_dir, delta_dir, _ = delta
    torch.save({"x": torch.ones(1)}, base_dir / "pytorch_model.bin")  # a second format: not downloaded
    HfApi().create_repo("org/llama-7b")
    HfApi().upload_folder(folder_path=str(base_dir), repo_id="org/llama-7b")
    result = deltakit_cli("apply", "--base", "org/llama-7b", "--delta", delta_dir, "--out", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "fetched org/llama-7b at main" in result.stdout
    assert verify_model(tmp_path / "out", delta_dir).ok
    snapshots = list((tmp_path / "hf-home").rglob("pytorch_model.bin"))
    assert snapshots == [], "the .bin copy beside the safetensors is not downloaded"


def test_no_connection_is_one_hub_error_and_a_mistyped_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    import importlib

    from test_cli import deltakit_cli

    from deltakit.hub.fetch import _fetch_errors

    client = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    with pytest.raises(HubError, match="org/name: the Hub cannot be reached"), _fetch_errors("org/name"):
        raise client.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were it looked up, it would not be found there
    (tmp_path / "pair").mkdir()
    typo = deltakit_cli("apply", "--base", "pair/bsae", "--delta", "pair/delta", "--out", "o", "-q", cwd=tmp_path)
    assert typo.returncode == 1
    assert typo.stderr.strip() == (
        "deltakit: error: pair/bsae: no such file or folder (a folder pair/ is here, so it is not looked up as a "
        "Hub repo id)"
    )


def test_republishing_sends_only_what_changed_and_drops_stale_shards(tmp_path, make_pair, hub):
    """An unchanged package makes no commit; one with fewer payload shards deletes the old ones in the
    same commit; a tag pins the published commit."""
    from test_cli import deltakit_cli

    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=2))
    make_delta(base_dir, target_dir, tmp_path / "two", shard_size=1 << 10)  # tiny shards: several files
    make_delta(base_dir, target_dir, tmp_path / "one")
    first = publish_delta(tmp_path / "two", "org/p", metadata=CARD, tag="v1.0")
    shards = [n for n, _ in first.files if n.startswith("delta-")]
    assert len(shards) > 1 and first.tag == "v1.0" and hub.read("org/p", "deltakit.json", revision="v1.0")
    commits = len(hub.commits("org/p"))

    again = publish_delta(tmp_path / "two", "org/p", metadata=CARD)
    assert not again.changed and again.commit is None and again.head == first.commit
    assert len(hub.commits("org/p")) == commits, "nothing changed, so no commit"
    result = deltakit_cli("publish", tmp_path / "two", "--repo", "org/p", *CARD_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "nothing changed: org/p@main already holds this package" in result.stdout
    assert "No files have been modified" not in result.stderr

    fewer = publish_delta(tmp_path / "one", "org/p", metadata=CARD)
    assert set(fewer.deleted) == set(shards) and "delta-00001-of-00001.safetensors" in fewer.uploaded
    assert len(hub.commits("org/p")) == commits + 1, "uploads and deletions in one commit"
    from huggingface_hub import HfApi

    remaining = HfApi(endpoint=hub.endpoint).list_repo_files("org/p")
    assert [n for n in remaining if n.startswith("delta-")] == ["delta-00001-of-00001.safetensors"]
    assert hub.read("org/p", shards[0], revision="v1.0")  # the tagged release still holds them


def test_publish_can_open_a_pull_request_and_names_refusals(tmp_path, delta, hub):
    _, delta_dir, _ = delta
    publish_delta(delta_dir, "org/p", metadata=CARD)
    other = CardMetadata(base_model="huggyllama/llama-7b", license="mit")
    opened = publish_delta(delta_dir, "org/p", metadata=other, create_pr=True)
    assert opened.pull_request and opened.pull_request.endswith("/discussions/1")
    assert opened.uploaded == ("README.md",)
    assert b"license: mit" not in hub.read("org/p", "README.md")  # main is untouched
    assert b"license: mit" in hub.read("org/p", "README.md", revision="refs/pr/1")
    with pytest.raises(HubError, match=r"log in with `hf auth login` or set HF_TOKEN"):
        publish_delta(delta_dir, "org/q", metadata=CARD, token="hf_wrong")


def test_scripts_get_one_json_object_from_each_command(tmp_path, hub):
    """make, apply, convert, release, publish and download with --json: stdout is one JSON object with
    what a CI step needs; the human report and progress go to stderr."""
    import json

    from test_cli import deltakit_cli

    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(tmp_path / "panda-7b", finetune_of(base, extra_vocab=2))

    def run(*args):
        result = deltakit_cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # the whole of stdout is one object

    made = run("make", "--base", base_dir, "--target", target_dir, "--out", tmp_path / "d")
    assert made["command"] == "make" and made["out"] == str(tmp_path / "d") and made["format"] == 2
    assert len(made["base"]["fingerprint"]) == 64 and made["payload_files"]
    released = run("release", "--base", base_dir, "--target", target_dir, "--repo", "org/p", *CARD_FLAGS, "--tag", "v1")
    assert released["verify"]["ok"] and released["publish"]["commit"] and released["publish"]["tag"] == "v1"
    assert released["make"]["target"]["fingerprint"] == made["target"]["fingerprint"]
    again = run("publish", tmp_path / "d", "--repo", "org/p", *CARD_FLAGS)
    assert again["changed"] is False and again["head"] == released["publish"]["commit"]
    fetched = run("download", "org/p@v1", "--cache-dir", tmp_path / "cache")
    assert fetched["commit"] == released["publish"]["commit"] and fetched["revision"] == "v1"
    assert fetched["target"]["fingerprint"] == made["target"]["fingerprint"]
    applied = run("apply", "--base", base_dir, "--delta", tmp_path / "d", "--out", tmp_path / "out")
    assert applied["fingerprint"] == made["target"]["fingerprint"] and applied["verified"] is True
    converted = run("convert", tmp_path / "out", "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert converted["command"] == "convert" and converted["out"] == str(tmp_path / "bf16")


def test_inspect_takes_a_hub_id(tmp_path, delta, hub):
    from test_cli import deltakit_cli

    _, delta_dir, manifest = delta
    publish_delta(delta_dir, "org/p", metadata=CARD)
    result = deltakit_cli("inspect", "org/p")
    assert result.returncode == 0, result.stderr
    assert "fetched org/p" in result.stdout and manifest.target.fingerprint in result.stdout


def test_the_hub_sees_an_ordinary_model_repo_with_the_card_metadata(tmp_path, delta, hub):
    """Small text files stay regular files, as on the Hub; model_info reads the card as the Hub does."""
    from huggingface_hub import HfApi

    _, delta_dir, manifest = delta
    metadata = CardMetadata(base_model="huggyllama/llama-7b", license="apache-2.0", language=("zh",))
    publish_delta(delta_dir, "org/p", metadata=metadata)
    api = HfApi(endpoint=hub.endpoint)
    files = {f.path: f for f in api.list_repo_tree("org/p", recursive=True) if hasattr(f, "lfs")}
    assert files["README.md"].lfs is None and files["deltakit.json"].lfs is None
    assert all(files[name].lfs is not None for name in manifest.payload)
    info = api.model_info("org/p")
    assert info.library_name == "deltakit"
    assert info.card_data is not None and info.card_data.base_model == "huggyllama/llama-7b"
    assert info.card_data.base_model_relation == "finetune"
    assert {"deltakit", "delta", "license:apache-2.0", "base_model:finetune:huggyllama/llama-7b"} <= set(info.tags)


def test_the_card_passes_the_hubs_metadata_check_and_one_it_refuses_leaves_no_repo(tmp_path, delta, hub):
    """huggingface_hub's checks: ``ModelCard.validate`` (the Hub's validate-yaml) accepts the card publish
    writes, for a Hub license and for ``other``; a license id the Hub does not know is refused with the Hub's
    own message before a repo is made or a byte sent."""
    from huggingface_hub import HfApi, ModelCard

    _, delta_dir, manifest = delta
    for metadata in (
        CardMetadata(base_model="huggyllama/llama-7b", license="llama2", language=("en",), datasets=("org/data",)),
        CardMetadata(base_model="huggyllama/llama-7b", license="other", license_name="llama-license", license_link="L"),
    ):
        ModelCard(model_card(manifest, "org/p", metadata)).validate()
    wrong = CardMetadata(base_model="huggyllama/llama-7b", license="llama-2")
    with pytest.raises(ValueError, match='"license" must be one of'):
        ModelCard(model_card(manifest, "org/p", wrong)).validate()
    with pytest.raises(HubError, match=r'refused the model card for org/q: "license" must be one of .*nothing was'):
        publish_delta(delta_dir, "org/q", metadata=wrong)
    assert not [path for _, path in hub.requests if "org/q" in path or "/_fakehub/" in path]
    assert not HfApi(endpoint=hub.endpoint).repo_exists("org/q")


def test_large_payloads_go_up_in_parts_and_a_429_is_waited_out(tmp_path, make_pair, monkeypatch):
    from hubserver import FakeHub, configure_client

    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=2))
    make_delta(base_dir, target_dir, tmp_path / "d", format=1)  # raw payload: 10 KB, three 4 KB parts
    with FakeHub(tmp_path / "hub", token="hf_test", multipart_threshold=1 << 12, part_size=1 << 12) as hub:
        configure_client(monkeypatch, hub.endpoint, tmp_path / "hf-home", token="hf_test", xet=False)  # LFS parts
        hub.throttle("/preupload/", times=1, retry_after=1)
        report = publish_delta(tmp_path / "d", "org/p", metadata=CARD)
        assert report.commit and hub.multipart_uploads >= 1
        assert [p for m, p in hub.requests if "/preupload/" in p].__len__() == 2  # refused once, then retried
        fetched = fetch_delta("org/p", cache_dir=tmp_path / "cache")
        for name in load_manifest(tmp_path / "d").payload:
            assert (fetched.path / name).read_bytes() == (tmp_path / "d" / name).read_bytes()


def test_the_stock_hf_cli_sees_an_ordinary_model_repo(tmp_path, delta, hub):
    """What a user of the hf command sees of a published delta: it downloads into the ordinary cache (through
    Xet when it is on), the cache lists and verifies it, the model's info and card carry the metadata, and
    deltakit applies what hf downloaded, offline."""
    import shutil
    import subprocess
    import sys

    from test_cli import deltakit_cli

    base_dir, delta_dir, manifest = delta
    publish_delta(delta_dir, "org/panda-delta", metadata=CARD, tag="v1.0")
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    assert hf is not None
    cache = tmp_path / "hf-cache"

    def run(*args):
        result = subprocess.run([hf, *map(str, args)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    folder = Path(run("download", "org/panda-delta", "--revision", "v1.0", "--cache-dir", cache, "--quiet").strip())
    assert (folder / "deltakit.json").read_bytes() == (delta_dir / "deltakit.json").read_bytes()
    for name in manifest.payload:
        assert (folder / name).read_bytes() == (delta_dir / name).read_bytes()
    assert "org/panda-delta" in run("cache", "ls", "--cache-dir", cache)
    run("cache", "verify", "org/panda-delta", "--revision", "v1.0", "--cache-dir", cache)
    info = run("models", "info", "org/panda-delta")
    assert "deltakit" in info and "huggyllama/llama-7b" in info
    assert "base_model_relation: finetune" in run("models", "card", "org/panda-delta")

    offline = deltakit_cli("apply", "--base", base_dir, "--delta", folder, "--out", tmp_path / "out", "-q")
    assert offline.returncode == 0, offline.stderr
    assert verify_model(tmp_path / "out", delta_dir).ok


# --- what a download fetches, and what it refuses before fetching (issue 20, items 7, 8, 9, 16) --------


def _downloads(hub, repo_id: str) -> list[str]:
    """The files of ``repo_id`` the client asked the Hub for, by ``GET .../resolve/...``, the manifest apart."""
    from urllib.parse import unquote

    prefix = f"/{repo_id}/resolve/"
    names = [unquote(p[len(prefix) :]).split("/", 1)[1] for m, p in hub.requests if m == "GET" and p.startswith(prefix)]
    return [n for n in names if n != "deltakit.json"]


def _cached_files(cache: Path) -> dict[str, int]:
    """Every regular file under a Hub cache, by its path relative to it, with its size."""
    files = cache.rglob("*") if cache.exists() else ()
    return {str(p.relative_to(cache)): p.stat().st_size for p in files if p.is_file()}


@pytest.mark.parametrize("glob", ["*", "delta-[0-9]*", "delta-?????-of-00001.safetensors"])
def test_a_manifest_name_with_glob_characters_is_refused_and_nothing_else_is_fetched(tmp_path, delta, hub, glob):
    """A payload named ``*`` once matched every file of the repo: now the name is refused before any
    payload is fetched, and an unlisted 300 KB file stays on the Hub."""
    import json

    from deltakit import ManifestError

    _, delta_dir, _ = delta
    publish_delta(delta_dir, "org/glob", metadata=CARD)
    data = json.loads((delta_dir / "deltakit.json").read_text())
    data["payload"] = {glob if i == 0 else k: v for i, (k, v) in enumerate(data["payload"].items())}
    hub.seed("org/glob", {"deltakit.json": json.dumps(data).encode(), "delta-99999.bin": b"\x01" * 300_000})
    cache = tmp_path / "cache"
    with pytest.raises(ManifestError, match=rf"org/glob: the manifest names a file {re.escape(repr(glob))}"):
        fetch_delta("org/glob", cache_dir=cache)
    assert _downloads(hub, "org/glob") == [], "nothing but the manifest was fetched"
    assert not [n for n in _cached_files(cache) if "delta-" in n]


def test_a_file_whose_size_differs_from_the_manifest_is_refused_before_it_is_fetched(tmp_path, delta, hub):
    """The Hub's metadata gives each file's size before the transfer: a payload recorded at a few KB but
    held at 2 MB is refused without a byte of it downloaded, and the cache keeps nothing of it."""
    from deltakit import IntegrityError

    _, delta_dir, manifest = delta
    publish_delta(delta_dir, "org/big", metadata=CARD)
    name, record = next(iter(manifest.payload.items()))
    hub.seed("org/big", {name: b"\x00" * (2 << 20)})
    cache = tmp_path / "cache"
    refused = rf"org/big: {re.escape(name)} is 2097152 bytes on the Hub, but its manifest records {record.size}"
    with pytest.raises(IntegrityError, match=refused) as e:
        fetch_delta("org/big", cache_dir=cache)
    assert (e.value.expected, e.value.actual) == (record.size, 2 << 20)
    assert _downloads(hub, "org/big") == []
    assert max(_cached_files(cache).values(), default=0) < 1 << 20, "nothing of the 2 MB file is in the cache"


def test_files_the_manifest_does_not_list_are_not_fetched_not_even_the_card(tmp_path, delta, hub):
    _, delta_dir, manifest = delta
    publish_delta(delta_dir, "org/card", metadata=CARD)
    hub.seed("org/card", {"README.md": b"# card\n" + b"x" * (2 << 20)})  # a 2 MB card
    fetched = fetch_delta("org/card", cache_dir=tmp_path / "cache")
    assert verify_delta(fetched.path).ok
    listed = {*manifest.payload, *(f"files/{rel}" for rel in manifest.target.files)}
    assert set(_downloads(hub, "org/card")) <= listed  # with Xet on, the payload comes from the CAS instead
    assert not (fetched.path / "README.md").exists()


def test_a_base_repo_holding_a_file_with_an_absolute_name_is_a_named_hub_error(tmp_path, hub):
    from deltakit.hub import fetch_model

    hub.seed("org/abs", {"config.json": b"{}", "/etc/evil": b"x"})
    with pytest.raises(HubError, match=r"org/abs holds a file named '/etc/evil'.*not a safe relative"):
        fetch_model("org/abs", cache_dir=tmp_path / "cache")
    assert _downloads(hub, "org/abs") == []


@pytest.mark.parametrize("listener", ["refuses", "never answers"])
def test_an_unreachable_hub_is_said_once_quickly_in_one_line(tmp_path, monkeypatch, listener):
    """A closed port, or one that accepts and never answers: one line within seconds, no retry chatter
    (it used to take 24 s of "Retrying in 8s" for the first, minutes for the second)."""
    import socket
    import time

    from test_cli import deltakit_cli

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        if listener == "refuses":
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                port = closed.getsockname()[1]  # bound, never listening: connections are refused
        else:
            port = silent.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        started = time.monotonic()
        result = deltakit_cli("download", "org/name")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deltakit: error: cannot reach the Hub at {endpoint}: "), lines
    assert "org/name is not in the local Hub cache" in lines[0]
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_an_unreachable_hub_still_serves_what_the_cache_holds(tmp_path, delta, hub):
    _, delta_dir, _ = delta
    publish_delta(delta_dir, "org/cached", metadata=CARD)
    first = fetch_delta("org/cached", cache_dir=tmp_path / "cache")
    again = fetch_delta("org/cached", cache_dir=tmp_path / "cache", endpoint="http://127.0.0.1:9")
    assert again.path == first.path and again.commit == first.commit


def test_the_card_reads_config_json_without_blocking_on_a_fifo(tmp_path, delta):
    """A FIFO where the package's config.json should be is no config, not a publish that hangs."""
    import threading

    from deltakit.hub.publish import _Local, _target_config

    _, delta_dir, manifest = delta
    config = delta_dir / "files" / "config.json"
    config.unlink()
    os.mkfifo(config)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(_target_config(delta_dir, manifest)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): give it a writer that goes away at once, so it ends
        os.close(os.open(config, os.O_WRONLY | os.O_NONBLOCK))
    assert found == [None], "read config.json without blocking"
    with pytest.raises(UnsupportedInputError, match=r"config\.json is a FIFO"):
        _Local(config).oids(None, ("git", ""))
