"""Mistral 7B (MistralForCausalLM): LLaMA's tensors and SentencePiece vocabulary under another config
class, whose defaults differ; its GGUF is llama.cpp's ``llama`` architecture, as llama.cpp's converter
writes it.

llama.cpp's ``convert_hf_to_gguf.py`` converts MistralForCausalLM with its LlamaModel class: the same
keys in the same order, q/k rows back in Meta's rotary order, and no sliding-window key (the ``llama``
architecture has none, so llama.cpp runs Mistral 7B v0.1's 4096-token window as full attention).
"""

from __future__ import annotations

from .family import Family
from .llama import LLAMA

__all__ = ["MISTRAL"]

MISTRAL = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    gguf_arch="LLAMA",
    # MistralConfig's defaults (transformers' configuration_mistral.py), where the file leaves them out:
    # 8 KV heads where LlamaConfig has as many as query heads, a 4096 * 32 context where it has 2048
    config_defaults=(
        ("vocab_size", 32000),
        ("max_position_embeddings", 4096 * 32),
        ("rms_norm_eps", 1e-6),
        ("num_key_value_heads", 8),
    ),
    dropped=LLAMA.dropped,
    tensor_shapes=LLAMA.tensor_shapes,
)
