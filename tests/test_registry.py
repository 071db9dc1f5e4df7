"""Names that resolve: the registry, and apply finding the registered base a delta names."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, write_checkpoint
from test_cli import deltakit_cli

from deltakit import FormatError, InputNotFoundError, UnsupportedInputError, make_delta
from deltakit.registry import Registry, deltakit_home


@pytest.fixture
def released(tmp_path):
    base = llama_like(torch.float16)
    target = finetune_of(base, extra_vocab=3)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(tmp_path / "panda-7b", target)
    make_delta(base_dir, target_dir, tmp_path / "panda-7b-delta")
    return base_dir, tmp_path / "panda-7b-delta", target


def test_names_resolve_and_apply_finds_the_registered_base(tmp_path, released):
    base_dir, delta_dir, target = released
    added = deltakit_cli("registry", "add", "llama-7b", base_dir, "-q")
    assert added.returncode == 0, added.stderr
    assert deltakit_cli("registry", "add", "panda-7b", delta_dir, "-q").returncode == 0

    listed = json.loads(deltakit_cli("registry", "list", "--json").stdout)
    kinds = {e["name"]: e["kind"] for e in listed}
    assert kinds == {"llama-7b": "model", "panda-7b": "delta"}
    manifest = json.loads((delta_dir / "deltakit.json").read_text())
    assert next(e for e in listed if e["name"] == "llama-7b")["fingerprint"] == manifest["base"]["fingerprint"]

    applied = deltakit_cli("apply", "--delta", "panda-7b", "--out", tmp_path / "out", "-q")
    assert applied.returncode == 0, applied.stderr
    assert "using registered base 'llama-7b'" in applied.stdout
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)

    by_name = deltakit_cli("verify", "panda-7b", "--base", "llama-7b", "-q")
    assert by_name.returncode == 0 and by_name.stdout.startswith("OK:"), by_name.stdout

    removed = deltakit_cli("registry", "remove", "llama-7b")
    assert removed.returncode == 0 and base_dir.is_dir(), "remove forgets the name, keeps the files"
    orphan = deltakit_cli("apply", "--delta", "panda-7b", "--out", tmp_path / "out2", "-q")
    assert orphan.returncode == 1 and "no registered model has the fingerprint" in orphan.stderr


def test_registry_errors(tmp_path, released):
    base_dir, _, _ = released
    registry = Registry(tmp_path / "home")
    with pytest.raises(UnsupportedInputError, match="not a valid name"):
        registry.add("../escape", base_dir)
    with pytest.raises(InputNotFoundError):
        registry.add("ghost", tmp_path / "nothing")
    with pytest.raises(InputNotFoundError, match="not in the registry"):
        registry.remove("ghost")
    registry.add("moved", base_dir)
    os.rename(base_dir, tmp_path / "elsewhere")
    with pytest.raises(InputNotFoundError, match="which no longer exists"):
        registry.resolve("moved")
    registry.path.write_text("{not json")
    with pytest.raises(FormatError, match="the registry is unreadable"):
        registry.entries()


def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "a"))
    assert deltakit_home() == tmp_path / "a"
    monkeypatch.delenv("DELTAKIT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert deltakit_home() == tmp_path / "xdg" / "deltakit"


def test_a_name_is_not_silently_given_to_another_model(tmp_path, released):
    base_dir, delta_dir, _ = released
    assert deltakit_cli("registry", "add", "llama-7b", base_dir, "-q").returncode == 0
    assert deltakit_cli("registry", "add", "llama-7b", base_dir, "-q").returncode == 0, "the same model again"
    other = deltakit_cli("registry", "add", "llama-7b", delta_dir, "-q")
    assert other.returncode == 1
    assert "already registered to another model" in other.stderr and "--force" in other.stderr
    listed = json.loads(deltakit_cli("registry", "list", "--json").stdout)
    assert [e["kind"] for e in listed if e["name"] == "llama-7b"] == ["model"], "left as it was"
    assert deltakit_cli("registry", "add", "llama-7b", delta_dir, "--force", "-q").returncode == 0
    listed = json.loads(deltakit_cli("registry", "list", "--json").stdout)
    assert [e["kind"] for e in listed if e["name"] == "llama-7b"] == ["delta"]


def test_registry_add_warns_when_a_path_lies_outside_the_service_roots(tmp_path, released, monkeypatch):
    base_dir, delta_dir, _ = released
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTAKIT_ROOTS", json.dumps([str(delta_dir)]))
    outside = deltakit_cli("registry", "add", "llama-7b", base_dir, "-q")
    assert outside.returncode == 0, outside.stderr
    assert "outside the folders the service may read" in outside.stderr and "DELTAKIT_ROOTS" in outside.stderr
    assert str(delta_dir.resolve()) in outside.stderr, outside.stderr
    inside = deltakit_cli("registry", "add", "panda-7b", delta_dir, "-q")
    assert inside.returncode == 0 and "DELTAKIT_ROOTS" not in inside.stderr, inside.stderr
