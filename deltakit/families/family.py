"""What deltakit knows of one model family, as the registry in :mod:`deltakit.families` holds it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Family"]


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
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    gguf_arch: str
    config_defaults: tuple[tuple[str, object], ...]
    dropped: tuple[str, ...]
    tensor_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]
