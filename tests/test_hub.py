"""Publishing and fetching deltas: the model card, and round trips through a local Hub server."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_of, llama_like, write_checkpoint

from deltakit import make_delta
from deltakit.hub import is_repo_spec, model_card, parse_repo_spec, publish_delta


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
    text = model_card(manifest, "dandelion/panda-7b-delta", license="apache-2.0", base_model="huggyllama/llama-7b")
    card = ModelCard(text)
    assert card.data.base_model == "huggyllama/llama-7b"
    assert card.data.library_name == "deltakit"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["deltakit", "delta"]
    assert "deltakit apply --base /path/to/llama-7b --delta dandelion/panda-7b-delta --out panda-7b" in text
    assert manifest.base.fingerprint in text
    assert "| `rows` | 2 |" in text and "| `copy` |" in text


def test_repo_specs():
    assert parse_repo_spec("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_spec("org/name") == ("org/name", None)
    assert is_repo_spec("org/name") and not is_repo_spec("name") and not is_repo_spec("/abs/path")


def test_dry_run_lists_what_would_be_uploaded_and_sends_nothing(delta):
    _, delta_dir, manifest = delta
    report = publish_delta(delta_dir, "org/panda-7b-delta", dry_run=True, endpoint="http://127.0.0.1:9")
    names = [name for name, _ in report.files]
    assert names[:2] == ["README.md", "deltakit.json"]
    assert set(manifest.payload) <= set(names) and "files/config.json" in names
    assert report.commit is None and report.dry_run
