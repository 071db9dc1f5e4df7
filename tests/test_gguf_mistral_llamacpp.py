"""deltakit's Mistral GGUF files held to llama.cpp itself (slow: builds llama.cpp from llama-cpp-python's
sdist once), on tiny Mistrals with Mistral's real tokenizers (from mistral-common):

- f32/f16/bf16/q8_0: every tensor's bytes and every metadata key, value and type equal to what llama.cpp's
  ``convert_hf_to_gguf.py`` writes for the same folder, in the same order: a v0.3-style model (32768
  pieces, rope theta 1e6, a chat template) and a v0.1-style one whose config.json leaves MistralConfig's
  defaults out (8 KV heads, a 131072 context, rms_norm_eps 1e-6);
- apply straight to GGUF gives what llama.cpp's converter gives for the rebuilt folder;
- llama.cpp loads what deltakit writes: its f16 logits match transformers' MistralForCausalLM.
"""

from __future__ import annotations

import os

import pytest
from llamacpp import assert_same_gguf, fields_and_tensors
from tinyllama import write_finetune
from tinymistral import write_tiny_mistral

from deltakit import apply_delta, make_delta
from deltakit.gguf import apply_to_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("mistral_common")
pytestmark = pytest.mark.slow

PROMPT = [1, 3, 1040, 5000, 12000, 781, 29473, 4, 2, 700, 31000, 31999]  # <s> [INST] ... [/INST] </s> ...


@pytest.fixture(scope="module")
def llama():
    import llamacpp

    return llamacpp.build()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """hidden 256, as the LLaMA slow tests; v0.3-style bf16 with GQA 8/2, v0.1-style with defaults left out."""
    tmp = tmp_path_factory.mktemp("mistral-llamacpp")
    v3 = write_tiny_mistral(tmp / "Mistral-Tiny-Instruct-v0.3", hidden=256, intermediate=512, heads=8, seed=5)
    v1 = write_tiny_mistral(
        tmp / "Mistral-Tiny-v0.1", release="v0.1", hidden=256, heads=16, kv_heads=None, defaults=True, seed=6
    )
    return tmp, {"v0.3": v3, "v0.1": v1}


@pytest.mark.parametrize("release", ["v0.3", "v0.1"])
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_the_same_file_as_llama_cpps_converter(llama, models, tmp_path, release, quant):
    import llamacpp

    model = models[1][release]
    theirs = llamacpp.convert_hf(llama, model, tmp_path / "theirs.gguf", quant)
    convert_to_gguf(model, tmp_path / "ours.gguf", quant=quant)
    assert_same_gguf(tmp_path / "ours.gguf", theirs)


def test_apply_to_gguf_equals_llama_cpps_converter_on_the_rebuilt_model(llama, models, tmp_path):
    import llamacpp

    base = models[1]["v0.3"]
    target = write_finetune(base, tmp_path / "tuned")
    make_delta(base, target, tmp_path / "delta")
    ours = apply_to_gguf(base, tmp_path / "delta", tmp_path / "ours.gguf", quant="q8_0").out
    apply_delta(base, tmp_path / "delta", tmp_path / "rebuilt")
    folder = tmp_path / "three" / "tuned"  # the delta's model name, which llama.cpp reads from the folder
    folder.parent.mkdir()
    os.rename(tmp_path / "rebuilt", folder)
    theirs = llamacpp.convert_hf(llama, folder, tmp_path / "theirs.gguf", "q8_0")
    assert fields_and_tensors(ours) == fields_and_tensors(theirs)


def test_llama_cpp_runs_what_deltakit_writes(llama, models, tmp_path):
    """f16 logits within f16 rounding of transformers' MistralForCausalLM (fp32) on the same weights; the
    prompt is far shorter than v0.1's 4096-token sliding window, inside which full attention is the same."""
    import llamacpp

    for release, model in models[1].items():
        path = convert_to_gguf(model, tmp_path / f"{release}.gguf", quant="f16").out
        check = llamacpp.check_logits(llama, path, model, PROMPT)
        assert check.nmse < 1e-4, (release, check.nmse)
