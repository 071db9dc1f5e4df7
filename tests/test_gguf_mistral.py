"""GGUF for Mistral 7B (MistralForCausalLM), read back with llama.cpp's own gguf reader: the ``llama``
architecture llama.cpp writes it as, MistralConfig's defaults, Mistral's real SentencePiece vocabulary
(from mistral-common), and apply --to gguf from a delta between two tiny Mistrals.

tests/test_gguf_mistral_llamacpp.py holds the same files to llama.cpp's own converter (slow).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file
from test_cli import deltakit_cli
from test_gguf import gguf_name, read, unpermute
from tinyllama import write_finetune
from tinymistral import CHAT_TEMPLATE, write_tiny_mistral

from deltakit import UnsupportedInputError, make_delta
from deltakit.errors import FormatError
from deltakit.gguf import apply_to_gguf, check_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("mistral_common")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Mistral 7B v0.3 (bf16, GQA 4/2, its 32768-piece tokenizer with [INST] and the other control
    tokens), a fine-tune of it, and the delta between them."""
    tmp = tmp_path_factory.mktemp("mistral")
    base = write_tiny_mistral(tmp / "Mistral-Tiny-v0.3", seed=3)
    target = write_finetune(base, tmp / "Mistral-Tiny-Instruct-v0.3")
    make_delta(base, target, tmp / "delta")
    return tmp, base, target, tmp / "delta"


def test_convert_writes_mistral_as_llama_cpp_does(models, tmp_path):
    _, _, target, _ = models
    report = convert_to_gguf(target, tmp_path / "m.gguf", quant="f32")
    fields, tensors = read(tmp_path / "m.gguf")
    source = load_file(str(target / "model.safetensors"))
    assert report.tensors == len(source) == len(tensors) == 21
    assert fields["general.architecture"] == "llama"  # llama.cpp's converter writes MistralForCausalLM so
    assert (fields["general.name"], fields["general.version"]) == ("Mistral Tiny Instruct v0.3", "v0.3")
    assert fields["llama.context_length"] == 32768 and fields["llama.rope.freq_base"] == 1e6
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert not any("sliding_window" in key for key in fields)  # the llama architecture has no such key
    tokens, kinds = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["llama.vocab_size"] == len(tokens) == 32768
    assert tokens[:5] == ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] and tokens[770] == "[control_768]"
    assert set(kinds[:771]) == {3} and kinds[771] == 6  # all CONTROL (<unk> too: special), <0x00> a byte
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    for hf_name, tensor in source.items():
        values = gguf.quants.dequantize(tensors[gguf_name(hf_name)].data, gguf.GGMLQuantizationType.F32)
        values = values.reshape(tensor.shape)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            values = unpermute(values, 4 if "q_proj" in hf_name else 2)
        assert np.array_equal(values, tensor.float().numpy()), hf_name  # bf16 widens exactly


def test_mistral_configs_defaults_are_mistralconfigs(tmp_path):
    """A v0.1-style config.json that leaves out what MistralConfig fills in: 8 KV heads (LlamaConfig would
    make it 16 here), a 131072 context, rms_norm_eps 1e-6; and a null KV count means as many as heads."""
    model = write_tiny_mistral(tmp_path / "Mistral-Tiny-v0.1", release="v0.1", heads=16, kv_heads=None, defaults=True)
    check = check_gguf(model, quant="q8_0")
    assert check.tensors == 21 and check.types == {"F32": 5, "Q8_0": 16}
    convert_to_gguf(model, tmp_path / "m.gguf")
    fields, tensors = read(tmp_path / "m.gguf")
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (16, 8)
    assert fields["llama.context_length"] == 131072 and fields["llama.rope.freq_base"] == 10000.0
    assert abs(fields["llama.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert fields["llama.vocab_size"] == len(fields["tokenizer.ggml.tokens"]) == 32000
    assert tuple(int(n) for n in tensors["blk.0.attn_k.weight"].shape) == (64, 32)  # 8 KV heads of 4
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_key_value_heads": None}))
    with pytest.raises(FormatError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' is \[32, 64\]"):
        check_gguf(model)  # null: 16 KV heads, as transformers reads it, which the k rows do not fit


def test_apply_to_gguf_from_a_mistral_delta_equals_converting_the_fine_tune(models, tmp_path):
    _, base, target, delta = models
    for quant in ("bf16", "q8_0"):
        apply_to_gguf(base, delta, tmp_path / f"a-{quant}.gguf", quant=quant)
        convert_to_gguf(target, tmp_path / f"c-{quant}.gguf", quant=quant)
        assert (tmp_path / f"a-{quant}.gguf").read_bytes() == (tmp_path / f"c-{quant}.gguf").read_bytes()


def test_the_cli_writes_a_mistral_gguf_from_convert_and_apply(models, tmp_path):
    _, base, target, delta = models
    done = deltakit_cli("apply", "--base", base, "--delta", delta, "--out", tmp_path / "a.gguf", "--to", "gguf")
    assert done.returncode == 0, done.stderr
    done = deltakit_cli("convert", target, "--to", "gguf", "--out", tmp_path / "c.gguf", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["types"] == {"F16": 16, "F32": 5}
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "c.gguf").read_bytes()


def test_an_unknown_architecture_is_refused_naming_the_known_ones(models, tmp_path):
    _, _, target, _ = models
    other = tmp_path / "mixtral"
    shutil.copytree(target, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["MixtralForCausalLM"]}))
    with pytest.raises(UnsupportedInputError, match="'MixtralForCausalLM' is not LLaMA") as caught:
        convert_to_gguf(other, tmp_path / "a.gguf")
    assert "LlamaForCausalLM, MistralForCausalLM" in str(caught.value)
    assert not (tmp_path / "a.gguf").exists()
