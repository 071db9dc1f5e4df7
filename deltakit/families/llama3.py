"""Llama 3, 3.1 and 3.2 (and their fine-tunes): the same ``LlamaForCausalLM`` layers as Llama 1 and 2,
with a byte-level BPE vocabulary (tokenizer.json, 128256 ids), Llama 3.1's rope scaling
(``rope_type: llama3``) and, in 3.2's 1B and 3B, an output projection tied to the embedding.

A config is Llama 3's when its vocabulary is larger than any SentencePiece LLaMA's or its rope type
is ``llama3``; everything else of the architecture stays :mod:`.llama`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .family import Family
from .llama import LLAMA, SENTENCEPIECE_VOCAB_MAX

__all__ = ["LLAMA3", "PRE_TOKENIZERS", "is_llama3_config", "rope_freqs"]

# What llama.cpp's converter names Llama 3's pre-tokenizer: ``llama-bpe`` for tokenizer.json as Meta's
# repositories hold it today (its post-processor adds <|begin_of_text|>), ``smaug-bpe`` for the first
# one Meta published (no BOS from the post-processor; the same split rules).
PRE_TOKENIZERS = ("llama-bpe", "smaug-bpe")


# -------------------------------------------------------------------------------------------------
# Hugging Face's layout and its GGUF


def _rope(config: Mapping[str, Any]) -> Mapping[str, Any]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return rope if isinstance(rope, Mapping) else {}


def is_llama3_config(config: Mapping[str, Any]) -> bool:
    """A ``LlamaForCausalLM`` config of Llama 3's: a vocabulary past SentencePiece LLaMAs', or llama3 rope."""
    rope = _rope(config)
    vocab = config.get("vocab_size")
    big = isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > SENTENCEPIECE_VOCAB_MAX
    return big or (rope.get("rope_type") or rope.get("type")) == "llama3"


def rope_freqs(hp: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``rope_freqs.weight``, the per-frequency factors of Llama 3.1's rope scaling, computed as llama.cpp's
    converter computes them (``LlamaModel.generate_extra_tensors``, in float32 torch arithmetic, so the
    bytes are its); none without ``rope_type: llama3``."""
    import torch

    rope = hp["rope_parameters"]
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return []
    base = rope.get("rope_theta", 10000.0)
    dim = hp["head_dim"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low_freq_factor = rope.get("low_freq_factor", 1.0)
    high_freq_factor = rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32).numpy())]


LLAMA3 = Family(
    name="llama3",
    architectures=LLAMA.architectures,
    model_types=LLAMA.model_types,
    gguf_arch="LLAMA",
    config_defaults=LLAMA.config_defaults,
    dropped=LLAMA.dropped,
    tensor_shapes=LLAMA.tensor_shapes,
    vocabulary="bpe",
    pre_tokenizers=PRE_TOKENIZERS,
    claims=is_llama3_config,
    extra_tensors=rope_freqs,
)
