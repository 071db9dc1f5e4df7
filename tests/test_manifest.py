"""The manifest survives JSON exactly, and refuses what it does not understand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import finetune_of, llama_like

from deltakit import ManifestError, apply_delta, make_delta
from deltakit.formats import read_header
from deltakit.hashing import fingerprint
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


@pytest.fixture
def empty_raw(tmp_path, make_pair):
    """A delta whose target adds a zero-element tensor (stored raw, no payload bytes), and a base."""
    base = llama_like(torch.float16)
    target = {**finetune_of(base), "extra.empty": torch.zeros(0, 4, dtype=torch.float16)}
    base_dir, target_dir = make_pair(base, target)
    make_delta(base_dir, target_dir, tmp_path / "d")
    return base_dir, tmp_path / "d"


def set_target_shape(delta: Path, name: str, shape: list[int], dtype: str | None = None) -> None:
    """Give a target tensor another shape (and dtype), with the fingerprint that its records then give."""
    path = delta / "deltakit.json"
    data = json.loads(path.read_text())
    tensors = data["target"]["tensors"]
    tensors[name]["shape"] = shape
    if dtype is not None:
        tensors[name]["dtype"] = dtype
    data["target"]["fingerprint"] = fingerprint(
        (n, t["dtype"], tuple(t["shape"]), t["digest"]) for n, t in tensors.items()
    )
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ([0, 2**64], "F16", r"shape \[0, 18446744073709551616\] is not a list of non-negative 64-bit integers"),
        ([2**64, 0], "F16", "64-bit integers"),
        ([0, 2**100], "U8", "64-bit integers"),
        ([0, 2**62, 2], "F64", None),  # 0 elements; every dimension fits 64 bits: allowed, as safetensors does
        ([0, 2**40, 2**40], "F16", None),  # the running product is 0 throughout, as the reference counts it
    ],
)
def test_a_shape_that_safetensors_cannot_hold_is_refused_naming_the_tensor(empty_raw, shape, dtype, message):
    base_dir, delta = empty_raw
    set_target_shape(delta, "extra.empty", shape, dtype)
    out = delta.parent / "out"
    if message is None:
        apply_delta(base_dir, delta, out)
        assert read_header(out / "model.safetensors").tensors["extra.empty"].shape == tuple(shape)
        return
    with pytest.raises(ManifestError, match=message) as err:
        apply_delta(base_dir, delta, out)
    assert "target.tensors['extra.empty'].shape" in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ([2**64], "U8", "64-bit integers"),
        ([2**32, 2**32], "U8", "more elements than 64 bits can count"),
        ([2**62, 4], "U8", "more elements than 64 bits can count"),
        ([2**62], "F32", "more bytes than 64 bits can count"),
        ([2**63], "F16", "more bytes than 64 bits can count"),
    ],
)
def test_element_counts_and_byte_sizes_are_bounded_as_safetensors_bounds_them(shape, dtype, message):
    manifest = json.loads(minimal_manifest())
    manifest["base"]["tensors"]["w"].update(shape=shape, dtype=dtype)
    with pytest.raises(ManifestError, match=rf"base\.tensors\['w'\]\.shape: .*{message}"):
        Manifest.from_json(json.dumps(manifest))


def minimal_manifest() -> str:
    tensors = {"w": {"dtype": "F16", "shape": [2], "digest": "0" * 64}}
    return json.dumps(
        {
            "format": 2,
            "created_by": "test",
            "hash": "blake3",
            "base": {"name": "b", "fingerprint": "0" * 64, "tensors": tensors},
            "target": {"name": "t", "fingerprint": "0" * 64, "tensors": {}, "files": {}},
            "payload": {},
        }
    )


def test_a_manifest_of_empty_arrays_is_refused_before_it_is_parsed():
    """63 MiB of "[[],[],...]" cost json.loads 16 s and 1.8 GB before any field was looked at."""
    text = '{"format": 2, "x": [' + ",".join(["[]"] * 100_000) + "]}"
    with pytest.raises(ManifestError, match="JSON arrays and objects"):
        Manifest.from_json(text)
