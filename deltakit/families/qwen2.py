"""Qwen2, Qwen2.5 and Qwen3 (Qwen2ForCausalLM, Qwen3ForCausalLM, and their fine-tunes): LLaMA's layers
with q/k/v biases (Qwen2) or q/k RMS norms (Qwen3), a byte-level BPE vocabulary (tokenizer.json, 151643
ranks and the added tokens after them, the embedding often padded past them) and, in the small ones, an
output projection tied to the embedding.

llama.cpp's ``convert_hf_to_gguf.py`` writes them as its ``qwen2`` and ``qwen3`` architectures with its
generic TextModel keys: q/k rows stay in Hugging Face's order (no rotary permutation), none of
LlamaModel's own keys (``vocab_size``, ``rope.dimension_count``, ``add_space_prefix``), and the vocabulary
its ``_set_vocab_gpt2`` writes, ids past the tokenizer's up to config.json's vocab_size as ``[PAD{id}]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .family import Family
from .llama import LLAMA

__all__ = ["PRE_TOKENIZERS", "QWEN2", "QWEN3"]

# What llama.cpp's converter names Qwen's pre-tokenizer (Qwen1.5 to Qwen3 share the tokenizer's split rules).
PRE_TOKENIZERS = ("qwen2",)


def _qwen2_shapes(hp: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    d = hp["head_dim"]
    q, kv = hp["num_attention_heads"] * d, hp["num_key_value_heads"] * d
    return LLAMA.tensor_shapes(hp) | {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                                      "self_attn.v_proj.bias": (kv,)}  # fmt: skip


def _qwen3_shapes(hp: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    d = hp["head_dim"]
    return LLAMA.tensor_shapes(hp) | {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}


QWEN2 = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    gguf_arch="QWEN2",
    # Qwen2Config's defaults (transformers' configuration_qwen2.py), where the file leaves them out
    config_defaults=(
        ("vocab_size", 151936),
        ("max_position_embeddings", 32768),
        ("rms_norm_eps", 1e-6),
        ("num_key_value_heads", 32),
    ),
    dropped=LLAMA.dropped,
    tensor_shapes=_qwen2_shapes,
    vocabulary="bpe",
    pre_tokenizers=PRE_TOKENIZERS,
    rotary_permute=False,
    llama_keys=False,
    head_dim_stated=False,
)

# Qwen3 is Qwen2's layers with q/k norms in place of q/k/v biases, and its config class states head_dim
QWEN3 = replace(
    QWEN2,
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    gguf_arch="QWEN3",
    # Qwen3Config's defaults: its head_dim is 128 whatever the width, not hidden_size / heads
    config_defaults=(*QWEN2.config_defaults, ("head_dim", 128)),
    tensor_shapes=_qwen3_shapes,
    head_dim_stated=True,
)
