"""Merge PEFT LoRA adapters into a base model: ``W + scale * (B @ A)`` in fp32, streamed rows at a time.

Several adapters apply in the order given, as Chinese-LLaMA-Alpaca's Plus models need; whole tensors an
adapter carries (``modules_to_save``, resized embeddings) replace the base's; an ``lm_head`` saved whole for a
base that ties it to the embedding (Llama 3.2 1B/3B, small Qwen) unties the merged model, while a LoRA on
such a tied head moves the embedding the two share; ``lora_bias`` moves the layer's bias. Adapters carry no
digests of the merged model, so the report gives the result's fingerprint for others to compare.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .codecs import Bytes, LoraTerm, lora_merge_rows
from .dtypes import is_float, itemsize, to_torch
from .errors import FormatError, UnsupportedInputError
from .files import read_json_object
from .formats.checkpoint import RangeReader, is_weight_file, open_checkpoint
from .formats.peft import Adapter, LoraPair, open_adapter
from .formats.safetensors import TensorInfo, TensorSpec
from .hashing import file_sha256, fingerprint
from .layout import DEFAULT_SHARD_SIZE
from .progress import ProgressFactory, no_progress
from .reading import CHUNK_BYTES, Chunk, as_bytes, element_ranges, read_range
from .staging import StagedFolder, check_output_free
from .writing import write_model

__all__ = ["MergeReport", "merge_adapters"]


@dataclass(frozen=True)
class MergeReport:
    """What a LoRA merge wrote.

    Attributes:
        merged: tensors changed by low-rank updates.
        replaced: tensors taken whole from an adapter (``modules_to_save``, resized embeddings).
        vocab_size: the ``vocab_size`` written into ``config.json`` when the embedding grew, else None.
        untied: an adapter's whole ``lm_head`` was written for a base that ties it to the embedding, and
            ``tie_word_embeddings`` set to false in ``config.json``, as peft's merged model has them.
        fingerprint: the merged model's fingerprint (adapters record none to check it against).
    """

    out: Path
    adapters: tuple[str, ...]
    tensors: int
    merged: tuple[str, ...]
    replaced: tuple[str, ...]
    bytes_written: int
    files: tuple[str, ...]
    shards: tuple[str, ...]
    fingerprint: str
    vocab_size: int | None
    untied: bool = False


@dataclass(frozen=True)
class _MergeStep:
    name: str
    source: TensorInfo
    pairs: tuple[LoraPair, ...]


def _fits(pair: LoraPair, shape: tuple[int, ...]) -> bool:
    if pair.a is None:  # a bias
        return pair.b.shape == shape
    a, b = pair.a.shape, pair.b.shape
    return len(shape) == 2 and ((a[1], b[0]) if pair.transposed else (b[0], a[1])) == shape


_HEAD = "lm_head.weight"


def _ties_embeddings(root: Path, files: Sequence[str]) -> bool:
    """Whether a base without an lm_head tensor ties it to the embedding: its ``config.json`` does not
    say otherwise (transformers ties by default)."""
    return "config.json" in files and read_json_object(root / "config.json").get("tie_word_embeddings") is not False


def _plan(
    base_tensors: dict[str, TensorInfo], adapters: Sequence[Adapter], *, tied: bool = False
) -> dict[str, tuple[TensorInfo, list[LoraPair]]]:
    plan: dict[str, tuple[TensorInfo, list[LoraPair]]] = {n: (info, []) for n, info in base_tensors.items()}
    embedding = next((n for n in base_tensors if n.endswith("embed_tokens.weight")), None)
    for adapter in adapters:
        replacements, updates = dict(adapter.replacements), list(adapter.pairs.items())
        if tied and embedding is not None and _HEAD in adapter.pairs:
            # peft merges a LoRA on a tied head into the one tensor both modules hold: the embedding moves
            # with it and the model stays tied; the head's base layer peft saved is that embedding
            replacements.pop(_HEAD, None)
            updates = [
                (embedding, dataclasses.replace(p, target=embedding)) if n == _HEAD else (n, p) for n, p in updates
            ]
        for name in [*replacements, *(n for n, _ in updates)]:
            # peft saves a tied head named in modules_to_save whole: the merged model has its own lm_head
            unties = tied and name == _HEAD and name in replacements
            if name not in plan and not unties:
                raise UnsupportedInputError(
                    f"adapter {adapter.root} changes {name!r}, which the base lacks: it was made for another "
                    "architecture",
                    path=adapter.root,
                    tensor=name,
                )
        for name, info in replacements.items():
            plan[name] = (info, [])  # a replacement discards earlier adapters' updates to it
        for name, pair in updates:
            source, pairs = plan[name]
            if not _fits(pair, source.shape) or not is_float(source.dtype):
                lora = (
                    f"lora_B's bias {list(pair.b.shape)} does"
                    if pair.a is None
                    else f"lora_A {list(pair.a.shape)} and lora_B {list(pair.b.shape)} do"
                )
                raise UnsupportedInputError(
                    f"adapter {adapter.root}: {name!r} is {source.dtype} {list(source.shape)} in the base, but "
                    f"{lora} not fit it "
                    "(an adapter for another architecture or vocabulary?)",
                    path=adapter.root,
                    tensor=name,
                )
            pairs.append(pair)
    return plan


def _matrix(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A bias merges as a one-column matrix (``b`` times a 1 x 1 ``A`` of one)."""
    return (shape[0], 1) if len(shape) == 1 else shape


def _row_ranges(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Element ranges of whole rows, sized so the fp32 working copy stays near CHUNK_BYTES."""
    width = shape[1]
    rows = max(1, CHUNK_BYTES // (4 * max(width, 1)))
    for first in range(0, shape[0], rows):
        yield first * width, min(shape[0], first + rows) * width


def _chunks(steps: Sequence[_MergeStep]) -> Iterator[Chunk]:
    for i, step in enumerate(steps):
        info, item = step.source, itemsize(step.source.dtype)
        ranges = _row_ranges(_matrix(info.shape)) if step.pairs else element_ranges(0, math.prod(info.shape), item)
        for a, b in ranges:
            yield Chunk(i, 0, a, b, (read_range(info, item, a, b),))


def _load_terms(reader: RangeReader, pairs: Sequence[LoraPair]) -> list[LoraTerm]:
    import torch

    def fp32(info: TensorInfo) -> torch.Tensor:
        buffer = bytearray(info.nbytes)
        reader.read_into(info.path, info.start, memoryview(buffer))
        raw = torch.frombuffer(buffer, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
        return raw.view(to_torch(info.dtype)).reshape(info.shape).to(torch.float32)

    return [
        LoraTerm(torch.ones(1, 1), fp32(p.b).reshape(-1, 1), p.scale, False)
        if p.a is None
        else LoraTerm(fp32(p.a), fp32(p.b), p.scale, p.transposed)
        for p in pairs
    ]


def merge_adapters(
    base: str | Path,
    adapters: Sequence[str | Path],
    out: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> MergeReport:
    """Write ``base`` with the LoRA ``adapters`` merged in, in order, as a Hugging Face checkpoint.

    The result matches peft's ``merge_and_unload`` within the rounding of the model dtype (peft rounds
    the update to the dtype before adding it; deltakit adds in fp32 and rounds once).

    With ``replace``, an existing ``out`` is replaced once the merged model is complete.

    Raises:
        OutputExistsError: ``out`` exists and is not empty, without ``replace``.
        UnsupportedInputError: an adapter targets tensors the base lacks or does not fit.
    """
    out = Path(out)
    check_output_free(out, replace=replace)
    ckpt = open_checkpoint(base)
    loaded = [open_adapter(a) for a in adapters]
    tied = _HEAD not in ckpt.tensors and _ties_embeddings(ckpt.root, ckpt.extra_files)
    planned = _plan(ckpt.tensors, loaded, tied=tied)
    untied = tied and _HEAD in planned
    specs = [TensorSpec(n, info.dtype, info.shape) for n, (info, _) in planned.items()]
    steps = [_MergeStep(n, info, tuple(pairs)) for n, (info, pairs) in planned.items()]
    with RangeReader() as reader, StagedFolder(out, replace=replace) as staged:
        bar = progress(sum(spec.nbytes for spec in specs), "merge")
        results, shards = write_model(
            staged.path, specs, shard_size, reader, _chunks(steps), _producer(steps, reader), bar
        )
        bar.close()
        digests = dict(zip((s.name for s in specs), results, strict=True))
        files, vocab = _carry_files(ckpt.root, ckpt.extra_files, loaded, staged.path, specs, untie=untied)
        staged.commit()
    return MergeReport(
        out=out,
        adapters=tuple(a.name for a in loaded),
        tensors=len(steps),
        merged=tuple(s.name for s in steps if s.pairs),
        replaced=tuple(n for n, (info, _) in planned.items() if info is not ckpt.tensors.get(n)),
        bytes_written=sum(s.layout.size for s in shards),
        files=files,
        shards=tuple(s.name for s in shards),
        fingerprint=fingerprint((s.name, s.dtype, s.shape, digests[s.name]) for s in specs),
        vocab_size=vocab,
        untied=untied,
    )


def _producer(steps: Sequence[_MergeStep], reader: RangeReader) -> Callable[[Chunk, list[memoryview]], Bytes]:
    loaded: dict[int, list[LoraTerm]] = {}  # the current tensor's terms only: bounded memory

    def produce(chunk: Chunk, views: list[memoryview]) -> Bytes:
        step = steps[chunk.owner]
        if chunk.owner not in loaded:
            loaded.clear()
            loaded[chunk.owner] = _load_terms(reader, step.pairs)
        data = as_bytes(views[0])
        if step.pairs:
            shape = _matrix(step.source.shape)
            try:
                data = lora_merge_rows(data, step.source.dtype, shape, chunk.first // shape[1], loaded[chunk.owner])
            except OverflowError as e:
                adapters = ", ".join(str(pair.b.path) for pair in step.pairs)
                raise FormatError(
                    f"merging {adapters} into {step.name!r} gives infinite or NaN weights ({step.source.dtype} "
                    f"overflows, or the LoRA weights are not finite): check lora_alpha and the adapter's tensors",
                    path=step.pairs[-1].b.path,
                    tensor=step.name,
                ) from e
        return data

    return produce


_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _carry_files(
    root: Path,
    base_files: Sequence[str],
    adapters: Sequence[Adapter],
    dest: Path,
    specs: Sequence[TensorSpec],
    *,
    untie: bool = False,
) -> tuple[tuple[str, ...], int | None]:
    """The base's files, then each adapter's tokenizer files over them; ``vocab_size`` follows the
    embedding, and ``tie_word_embeddings`` is false once an adapter's lm_head is written (``untie``)."""
    sources = {rel: root / rel for rel in base_files}
    for adapter in adapters:
        for name in adapter.extra_files:
            if name in _TOKENIZER_FILES or not is_weight_file(name):
                sources[name] = adapter.root / name
    for rel, src in sources.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        file_sha256(src, copy_to=dest / rel)
    vocab = None
    embed = next((s for s in specs if s.name.endswith("embed_tokens.weight")), None)
    config_path = dest / "config.json"
    if embed is not None and "config.json" in sources:
        config = read_json_object(sources["config.json"])  # the file just copied, so an error names it
        grew = config.get("vocab_size") not in (None, embed.shape[0])
        if grew:
            config["vocab_size"] = vocab = embed.shape[0]
        if untie:
            config["tie_word_embeddings"] = False
        if grew or untie:
            config_path.unlink()
            config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tuple(sorted(sources)), vocab
