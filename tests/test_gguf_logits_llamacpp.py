"""llama.cpp runs what deltakit writes for today's families (slow: builds llama.cpp from llama-cpp-python's
sdist once): the f16 GGUF of a tiny model of each family, loaded by llama.cpp, gives transformers' fp32
logits on the same weights within f16 rounding (normalized MSE at most 1e-4), and the same top-1 token
at every position. Each case exercises what its family adds to Llama 2: Llama 3.1's llama3 rope scaling
(the rope_freqs tensor), Llama 3.2's tied head, Qwen2's q/k/v biases (tied and untied), Qwen3's q/k norms
and stated head_dim. Llama 1/2 and Mistral are checked the same way in their own files.

Measured: 3e-7 to 5e-7 for every case; against transformers with the feature taken away, the same files
give 2e-3 (Llama 3.1 without its rope scaling), 0.09 (Qwen2.5 with zero biases) and 4e-3 (Qwen3 with unit
q/k norms), so each feature is seen by the bound.
"""

from __future__ import annotations

import pytest
from llamacpp import check_logits
from tinyllama3 import write_tiny_llama3
from tinyqwen import write_tiny_qwen

from deltakit.gguf import convert_to_gguf

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

# <|begin_of_text|> "Hello, world" ... <|eot_id|> ...: ids of Llama 3's real vocabulary
LLAMA3_PROMPT = [128000, 9906, 11, 1917, 0, 578, 4062, 14198, 39935, 35308, 128009, 791]
# "Hello, world" ... <|im_start|> <|im_end|> ...: ids of Qwen's real vocabulary
QWEN_PROMPT = [9707, 11, 1879, 0, 151644, 872, 198, 785, 3974, 13876, 151645, 198]
# deliberately not the families' defaults: head_dim 16 where Qwen3 states it, GQA 4/2 everywhere
FAMILIES = {
    "llama-3.1": (LLAMA3_PROMPT, lambda out: write_tiny_llama3(out, hidden=64, intermediate=128, seed=21)),
    "llama-3.2-tied": (
        LLAMA3_PROMPT,
        lambda out: write_tiny_llama3(out, hidden=64, intermediate=128, tied=True, dtype="float16", seed=22),
    ),
    "qwen2.5-tied": (QWEN_PROMPT, lambda out: write_tiny_qwen(out, hidden=64, intermediate=128, seed=23)),
    "qwen2.5-untied": (
        QWEN_PROMPT,
        lambda out: write_tiny_qwen(out, hidden=64, intermediate=128, tied=False, dtype="float16", seed=24),
    ),
    "qwen3": (QWEN_PROMPT, lambda out: write_tiny_qwen(out, version=3, hidden=64, intermediate=128, seed=25)),
}


@pytest.fixture(scope="module")
def llama():
    import llamacpp

    return llamacpp.build()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_what_deltakit_writes(llama, tmp_path, family):
    prompt, write = FAMILIES[family]
    model = write(tmp_path / family)
    path = convert_to_gguf(model, tmp_path / f"{family}.gguf", quant="f16").out
    check = check_logits(llama, path, model, prompt)
    assert check.nmse <= 1e-4, (family, check.nmse)
    assert check.same_top1, family
