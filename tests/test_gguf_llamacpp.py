"""deltakit's GGUF files held to llama.cpp itself (slow: builds llama.cpp from llama-cpp-python's sdist once).

- f32/f16/bf16/q8_0: every tensor's bytes and every metadata key and value equal to what llama.cpp's
  ``convert_hf_to_gguf.py`` writes for the same folder, in the same order;
- q4_0/q4_1/q5_0/q5_1: every tensor equal to what llama.cpp's quantizer makes of the converter's output,
  but the output projection (Q8_0 here; llama.cpp's Q6_K needs its C quantizer: see docs/GGUF.md);
- K-quants, through llama.cpp's own quantizer: the same file llama-quantize makes;
- llama.cpp loads what deltakit writes: logits match transformers' within f16 rounding, and the top-1
  token agrees for q8_0 and q4_0;
- apply straight to GGUF gives what the three steps give (apply to a folder, convert, quantize).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llamacpp import fields_and_tensors
from tinyllama import write_finetune, write_tiny_llama

from deltakit import make_delta
from deltakit.gguf import apply_to_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.slow

PROMPT = [1, 311, 286, 348, 379, 380, 100, 200, 17, 290, 301, 9]  # <s> and pieces of the trained tokenizer


@pytest.fixture(scope="module")
def llama():
    import llamacpp

    return llamacpp.build()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny LLaMAs as releases have them: a recent fp16 one with GQA, and an older-style bf16 one
    (linear rope scaling, added_tokens_decoder, 5 vocabulary rows past the tokenizer); hidden 256 so
    the K-quants' 256-wide blocks fit; heads that echo the input (see write_tiny_llama). And a plain one,
    whose logits depend on every block, to compare logits with."""
    tmp = tmp_path_factory.mktemp("llamacpp")
    recent = write_tiny_llama(tmp / "Panda-Tiny-7B-v1.0", hidden=256, intermediate=512, echo=True, seed=5)
    legacy = write_tiny_llama(
        tmp / "vicuna-tiny",
        dtype="bfloat16",
        extra_rows=5,
        legacy=True,
        heads=4,
        kv_heads=4,
        hidden=256,
        echo=True,
        seed=6,
    )
    plain = write_tiny_llama(tmp / "plain-tiny", hidden=256, intermediate=512, seed=7)
    return tmp, {"recent": recent, "legacy": legacy, "plain": plain}


@pytest.mark.parametrize("kind", ["recent", "legacy"])
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_the_same_file_as_llama_cpps_converter(llama, models, tmp_path, kind, quant):
    import llamacpp

    model = models[1][kind]
    theirs = llamacpp.convert_hf(llama, model, tmp_path / "theirs.gguf", quant)
    convert_to_gguf(model, tmp_path / "ours.gguf", quant=quant)
    llamacpp.assert_same_gguf(tmp_path / "ours.gguf", theirs)


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_narrow_types_equal_llama_cpps_quantizer_but_the_output_projection(llama, models, tmp_path, quant):
    import llamacpp

    model = models[1]["legacy"]  # bf16: quantized from f32, as llama.cpp's quantizer reads the f32 converter output
    f32 = llamacpp.convert_hf(llama, model, tmp_path / "f32.gguf", "f32")
    theirs = llamacpp.quantize(llama, f32, tmp_path / "theirs.gguf", quant)
    convert_to_gguf(model, tmp_path / "ours.gguf", quant=quant)
    their_fields, their_tensors = fields_and_tensors(theirs)
    our_fields, our_tensors = fields_and_tensors(tmp_path / "ours.gguf")
    assert our_fields == their_fields  # llama.cpp's quantizer moves two keys to the end; the values agree
    assert sorted(our_tensors) == sorted(their_tensors)
    assert their_tensors["output.weight"][0] == "Q6_K" and our_tensors["output.weight"][0] == "Q8_0"
    for name, (qtype, shape, data) in their_tensors.items():
        if name != "output.weight":
            assert our_tensors[name] == (qtype, shape, data), name


def test_k_quants_are_llama_cpps_own(llama, models, tmp_path):
    """Through the kquants extra: deltakit hands llama.cpp's quantizer a GGUF equal to its converter's."""
    import llamacpp

    model = models[1]["recent"]
    theirs = llamacpp.quantize(
        llama, llamacpp.convert_hf(llama, model, tmp_path / "f16.gguf", "f16"), tmp_path / "theirs.gguf", "q4_k_m"
    )
    cmd = [sys.executable, "-m", "deltakit", "convert", str(model), "--to", "gguf", "--quant", "q4_k_m"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "ours.gguf")], capture_output=True, text=True, env=llama.env())
    assert done.returncode == 0, done.stderr
    assert fields_and_tensors(tmp_path / "ours.gguf") == fields_and_tensors(theirs)
    assert "Q4_K" in {t[0] for t in fields_and_tensors(theirs)[1].values()}


def test_llama_cpp_runs_what_deltakit_writes(llama, models, tmp_path):
    """f16: logits within f16 rounding of transformers' (fp32) on the same weights (normalized mean
    squared error under 1e-4: measured 1.3e-6; q/k rows left in HF's order give 0.8); q8_0 and q4_0:
    the same top-1 token at every position of the prompt."""
    import llamacpp

    for kind, model in models[1].items():
        for quant in ("f16",) if kind == "plain" else ("q8_0", "q4_0"):
            path = convert_to_gguf(model, tmp_path / f"{kind}-{quant}.gguf", quant=quant).out
            check = llamacpp.check_logits(llama, path, model, PROMPT)
            if quant == "f16":
                assert check.nmse < 1e-4, (kind, check.nmse)
            else:
                assert check.same_top1, (kind, quant, check.nmse)


def test_apply_to_gguf_equals_the_three_step_path(llama, models, tmp_path):
    """apply --to gguf --quant q8_0 against: apply to a folder, llama.cpp's converter to f32, llama.cpp's
    quantizer to q8_0; and against the converter's own q8_0 of the rebuilt folder."""
    import llamacpp

    from deltakit import apply_delta

    base = models[1]["legacy"]
    target = write_finetune(base, tmp_path / "vicuna-tiny-ft", extra_rows=3)
    make_delta(base, target, tmp_path / "delta")
    ours = apply_to_gguf(base, tmp_path / "delta", tmp_path / "ours.gguf", quant="q8_0").out
    apply_delta(base, tmp_path / "delta", tmp_path / "vicuna-tiny-ft-rebuilt")
    folder = tmp_path / "three" / "vicuna-tiny-ft"  # the name llama.cpp reads the model's name from
    folder.parent.mkdir()
    os.rename(tmp_path / "vicuna-tiny-ft-rebuilt", folder)
    direct = llamacpp.convert_hf(llama, folder, tmp_path / "direct.gguf", "q8_0")
    f32 = llamacpp.convert_hf(llama, folder, tmp_path / "f32.gguf", "f32")
    three = llamacpp.quantize(llama, f32, tmp_path / "three.gguf", "q8_0")
    assert fields_and_tensors(ours) == fields_and_tensors(direct)
    our_fields, our_tensors = fields_and_tensors(ours)
    their_fields, their_tensors = fields_and_tensors(three)
    assert our_fields == their_fields and our_tensors == their_tensors
