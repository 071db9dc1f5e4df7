"""Convert checkpoints between Meta's original LLaMA layout and Hugging Face's, and between formats,
dtypes and shard sizes, streaming rows at a time in bounded memory.

What each layout calls each tensor, and the hyperparameters it states, are the family's
(:mod:`deltakit.families.llama`); this module streams the rows and writes the output folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .codecs import Bytes, cast_bits
from .dtypes import is_float, itemsize
from .errors import FormatError, UnsupportedInputError
from .families import llama, llama3
from .files import read_json_object
from .formats.checkpoint import RangeReader, open_checkpoint
from .formats.safetensors import TensorSpec
from .formats.torch_zip import TorchZipWriter
from .hashing import file_hexdigest, file_sha256, fingerprint
from .layout import DEFAULT_SHARD_SIZE
from .progress import ProgressBar, ProgressFactory, no_progress
from .reading import Chunk
from .rows import Rows, Whole, row_blocks
from .staging import StagedFolder, check_output_free
from .writing import write_model

__all__ = ["DTYPE_NAMES", "ConvertReport", "convert", "torch_dtype_name"]

DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def torch_dtype_name(dtype: str) -> str:
    """transformers' ``torch_dtype`` for a safetensors dtype code (``F16`` -> ``float16``); float16 for
    any other."""
    return {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, "float16")


@dataclass(frozen=True)
class ConvertReport:
    out: Path
    source_kind: str
    target_kind: str
    tensors: int
    bytes_written: int
    files: tuple[str, ...]
    fingerprint: str


# -------------------------------------------------------------------------------------------------
# Streaming


def _convert_rows(reader: RangeReader, rows: Rows, first: int, last: int, dtype: str) -> Bytes:
    data = rows.read(reader, first, last) if last > first else np.empty(0, dtype=np.uint8)
    return cast_bits(data, rows.dtype, dtype) if dtype != rows.dtype else data


def _out_dtype(rows: Rows, dtype: str | None) -> str:
    return dtype if dtype is not None and is_float(rows.dtype) else rows.dtype


def _write_hf(
    reader: RangeReader,
    sources: Sequence[tuple[str, Rows]],
    folder: Path,
    dtype: str | None,
    shard_size: int,
    bar: ProgressBar,
) -> tuple[list[TensorSpec], list[str], int]:
    specs = [TensorSpec(name, _out_dtype(rows, dtype), rows.shape) for name, rows in sources]
    blocks = [list(row_blocks(rows)) for _, rows in sources]

    def chunks() -> Iterator[Chunk]:
        for i, owner_blocks in enumerate(blocks):
            for first, last in owner_blocks:
                yield Chunk(i, 0, first, last, ())

    def produce(chunk: Chunk, views: list[memoryview]) -> Bytes:
        return _convert_rows(reader, sources[chunk.owner][1], chunk.first, chunk.last, specs[chunk.owner].dtype)

    digests, shards = write_model(folder, specs, shard_size, reader, chunks(), produce, bar)
    return specs, digests, sum(s.layout.size for s in shards)


def _write_meta(
    reader: RangeReader,
    shards: Sequence[Sequence[tuple[str, Rows]]],
    folder: Path,
    dtype: str | None,
    bar: ProgressBar,
) -> int:
    written = 0
    for index, sources in enumerate(shards):
        specs = [TensorSpec(name, _out_dtype(rows, dtype), rows.shape) for name, rows in sources]
        writer = TorchZipWriter(folder / f"consolidated.{index:02d}.pth", specs, prefix=f"consolidated.{index:02d}")
        try:
            for (_, rows), spec in zip(sources, specs, strict=True):
                blocks = (_convert_rows(reader, rows, a, b, spec.dtype) for a, b in row_blocks(rows))
                writer.write_tensor(_counted(blocks, bar))
                written += spec.nbytes
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return written


def _counted(blocks: Iterator[Bytes], bar: ProgressBar) -> Iterator[memoryview]:
    for block in blocks:
        bar.update(block.size)
        yield block.data.cast("B") if block.size else memoryview(b"")


def _write_checklist(folder: Path) -> None:
    lines = [f"{file_hexdigest(path, 'md5')}  {path.name}\n" for path in sorted(folder.iterdir())]
    (folder / "checklist.chk").write_text("".join(lines), encoding="utf-8")


def _llama3_hf_files(
    source: Path,
    shape: llama.LlamaShape,
    params: dict[str, Any],
    release: llama3.Llama3Release,
    sources: Sequence[tuple[str, Rows]],
    torch_dtype: str,
) -> dict[str, Path | str | bytes]:
    """A Llama 3.x Meta checkpoint's HF files: config, generation config and, from its tiktoken
    ``tokenizer.model``, the fast tokenizer transformers' script writes."""
    vocab = dict(sources)["model.embed_tokens.weight"].shape[0]
    files: dict[str, Path | str | bytes] = {
        "config.json": llama3.hf_config(shape, params, release, sources, torch_dtype),
        "generation_config.json": llama3.generation_config(vocab, release),
    }
    if (source / "tokenizer.model").is_file():
        tokens = llama3.read_tiktoken(source / "tokenizer.model")
        if len(tokens) + len(llama3.special_tokens(scaled_rope=False)) != vocab:
            raise FormatError(
                f"tokenizer.model holds {len(tokens)} tokens, which with Llama 3's 256 special tokens are not "
                f"the embedding's {vocab} rows",
                path=source / "tokenizer.model",
            )
        files["tokenizer.json"] = llama3.tokenizer_json(tokens, release)
        files["tokenizer_config.json"] = llama3.tokenizer_config(release)
    return files


def _untie(source: Path, sources: list[tuple[str, Rows]], version: str) -> list[tuple[str, Rows]]:
    """Meta's checkpoint of a tied model stores the output projection beside the embedding; HF's stores
    the embedding alone. Refuse where the two differ: the tie would silently drop the projection."""
    by_name = dict(sources)
    embed, head = by_name["model.embed_tokens.weight"], by_name["lm_head.weight"]
    same = embed.shape == head.shape and embed.dtype == head.dtype
    with RangeReader() as reader:
        for first, last in row_blocks(embed) if same else ():
            if embed.read(reader, first, last).tobytes() != head.read(reader, first, last).tobytes():
                same = False
                break
    if not same:
        raise FormatError(
            f"output.weight differs from tok_embeddings.weight, but Llama {version}'s output projection is tied "
            "to its embedding: this is not a Llama 3.2 checkpoint",
            path=source,
            tensor="output.weight",
            argument="llama_version",
        )
    return [(name, rows) for name, rows in sources if name != "lm_head.weight"]


def convert(
    source: str | Path,
    out: str | Path,
    *,
    to: str = "hf",
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    meta_shards: int | None = None,
    llama_version: str | None = None,
    instruct: bool | None = None,
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> ConvertReport:
    """Convert a Meta or HF checkpoint to HF (``to="hf"``) or Meta (``to="meta"``) layout.

    Args:
        source: a Meta folder (``consolidated.NN.pth`` + ``params.json``) or any HF checkpoint
            (safetensors or ``.bin``).
        dtype: ``float16``, ``bfloat16`` or ``float32`` for float tensors (round to nearest even);
            by default each keeps its own.
        shard_size: the most bytes per HF output file.
        meta_shards: model-parallel shards for Meta output; by default Meta's count for the model size.
        llama_version: a Meta Llama 3 checkpoint's release, ``3``, ``3.1``, ``3.2`` or ``3.3``, which its
            ``params.json`` does not say (3.2: rope factor 32 and a tied head; 3.1 and 3.3: factor 8);
            needed where it says ``use_scaled_rope``.
        instruct: whether a Meta Llama 3 checkpoint is an instruct model (its generation stops at
            ``<|eot_id|>`` too); needed for every Meta Llama 3 checkpoint.
        replace: replace an existing folder at ``out`` once the new one is complete (until then the old
            one stays as it was).

    Raises:
        IntegrityError: a file disagrees with Meta's ``checklist.chk``.
        FormatError: a shard is missing or ``params.json`` does not match the tensors.
        UnsupportedInputError: a Meta Llama 3 checkpoint needs ``llama_version`` or ``instruct``.
    """
    source, out = Path(source), Path(out)
    check_output_free(out, replace=replace)
    if to not in ("hf", "meta"):
        raise UnsupportedInputError(f"unknown target layout {to!r}; choose hf or meta", argument="to")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UnsupportedInputError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}", argument="dtype"
        )
    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    is_meta = llama.is_meta_checkpoint(source)
    files: dict[str, Path | str | bytes] = {}  # output name -> a file to copy, or text or bytes to write

    if is_meta:
        if to == "meta":
            raise UnsupportedInputError(
                f"{source} is already a Meta checkpoint; convert to hf, or reshard as hf", path=source, argument="to"
            )
        llama.check_meta_checklist(source)
        sources, shape = llama.meta_to_hf(source)
        params = llama.read_params(source / "params.json")
        first_dtype = out_dtype or sources[0][1].dtype
        vocab = dict(sources)["model.embed_tokens.weight"].shape[0]
        if llama3.is_llama3_vocab(vocab):
            release = llama3.meta_release(
                params, source / "params.json", llama_version=llama_version, instruct=instruct
            )
            if release.tied:
                sources = _untie(source, sources, release.version)
            files.update(_llama3_hf_files(source, shape, params, release, sources, torch_dtype_name(first_dtype)))
        else:
            files["config.json"] = llama.hf_config(shape, params, sources, torch_dtype_name(first_dtype))
            files["generation_config.json"] = json.dumps(llama.GENERATION_CONFIG, indent=2) + "\n"
            if (source / "tokenizer.model").is_file():
                files["tokenizer.model"] = source / "tokenizer.model"
                files["tokenizer_config.json"] = json.dumps(llama.TOKENIZER_CONFIG, indent=2) + "\n"
        meta_out: list[list[tuple[str, Rows]]] | None = None
    else:
        ckpt = open_checkpoint(source)
        sources = [(name, Whole(info)) for name, info in ckpt.tensors.items()]
        files.update({rel: ckpt.root / rel for rel in ckpt.extra_files})
        meta_out = None
        if to == "meta":
            config = read_json_object(ckpt.root / "config.json")
            shape = llama.hf_shape(config, ckpt.root)
            if meta_shards is not None and meta_shards < 1:
                raise UnsupportedInputError(
                    f"meta_shards must be at least 1, not {meta_shards}", argument="meta_shards"
                )
            count = meta_shards or llama.META_SHARDS.get(shape.dim, 1)
            tied = config.get("tie_word_embeddings") is True
            meta_out = llama.hf_to_meta(ckpt.tensors, shape, count, ckpt.root, tied=tied)
            files = {}
            embed = ckpt.tensors.get("model.embed_tokens.weight")
            if embed is not None and llama3.is_llama3_vocab(embed.shape[0]):
                intermediate = ckpt.tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
                params = llama3.meta_params(shape, config, intermediate)
                if (ckpt.root / "tokenizer.json").is_file():
                    tiktoken = llama3.tiktoken_from_tokenizer_json(ckpt.root / "tokenizer.json")
                    if tiktoken is not None:
                        files["tokenizer.model"] = tiktoken
            else:
                params = llama.meta_params(shape, config)
            files["params.json"] = json.dumps(params) + "\n"
            if "tokenizer.model" not in files and (ckpt.root / "tokenizer.model").is_file():
                files["tokenizer.model"] = ckpt.root / "tokenizer.model"
        elif out_dtype is not None and "config.json" in files:
            config = read_json_object(ckpt.root / "config.json")
            config["torch_dtype"] = dtype
            files["config.json"] = json.dumps(config, indent=2) + "\n"

    total = sum(math.prod(rows.shape) * itemsize(_out_dtype(rows, out_dtype)) for _, rows in sources)
    with RangeReader() as reader, StagedFolder(out, replace=replace) as staged:
        bar = progress(total, "convert")
        if meta_out is None:
            specs, digests, written = _write_hf(reader, sources, staged.path, out_dtype, shard_size, bar)
            result = fingerprint((s.name, s.dtype, s.shape, d) for s, d in zip(specs, digests, strict=True))
        else:
            written = _write_meta(reader, meta_out, staged.path, out_dtype, bar)
            result = ""
        bar.close()
        for name, content in files.items():
            target = staged.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                file_sha256(content, copy_to=target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        if meta_out is not None:
            _write_checklist(staged.path)
        staged.commit()
    return ConvertReport(
        out=out,
        source_kind="meta" if is_meta else "hf",
        target_kind=to,
        tensors=len(sources) if meta_out is None else len(meta_out[0]),
        bytes_written=written,
        files=tuple(sorted(files)),
        fingerprint=result,
    )
