"""inspect names the kind of whatever it is given, and what apply would do with it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import finetune_of, llama_like, write_checkpoint
from test_cli import deltakit_cli
from test_legacy import fastchat_make_delta_v0

from deltakit import inspect_path, make_delta


def test_every_kind_is_named(tmp_path):
    base = llama_like(torch.float16)
    target = finetune_of(base)
    base_dir = write_checkpoint(tmp_path / "llama", base)
    target_dir = write_checkpoint(tmp_path / "panda", target)
    make_delta(base_dir, target_dir, tmp_path / "delta")
    legacy = write_checkpoint(tmp_path / "legacy", fastchat_make_delta_v0(base, target))
    alpaca = write_checkpoint(
        tmp_path / "alpaca",
        {k: (v.float() - b.float()) for (k, v), b in zip(target.items(), base.values(), strict=True)},
    )
    (tmp_path / "meta").mkdir()
    torch.save({"tok_embeddings.weight": torch.ones(4, 2).half()}, tmp_path / "meta" / "consolidated.00.pth")

    assert inspect_path(base_dir).kind == "hf-checkpoint"
    assert inspect_path(tmp_path / "delta").kind == "delta"
    assert inspect_path(tmp_path / "meta").kind == "meta-checkpoint"
    found = inspect_path(legacy)
    assert (found.kind, found.legacy_kind) == ("legacy-delta", "fastchat")
    assert "fastchat way" in found.apply
    assert inspect_path(alpaca).legacy_kind == "alpaca"


def test_a_lora_adapter_is_named_with_what_merging_would_do(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    model.save_pretrained(tmp_path / "adapter")
    result = deltakit_cli("inspect", tmp_path / "adapter", "--json")
    info = json.loads(result.stdout)
    assert info["kind"] == "lora-adapter" and info["description"] == "PEFT LoRA adapter"
    assert "into 1 base tensors (r=4, scale 2.0)" in info["apply"]
    assert "lm_head.weight" in info["apply"]


def test_split_meta_checkpoints_and_xor_releases_are_named(tmp_path):
    from test_convert import meta_checkpoint
    from test_legacy import oasst_setup

    meta_checkpoint(tmp_path / "meta", 2)
    found = inspect_path(tmp_path / "meta")
    assert found.kind == "meta-checkpoint" and "2 model-parallel shards" in found.apply
    (tmp_path / "oa").mkdir()
    oasst_setup(tmp_path / "oa")
    found = inspect_path(tmp_path / "oa" / "release")
    assert (found.kind, found.legacy_kind) == ("legacy-delta", "oasst-xor")
