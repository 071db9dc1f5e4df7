"""Convert checkpoints between Meta's original LLaMA layout and Hugging Face's, and between formats,
dtypes and shard sizes, streaming rows at a time in bounded memory.

Meta -> HF merges model-parallel shards along the right dimension per tensor (as transformers'
``convert_llama_weights_to_hf.py`` does) and permutes q/k rows for HF's rotary layout; HF -> Meta
undoes both, so HF -> Meta -> HF gives back every tensor byte for byte.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .codecs import Bytes, cast_bits
from .dtypes import is_float, itemsize
from .errors import FormatError, InputNotFoundError, IntegrityError, UnsupportedInputError
from .files import read_regular_text
from .formats.checkpoint import RangeReader, open_checkpoint
from .formats.safetensors import TensorInfo, TensorSpec
from .formats.torch_zip import TorchZipWriter, read_torch_zip
from .hashing import algorithm_of, file_hexdigest, file_sha256, fingerprint, read_checksum_file
from .layout import DEFAULT_SHARD_SIZE
from .progress import ProgressBar, ProgressFactory, no_progress
from .reading import CHUNK_BYTES, Chunk
from .staging import StagedFolder, check_output_free
from .writing import write_model

__all__ = ["DTYPE_NAMES", "ConvertReport", "convert"]

DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_META_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Meta's own shard counts, by hidden size (7B, 13B, 30B/33B, 65B and 70B).
_META_SHARDS = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


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
# Row sources: each output tensor reads its rows from one or more input tensors.


class _Rows(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes: ...


def _rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    """Tensors of rank < 2 are one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


@dataclass(frozen=True)
class _Whole:
    info: TensorInfo

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        _, width = _rows_and_width(self.shape)
        row = width * itemsize(self.dtype)
        buffer = bytearray((last - first) * row)
        reader.read_into(self.info.path, self.info.start + first * row, memoryview(buffer))
        return np.frombuffer(buffer, dtype=np.uint8)


@dataclass(frozen=True)
class _Concat:
    """Model-parallel parts joined along ``axis`` (0: rows follow rows; 1: each row's pieces side by side)."""

    parts: tuple[_Rows, ...]
    axis: int

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        total = sum(p.shape[self.axis] for p in self.parts)
        return (total, *first[1:]) if self.axis == 0 else (first[0], total, *first[2:])

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        if self.axis == 1:
            pieces = [p.read(reader, first, last).reshape(last - first, -1) for p in self.parts]
            return np.concatenate(pieces, axis=1).reshape(-1)
        out, offset = [], 0
        for part in self.parts:
            rows = part.shape[0]
            lo, hi = max(first, offset), min(last, offset + rows)
            if lo < hi:
                out.append(part.read(reader, lo - offset, hi - offset))
            offset += rows
        return np.concatenate(out) if out else np.empty(0, dtype=np.uint8)


@dataclass(frozen=True)
class _Slice:
    """Rows (axis 0) or columns (axis 1) ``start:stop`` of a tensor: one model-parallel part of it."""

    inner: _Rows
    axis: int
    start: int
    stop: int

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.inner.shape
        return (self.stop - self.start, *s[1:]) if self.axis == 0 else (s[0], self.stop - self.start, *s[2:])

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        if self.axis == 0:
            return self.inner.read(reader, self.start + first, self.start + last)
        item = itemsize(self.dtype)
        block = self.inner.read(reader, first, last).reshape(last - first, -1)
        return np.ascontiguousarray(block[:, self.start * item : self.stop * item]).reshape(-1)


@dataclass(frozen=True)
class _Rotary:
    """q/k rows reordered within each head between Meta's interleaved rotary layout and HF's halves."""

    inner: _Rows
    heads: int
    to_hf: bool

    def __post_init__(self) -> None:
        rows = self.inner.shape[0]
        if self.heads <= 0 or rows % self.heads or (rows // self.heads) % 2:
            raise FormatError(f"{rows} q/k rows do not split into {self.heads} heads of an even size")

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    @property
    def head_rows(self) -> int:
        return self.shape[0] // self.heads

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        rows = self.head_rows
        # HF row k * rows/2 + j is Meta row 2j + k (transformers' permute)
        meta_rows = np.concatenate([np.arange(0, rows, 2), np.arange(1, rows, 2)])
        order = meta_rows if self.to_hf else np.argsort(meta_rows)
        block = self.inner.read(reader, first, last).reshape((last - first) // rows, rows, -1)
        return np.ascontiguousarray(block[:, order, :]).reshape(-1)


# -------------------------------------------------------------------------------------------------
# Meta <-> HF name maps


_LAYER_MAP = {  # Meta name -> (HF name, how model-parallel parts join: 0, 1 or None for replicated)
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def _name_map(n_layers: int) -> list[tuple[str, str, int | None]]:
    """``(meta name, hf name, join axis)`` in HF's order: embedding, layers, norm, head."""
    pairs = [("tok_embeddings.weight", *_TOP_MAP["tok_embeddings.weight"])]
    for i in range(n_layers):
        pairs += [(f"layers.{i}.{m}", f"model.layers.{i}.{h}", axis) for m, (h, axis) in _LAYER_MAP.items()]
    pairs += [("norm.weight", *_TOP_MAP["norm.weight"]), ("output.weight", *_TOP_MAP["output.weight"])]
    return pairs


@dataclass(frozen=True)
class _LlamaShape:
    dim: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def checked(cls, where: Path, fields: dict[str, Any], names: tuple[str, str, str, str]) -> _LlamaShape:
        """A shape from a config's ``names`` (dim, heads, KV heads, layers), each a positive integer in
        range, the heads dividing the width and the KV heads dividing the heads; refused by field."""
        values = []
        for name, cap in zip(names, (1 << 20, 1 << 14, 1 << 14, _MAX_LAYERS), strict=True):
            value = fields.get(name)
            if name == names[2] and value is None:
                value = fields.get(names[1])  # no KV heads given: as many as query heads
            if type(value) is not int or not 0 < value <= cap:
                raise FormatError(f"{where}: {name} must be an integer from 1 to {cap}, not {value!r:.40}", path=where)
            values.append(value)
        dim, heads, kv_heads, layers = values
        if dim % heads or heads % kv_heads:
            raise FormatError(
                f"{where}: {names[1]} {heads} must divide {names[0]} {dim}, and {names[2]} {kv_heads} must divide "
                f"{names[1]}",
                path=where,
            )
        return cls(dim, heads, kv_heads, layers)


# LLaMA 3.1 405B has 126 layers; a config asking for more than this describes no checkpoint.
_MAX_LAYERS = 4096


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_regular_text(path))  # a FIFO in its place is refused, never waited on
    except InputNotFoundError as e:
        raise InputNotFoundError(f"{path} is missing", path=path) from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: cannot read: {e}", path=path) from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: not a JSON object", path=path)
    return data


def _shape_from_params(path: Path) -> _LlamaShape:
    params = _read_json(path)
    params = params.get("model", params)
    if not isinstance(params, dict):
        raise FormatError(f"{path}: 'model' is not an object", path=path)
    return _LlamaShape.checked(path, params, ("dim", "n_heads", "n_kv_heads", "n_layers"))


def _check_checklist(folder: Path) -> None:
    """Meta's ``checklist.chk`` lists an md5 per file: check them all before trusting the shards."""
    checklist = folder / "checklist.chk"
    if not checklist.is_file():
        return
    for name, expected in read_checksum_file(checklist).items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise InputNotFoundError(f"{checklist} lists {name!r}, which is missing", path=path)
        actual = file_hexdigest(path, algorithm_of(expected))
        if actual != expected:
            raise IntegrityError(
                f"{path}: md5 {actual} differs from checklist.chk's {expected}: the download is corrupt",
                path=path,
                expected=expected,
                actual=actual,
            )


def _meta_shards(folder: Path) -> list[dict[str, TensorInfo]]:
    numbered = sorted((int(m[1]), p) for p in folder.iterdir() if (m := _META_FILE.match(p.name)))
    if not numbered:
        raise UnsupportedInputError(f"{folder} holds no consolidated.NN.pth", path=folder)
    for expected, (index, _) in enumerate(numbered):
        if index != expected:
            missing = folder / f"consolidated.{expected:02d}.pth"
            raise InputNotFoundError(
                f"{missing.name} is missing from {folder}: the checkpoint is incomplete", path=missing
            )
    return [read_torch_zip(path) for _, path in numbered]


def _meta_to_hf(folder: Path) -> tuple[list[tuple[str, _Rows]], _LlamaShape]:
    shape = _shape_from_params(folder / "params.json")
    shards = _meta_shards(folder)
    sources: list[tuple[str, _Rows]] = []
    for meta_name, hf_name, axis in _name_map(shape.layers):
        parts: list[_Rows] = []
        for i, shard in enumerate(shards):
            if meta_name not in shard:
                raise FormatError(
                    f"consolidated.{i:02d}.pth lacks {meta_name!r}", path=folder / f"consolidated.{i:02d}.pth"
                )
            parts.append(_Whole(shard[meta_name]))
        if meta_name == "tok_embeddings.weight" and len(parts) > 1 and parts[0].shape[1] == shape.dim:
            axis = 0  # Llama 3 splits the embedding by rows, Llama 1 and 2 by columns
        rows: _Rows = parts[0] if axis is None or len(parts) == 1 else _Concat(tuple(parts), axis)
        if len(rows.shape) == 2 and meta_name != "output.weight" and shape.dim not in rows.shape:
            raise FormatError(
                f"{meta_name} is {list(rows.shape)} across {len(shards)} shard(s), which params.json's dim "
                f"{shape.dim} does not fit: a shard is missing or params.json is for another model",
                path=folder,
                tensor=meta_name,
            )
        if meta_name.endswith(("wq.weight", "wk.weight")):
            heads = shape.heads if "wq" in meta_name else shape.kv_heads
            if rows.shape[0] != heads * shape.head_dim:
                raise FormatError(
                    f"{meta_name} has {rows.shape[0]} rows across {len(shards)} shard(s), params.json implies "
                    f"{heads * shape.head_dim}: a shard is missing or params.json is for another model",
                    path=folder,
                    tensor=meta_name,
                )
            rows = _Rotary(rows, heads, to_hf=True)
        sources.append((hf_name, rows))
    _refuse_unmapped(shards[0], {m for m, _, _ in _name_map(shape.layers)}, ("rope.freqs",), folder)
    return sources, shape


def _refuse_unmapped(tensors: dict[str, TensorInfo], mapped: set[str], ignored: tuple[str, ...], where: Path) -> None:
    """A tensor the conversion has no place for would silently vanish: refuse instead."""
    extra = sorted(n for n in tensors if n not in mapped and not n.endswith(ignored))
    if extra:
        raise UnsupportedInputError(
            f"{where}: tensor {extra[0]!r} has no counterpart in the other layout ({len(extra)} such); "
            "this converter knows LLaMA-architecture checkpoints only",
            path=where,
            tensor=extra[0],
        )


def _hf_shape(config: dict[str, Any], folder: Path) -> _LlamaShape:
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    return _LlamaShape.checked(folder / "config.json", config, names)


def _hf_to_meta(
    tensors: dict[str, TensorInfo], shape: _LlamaShape, shards: int, root: Path
) -> list[list[tuple[str, _Rows]]]:
    if shape.heads % shards or shape.kv_heads % shards:
        raise UnsupportedInputError(f"{shape.heads} heads do not split into {shards} model-parallel shards")
    out: list[list[tuple[str, _Rows]]] = [[] for _ in range(shards)]
    for meta_name, hf_name, axis in _name_map(shape.layers):
        info = tensors.get(hf_name)
        if info is None:
            raise UnsupportedInputError(f"the checkpoint lacks {hf_name!r}: not a LLaMA model", tensor=hf_name)
        whole = _Whole(info)
        if axis is not None and info.shape[axis] % shards:
            raise UnsupportedInputError(
                f"{hf_name!r} has {info.shape[axis]} along dimension {axis}, which does not split into "
                f"{shards} model-parallel shards",
                tensor=hf_name,
            )
        for s in range(shards):
            part: _Rows = whole
            if axis is not None and shards > 1:
                size = info.shape[axis] // shards
                part = _Slice(whole, axis, s * size, (s + 1) * size)
            if meta_name.endswith(("wq.weight", "wk.weight")):
                heads = shape.heads if "wq" in meta_name else shape.kv_heads
                part = _Rotary(part, heads // shards, to_hf=False)
            out[s].append((meta_name, part))
    _refuse_unmapped(tensors, {h for _, h, _ in _name_map(shape.layers)}, ("rotary_emb.inv_freq",), root)
    return out


# -------------------------------------------------------------------------------------------------
# Streaming


def _row_blocks(rows: _Rows) -> Iterator[tuple[int, int]]:
    count, width = _rows_and_width(rows.shape)
    step = max(1, CHUNK_BYTES // max(1, width * itemsize(rows.dtype)))
    if isinstance(rows, _Rotary):
        step = max(rows.head_rows, step // rows.head_rows * rows.head_rows)
    if count == 0:
        yield 0, 0
    for first in range(0, count, step):
        yield first, min(count, first + step)


def _convert_rows(reader: RangeReader, rows: _Rows, first: int, last: int, dtype: str) -> Bytes:
    data = rows.read(reader, first, last) if last > first else np.empty(0, dtype=np.uint8)
    return cast_bits(data, rows.dtype, dtype) if dtype != rows.dtype else data


def _out_dtype(rows: _Rows, dtype: str | None) -> str:
    return dtype if dtype is not None and is_float(rows.dtype) else rows.dtype


def _write_hf(
    reader: RangeReader,
    sources: Sequence[tuple[str, _Rows]],
    folder: Path,
    dtype: str | None,
    shard_size: int,
    bar: ProgressBar,
) -> tuple[list[TensorSpec], list[str], int]:
    specs = [TensorSpec(name, _out_dtype(rows, dtype), rows.shape) for name, rows in sources]
    blocks = [list(_row_blocks(rows)) for _, rows in sources]

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
    shards: Sequence[Sequence[tuple[str, _Rows]]],
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
                blocks = (_convert_rows(reader, rows, a, b, spec.dtype) for a, b in _row_blocks(rows))
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


def _hf_config(shape: _LlamaShape, params: dict[str, Any], sources: Sequence[tuple[str, _Rows]], dtype: str) -> str:
    by_name = dict(sources)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.dim,
        "intermediate_size": by_name["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "num_hidden_layers": shape.layers,
        "rms_norm_eps": params.get("norm_eps", 1e-6),
        "rope_theta": params.get("rope_theta", 10000.0),
        "max_position_embeddings": params.get("max_seq_len", 2048),
        "vocab_size": by_name["model.embed_tokens.weight"].shape[0],
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {v: k for k, v in DTYPE_NAMES.items()}.get(dtype, "float16"),
    }
    if config["vocab_size"] <= _SENTENCEPIECE_VOCAB_MAX:  # Llama 1 and 2; Llama 3's tokenizer is another kind
        config |= {"bos_token_id": 1, "eos_token_id": 2}
    return json.dumps(config, indent=2) + "\n"


_SENTENCEPIECE_VOCAB_MAX = 65536
_LLAMA_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
}


def convert(
    source: str | Path,
    out: str | Path,
    *,
    to: str = "hf",
    dtype: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    meta_shards: int | None = None,
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
        replace: replace an existing folder at ``out`` once the new one is complete (until then the old
            one stays as it was).

    Raises:
        IntegrityError: a file disagrees with Meta's ``checklist.chk``.
        FormatError: a shard is missing or ``params.json`` does not match the tensors.
    """
    source, out = Path(source), Path(out)
    check_output_free(out, replace=replace)
    if to not in ("hf", "meta"):
        raise UnsupportedInputError(f"unknown target layout {to!r}; choose hf or meta")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UnsupportedInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    out_dtype = DTYPE_NAMES[dtype] if dtype else None
    is_meta = source.is_dir() and (source / "params.json").is_file() and any(source.glob("consolidated.*.pth"))
    files: dict[str, Path | str] = {}  # output name -> a file to copy, or text to write

    if is_meta:
        if to == "meta":
            raise UnsupportedInputError(f"{source} is already a Meta checkpoint; convert to hf, or reshard as hf")
        _check_checklist(source)
        sources, shape = _meta_to_hf(source)
        params = _read_json(source / "params.json")
        first_dtype = out_dtype or sources[0][1].dtype
        files["config.json"] = _hf_config(shape, params.get("model", params), sources, first_dtype)
        files["generation_config.json"] = json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
        if (source / "tokenizer.model").is_file():
            files["tokenizer.model"] = source / "tokenizer.model"
            if dict(sources)["model.embed_tokens.weight"].shape[0] <= _SENTENCEPIECE_VOCAB_MAX:
                files["tokenizer_config.json"] = json.dumps(_LLAMA_TOKENIZER_CONFIG, indent=2) + "\n"
        meta_out: list[list[tuple[str, _Rows]]] | None = None
    else:
        ckpt = open_checkpoint(source)
        sources = [(name, _Whole(info)) for name, info in ckpt.tensors.items()]
        files.update({rel: ckpt.root / rel for rel in ckpt.extra_files})
        meta_out = None
        if to == "meta":
            config = _read_json(ckpt.root / "config.json")
            shape = _hf_shape(config, ckpt.root)
            if meta_shards is not None and meta_shards < 1:
                raise UnsupportedInputError(f"meta_shards must be at least 1, not {meta_shards}")
            count = meta_shards or _META_SHARDS.get(shape.dim, 1)
            meta_out = _hf_to_meta(ckpt.tensors, shape, count, ckpt.root)
            params = {
                "dim": shape.dim,
                "multiple_of": 256,
                "n_heads": shape.heads,
                "n_layers": shape.layers,
                "norm_eps": config.get("rms_norm_eps", 1e-6),
                "vocab_size": -1,
            }
            if shape.kv_heads != shape.heads:
                params["n_kv_heads"] = shape.kv_heads
            if config.get("rope_theta", 10000.0) != 10000.0:
                params["rope_theta"] = config["rope_theta"]
            files = {"params.json": json.dumps(params) + "\n"}
            if (ckpt.root / "tokenizer.model").is_file():
                files["tokenizer.model"] = ckpt.root / "tokenizer.model"
        elif out_dtype is not None and "config.json" in files:
            config = _read_json(ckpt.root / "config.json")
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
