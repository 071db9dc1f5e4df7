"""What deltakit knows of one model family, as the registry in :mod:`deltakit.families` holds it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Family"]


def _claims_any(config: Mapping[str, Any]) -> bool:
    return True


def _no_extra_tensors(hp: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    return []


@dataclass(frozen=True)
class Family:
    """One model family: how to recognise its config.json, and what its GGUF is made of.

    Attributes:
        name: the family's short name (``llama``).
        architectures: config.json ``architectures`` entries that name it.
        model_types: config.json ``model_type`` values that name it when ``architectures`` is absent.
        gguf_arch: the member of gguf's ``MODEL_ARCH`` its GGUF is written as (``LLAMA``).
        config_defaults: transformers' defaults for the config fields a file may leave out.
        dropped: suffixes of checkpoint tensors a GGUF leaves out, as llama.cpp's converter does.
        tensor_shapes: the shape each tensor must have under a config (its defaults filled in), keyed
            by full name outside the layers and by the name within a layer inside them.
        vocabulary: how its GGUF vocabulary is read: ``sentencepiece`` (tokenizer.model) or ``bpe``
            (tokenizer.json, a byte-level BPE as llama.cpp's ``_set_vocab_gpt2`` writes it).
        pre_tokenizers: for ``bpe``, the pre-tokenizer names (llama.cpp's ``tokenizer.ggml.pre``,
            derived from the tokenizer's output on its check text) this family's GGUF is written with.
        claims: among families sharing an architecture name, whether a config is this one's (Llama 3
            and Llama 2 are both ``LlamaForCausalLM``); the first family in the registry that claims
            it wins.
        extra_tensors: tensors llama.cpp's converter computes from the config (``rope_freqs``), GGUF
            name and float32 values, written before the checkpoint's own.
        rotary_permute: q/k rows go back in Meta's rotary order in the GGUF (llama.cpp's LlamaModel
            ``undo_permute``); such a family has no q/k biases. Qwen's GGUF keeps HF's order.
        llama_keys: the keys llama.cpp's LlamaModel adds to every model's (``add_space_prefix`` from
            tokenizer_config.json, ``vocab_size``, ``rope.dimension_count``, CodeLlama's infill tokens).
        head_dim_stated: transformers' config class always states ``head_dim`` (LlamaConfig, Qwen3Config),
            so llama.cpp's converter writes ``key_length``/``value_length``; where not (Qwen2Config),
            only a config.json that states it has them.
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gguf_arch: str
    config_defaults: tuple[tuple[str, object], ...]
    dropped: tuple[str, ...]
    tensor_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
    vocabulary: str = "sentencepiece"
    pre_tokenizers: tuple[str, ...] = ()
    claims: Callable[[Mapping[str, Any]], bool] = _claims_any
    extra_tensors: Callable[[Mapping[str, Any]], list[tuple[str, np.ndarray]]] = _no_extra_tensors
    rotary_permute: bool = True
    llama_keys: bool = True
    head_dim_stated: bool = True
