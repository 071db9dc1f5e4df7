"""--force replaces an output only once the new one is complete and verified: until the rename, the old
one stays whole, and a failed run leaves it as it was."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, write_checkpoint
from test_cli import deltakit_cli

from deltakit.errors import OutputExistsError
from deltakit.staging import StagedFile, StagedFolder


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("force")
    base = llama_like(torch.float16)
    target = finetune_of(base, extra_vocab=3)
    base_dir = write_checkpoint(tmp / "llama", base)
    target_dir = write_checkpoint(tmp / "panda", target)
    made = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "delta", "-q")
    assert made.returncode == 0, made.stderr
    return tmp, base_dir, target_dir, target


def test_apply_force_replaces_only_a_complete_verified_output(released, tmp_path):
    tmp, base_dir, _, target = released
    out = tmp_path / "panda"
    out.mkdir()
    (out / "old.txt").write_text("the earlier model")
    kept = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / "delta", "--out", out, "-q")
    assert kept.returncode == 1 and "not empty" in kept.stderr
    wrong = write_checkpoint(tmp_path / "wrong", llama_like(torch.float16, seed=7))
    failed = deltakit_cli("apply", "--base", wrong, "--delta", tmp / "delta", "--out", out, "-q", "--force")
    assert failed.returncode == 1, failed.stdout
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"], "a failed run leaves the old output whole"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing staged is left"
    replaced = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / "delta", "--out", out, "-q", "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "old.txt").exists()
    assert_same_tensors(load_checkpoint(out), target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_make_force_replaces_a_package(released, tmp_path):
    _, base_dir, target_dir, _ = released
    out = tmp_path / "delta"
    out.mkdir()
    (out / "stale").write_text("x")
    made = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", out, "-q", "--force")
    assert made.returncode == 0, made.stderr
    assert (out / "deltakit.json").is_file() and not (out / "stale").exists()


def test_an_out_that_is_a_fifo_is_refused_up_front(released, tmp_path):
    """It failed late, with "Not a directory", after the work."""
    tmp, base_dir, _, _ = released
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    for force in ((), ("--force",)):
        run = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / "delta", "--out", fifo, "-q", *force)
        assert run.returncode == 1 and "is a FIFO" in run.stderr, run.stderr
    with pytest.raises(OutputExistsError, match="FIFO"):
        StagedFile(fifo, replace=True)


def test_a_replaced_folder_is_swapped_whole(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    with StagedFolder(final, replace=True) as staged:
        (staged.path / "b").write_text("new")
        assert (final / "a").read_text() == "old", "the old folder is whole until the commit"
        staged.commit()
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the old folder is removed, nothing is left aside"


def test_a_replaced_file_is_renamed_over(tmp_path):
    final = tmp_path / "model.gguf"
    final.write_text("old")
    with pytest.raises(OutputExistsError):
        StagedFile(final)
    with StagedFile(final, replace=True) as staged:
        staged.file.write_text("new")
        staged.commit()
    assert final.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
