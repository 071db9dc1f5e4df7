"""The 4- and 5-bit types and the K-quants of today's families held to llama.cpp's quantizer (slow: builds
llama.cpp from llama-cpp-python's sdist once), as tests/test_gguf_llamacpp.py holds LLaMA 1/2's:

- q4_0/q4_1/q5_0/q5_1 (gguf's numpy quantizers): every tensor equal to what llama.cpp's quantizer makes of
  its converter's f32 output, but the output projection (or, tied, the embedding that serves as it):
  Q6_K there, which only llama.cpp's C code makes, Q8_0 in deltakit's (docs/GGUF.md);
- q4_k_m through the kquants extra: the very file llama-quantize makes of the converter's output in the
  source's precision.

Hidden 256, so that the K-quants' 256-wide blocks fit every row.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from llamacpp import fields_and_tensors
from tinyllama3 import write_tiny_llama3
from tinyqwen import write_tiny_qwen

from deltakit.gguf import convert_to_gguf

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

SIZE = {"hidden": 256, "intermediate": 512}
# name -> (writer, the source's dtype, tied)
FAMILIES = {
    "llama-3.1": (lambda out: write_tiny_llama3(out, **SIZE, seed=31), "bf16", False),
    "llama-3.2-tied": (lambda out: write_tiny_llama3(out, **SIZE, tied=True, dtype="float16", seed=32), "f16", True),
    "qwen2.5-tied": (lambda out: write_tiny_qwen(out, **SIZE, seed=33), "bf16", True),
    "qwen2.5-untied": (lambda out: write_tiny_qwen(out, **SIZE, tied=False, dtype="float16", seed=34), "f16", False),
    "qwen3": (lambda out: write_tiny_qwen(out, version=3, **SIZE, seed=35), "bf16", True),
}


@pytest.fixture(scope="module")
def llama():
    import llamacpp

    return llamacpp.build()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quants")
    return {name: write(tmp / name) for name, (write, _, _) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_narrow_types_equal_llama_cpps_quantizer_but_the_output_projection(llama, models, tmp_path, family):
    import llamacpp

    model, tied = models[family], FAMILIES[family][2]
    head = "token_embd.weight" if tied else "output.weight"
    f32 = llamacpp.convert_hf(llama, model, tmp_path / "f32.gguf", "f32")
    for quant in ("q4_0", "q4_1", "q5_0", "q5_1"):
        theirs = llamacpp.quantize(llama, f32, tmp_path / f"theirs-{quant}.gguf", quant)
        ours = convert_to_gguf(model, tmp_path / f"ours-{quant}.gguf", quant=quant).out
        their_fields, their_tensors = fields_and_tensors(theirs)
        our_fields, our_tensors = fields_and_tensors(ours)
        assert our_fields == their_fields, quant  # the quantizer moves two keys to the end; the values agree
        assert sorted(our_tensors) == sorted(their_tensors), quant
        assert ("output.weight" in our_tensors) is not tied
        assert their_tensors[head][0] == "Q6_K" and our_tensors[head][0] == "Q8_0", quant
        for name, tensor in their_tensors.items():
            if name != head:
                assert our_tensors[name] == tensor, (quant, name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_k_quants_are_llama_cpps_own(llama, models, tmp_path, family):
    """deltakit hands llama.cpp's quantizer a GGUF equal to its converter's, in the source's precision."""
    import llamacpp

    model, precision = models[family], FAMILIES[family][1]
    source = llamacpp.convert_hf(llama, model, tmp_path / f"{precision}.gguf", precision)
    theirs = llamacpp.quantize(llama, source, tmp_path / "theirs.gguf", "q4_k_m")
    cmd = [sys.executable, "-m", "deltakit", "convert", str(model), "--to", "gguf", "--quant", "q4_k_m"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "ours.gguf")], capture_output=True, text=True, env=llama.env())
    assert done.returncode == 0, done.stderr
    assert fields_and_tensors(tmp_path / "ours.gguf") == fields_and_tensors(theirs)
    assert "Q4_K" in {t[0] for t in fields_and_tensors(theirs)[1].values()}
