"""The manifest survives JSON exactly, and refuses what it does not understand."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_of, llama_like

from deltakit import ManifestError, make_delta
from deltakit.manifest import Manifest


def test_json_round_trip_is_exact(tmp_path, make_pair):
    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=2))
    manifest = make_delta(base_dir, target_dir, tmp_path / "d", codec="add").manifest
    text = manifest.to_json()
    again = Manifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text
    assert (tmp_path / "d" / "deltakit.json").read_text() == text


@pytest.mark.parametrize("text", ["", "[]", '{"format": 1}', '{"format": "1"}', '{"format": true}'])
def test_malformed_manifests(text):
    with pytest.raises(ManifestError):
        Manifest.from_json(text)
