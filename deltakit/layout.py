"""Output shard layout: which tensors go in which HF-named safetensors file, and the index.

Every header is computed before any data is written, so shards are filled in one pass, in order;
the index (``model.safetensors.index.json``) is written last, once every shard is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .formats.safetensors import FileLayout, TensorSpec, plan_layout

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "INDEX_NAME",
    "OUTPUT_METADATA",
    "OutputShard",
    "index_bytes",
    "output_name",
    "plan_output",
    "plan_shards",
    "write_index",
]

DEFAULT_SHARD_SIZE = 5_000_000_000
OUTPUT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class OutputShard:
    """One output safetensors file, its header fixed before any data is written."""

    name: str
    layout: FileLayout


def plan_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def output_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_output(specs: Sequence[TensorSpec], shard_size: int) -> tuple[tuple[OutputShard, ...], dict[str, int]]:
    """Lay out a model's tensors in HF-named shards; returns the shards and each tensor's shard index."""
    groups = plan_shards(specs, shard_size)
    shards = tuple(
        OutputShard(output_name(i + 1, len(groups)), plan_layout(group, OUTPUT_METADATA))
        for i, group in enumerate(groups)
    )
    shard_of = {spec.name: i for i, group in enumerate(groups) for spec in group}
    return shards, shard_of


INDEX_NAME = "model.safetensors.index.json"


def index_bytes(shards: Sequence[OutputShard], shard_of: dict[str, int], specs: Iterable[TensorSpec]) -> bytes:
    """The bytes of ``model.safetensors.index.json`` for a sharded output (what make signs, what apply writes)."""
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs)},
        "weight_map": {name: shards[i].name for name, i in shard_of.items()},
    }
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")


def write_index(
    folder: Path, shards: Sequence[OutputShard], shard_of: dict[str, int], specs: Iterable[TensorSpec]
) -> None:
    """``model.safetensors.index.json``, written last, once every shard is complete; only when sharded."""
    if len(shards) < 2:
        return
    (folder / INDEX_NAME).write_bytes(index_bytes(shards, shard_of, specs))
