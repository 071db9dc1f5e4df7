"""GGUF for llama.cpp: a LLaMA checkpoint, or a fine-tune rebuilt from its delta, streamed into one GGUF file.

llama.cpp's own Python package ``gguf`` writes the file (header, metadata, tensor index) and quantizes
(its numpy quantizers are bit-identical to llama.cpp's reference C ones). This module decides what goes
in, the way llama.cpp's ``convert_hf_to_gguf.py`` does for a LLaMA model: tensor names, the q/k rows put
back in Meta's rotary order, each tensor's type, the hyperparameters, the SentencePiece vocabulary and the
special tokens; what is the family's own (architecture, defaults, shapes) comes from
:mod:`deltakit.families`. Tensors go through in row blocks, so memory stays bounded; from a delta, each
tensor is checked against the manifest's digest before a byte of it is converted. K-quants (``q4_k_m``...)
need llama.cpp's C quantizer, which the ``kquants`` extra installs. docs/GGUF.md says where the output differs
from llama.cpp's and why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import re
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codecs import Bytes
from .convert import torch_dtype_name
from .dtypes import itemsize
from .errors import DeltakitError, FormatError, InputNotFoundError, IntegrityError, UnsupportedInputError
from .families import FAMILIES, Family, family_of, llama, llama3
from .files import json_object, read_regular, require_regular
from .formats.checkpoint import RangeReader, open_checkpoint
from .formats.delta import FILES_DIR
from .formats.safetensors import TensorInfo
from .progress import ProgressBar, ProgressFactory, no_progress
from .rows import Rotary, Rows, Whole, row_blocks, rows_and_width
from .staging import StagedFile, check_free_space

if TYPE_CHECKING:  # gguf is imported where it is used: it costs a CLI start some 70 ms
    import gguf as gguf_module

    from .engine.apply import ApplyPlan

__all__ = ["KQUANTS", "QUANTS", "GGUFCheck", "GGUFReport", "apply_to_gguf", "check_gguf", "convert_to_gguf"]

log = logging.getLogger(__name__)

# GGUF types, by llama.cpp's names. These are made here, in numpy, with gguf's quantizers ...
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# ... and these by llama.cpp's C quantizer (llama_model_quantize), from a GGUF of the source's own precision.
KQUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
KQUANTS_EXTRA = "pip install 'deltakit-llm[kquants]'"
_NARROW = ("q4_0", "q4_1", "q5_0", "q5_1")

# The files of a model folder that the GGUF's metadata and vocabulary are read from.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "README.md",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
# ... and those of them that hold JSON, each of which must be one object.
_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.json",
)
# The file each kind of vocabulary (a family's ``vocabulary``) is read from.
_VOCABULARY_FILES = {"sentencepiece": "tokenizer.model", "bpe": "tokenizer.json"}
_AHEAD = 2  # blocks encoded ahead of the one being written: both cores busy, a few blocks in memory
_FILE_LIMIT = 64 << 20  # the largest metadata file read (LLaMA's tokenizer.json: 1.8 MB)
_CARD_YAML_LIMIT = 1 << 20  # a model card's YAML front matter (real ones: a few KiB)
_CARD_YAML_NODES = 100_000
_TICK = 4096  # tokens between progress ticks, through which a job's cancellation arrives
# A folder name llama.cpp reads a model's name from: anything else becomes "model".
_FOLDER_NAME = re.compile(r"^[\w.+-][\w .+-]{0,127}$")


@dataclass(frozen=True)
class GGUFReport:
    """What was written: ``types`` counts tensors per GGUF type (``Q8_0``: 154, ``F32``: 65...)."""

    out: Path
    quant: str
    source_kind: str
    tensors: int
    bytes_written: int
    types: dict[str, int]


# -------------------------------------------------------------------------------------------------
# What goes in: hyperparameters, tensors and their types


@dataclass(frozen=True)
class _Field:
    """One field of config.json (or of its rope object): its JSON type and, for numbers, its bounds.

    ``kind``: ``int`` (an integer, never a bool), ``number`` (an int or a finite float; ``low`` is
    exclusive when ``open_low``), ``str``, ``strings`` (a list of strings), ``object``, or ``token``
    (an id: when an integer, not negative; any other value is ignored, as llama.cpp ignores it).
    """

    name: str
    kind: str
    low: float = 0
    high: float = 0
    open_low: bool = False
    required: bool = False


_U32 = 2**32 - 1
# config.json as deltakit's GGUF writer reads it. Absent (or null) optional fields take transformers'
# LlamaConfig defaults (_Hparams.of). The caps are far above any released LLaMA-family model's and
# keep a hostile config from asking for billions of anything; tensors are checked against them after.
_CONFIG_FIELDS = (
    _Field("hidden_size", "int", 1, 1 << 20, required=True),
    _Field("intermediate_size", "int", 1, 1 << 22, required=True),
    _Field("num_attention_heads", "int", 1, 1 << 14, required=True),
    _Field("num_hidden_layers", "int", 1, llama.MAX_LAYERS, required=True),
    _Field("num_key_value_heads", "int", 1, 1 << 14),
    _Field("head_dim", "int", 1, 1 << 16),
    _Field("vocab_size", "int", 1, 1 << 24),
    _Field("max_position_embeddings", "int", 1, _U32),
    _Field("rms_norm_eps", "number", 0, 1, open_low=True),
    _Field("rope_theta", "number", 0, 1e30, open_low=True),
    _Field("architectures", "strings"),
    _Field("model_type", "str"),
    _Field("rope_scaling", "object"),
    _Field("rope_parameters", "object"),
    _Field("text_config", "object"),
    *(_Field(f"{kind}_token_id", "token") for kind in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")),
)
_ROPE_FIELDS = (
    _Field("rope_type", "str"),
    _Field("type", "str"),
    _Field("rope_theta", "number", 0, 1e30, open_low=True),
    _Field("factor", "number", 0, 1e6, open_low=True),
    _Field("original_max_position_embeddings", "int", 1, _U32),
    *(
        _Field(name, "number", -1e6, 1e6)
        for name in ("extrapolation_factor", "attention_factor", "attn_factor", "beta_fast", "beta_slow")
    ),
    _Field("low_freq_factor", "number", 0, 1e6, open_low=True),
    _Field("high_freq_factor", "number", 0, 1e6, open_low=True),
)
_KINDS = {
    "int": "an integer",
    "number": "a finite number",
    "str": "a string",
    "strings": "a list of strings",
    "object": "an object",
    "token": "a token id",
}


def _check_fields(data: dict[str, Any], fields: Sequence[_Field], where: Path, prefix: str = "") -> None:
    """Refuse the first field of ``data`` that breaks its entry in ``fields``, naming the file, the field
    and what was found."""
    for f in fields:
        value = data.get(f.name)
        if value is None:
            if f.required:
                raise FormatError(f"{where}: {prefix}{f.name} is missing; {_KINDS[f.kind]} is required", path=where)
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        number = is_int or (isinstance(value, float) and math.isfinite(value))
        if f.kind == "int":
            ok = is_int and f.low <= value <= f.high
        elif f.kind == "number":
            ok = number and (f.low < value if f.open_low else f.low <= value) and value <= f.high
        elif f.kind == "token":
            ok = not is_int or 0 <= value <= _U32
        elif f.kind == "str":
            ok = isinstance(value, str)
        elif f.kind == "strings":
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, dict)
        if not ok:
            bounds = ""
            if f.kind == "int":
                bounds = f" from {int(f.low)} to {int(f.high)}"
            elif f.kind == "number":
                bounds = f" {'above' if f.open_low else 'from'} {f.low:g} {'up ' if f.open_low else ''}to {f.high:g}"
            elif f.kind == "token":
                bounds = " (an integer from 0), or no integer at all"
            found = json.dumps(value)[:40] if _jsonable(value) else repr(value)[:40]
            raise FormatError(
                f"{where}: {prefix}{f.name} must be {_KINDS[f.kind]}{bounds}, not {found}",
                path=where,
                expected=f"{_KINDS[f.kind]}{bounds}",
                actual=value,
            )


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class _Hparams:
    """config.json as transformers' LlamaConfig reads it (its defaults filled in), which is what
    llama.cpp's converter reads; ``where`` is the file as the user knows it."""

    config: dict[str, Any]
    where: Path
    family: Family
    head_dim_key: bool = True  # key_length and value_length are written, as llama.cpp's converter writes them

    @classmethod
    def of(cls, config: dict[str, Any], where: Path) -> _Hparams:
        """Check every field the GGUF is made from against ``_CONFIG_FIELDS``, in one place, before
        anything is planned."""
        _check_fields(config, _CONFIG_FIELDS, where)
        family = family_of(config)
        if family is None:
            arch = (config.get("architectures") or [None])[0]
            known = ", ".join(f.architectures[0] for f in FAMILIES)
            raise UnsupportedInputError(
                f"{where}: architecture {arch!r} is not LLaMA or a kin deltakit knows; deltakit writes GGUF "
                f"for {known} only",
                path=where,
            )
        hp = dict(config)
        if "num_key_value_heads" in hp and hp["num_key_value_heads"] is None:  # null, not absent: as transformers
            hp["num_key_value_heads"] = hp["num_attention_heads"]  # reads it, before a family's default of 8
        for key, default in family.config_defaults:  # transformers' defaults, where the file leaves them out
            if hp.get(key) is None:
                hp[key] = default
        if hp.get("num_key_value_heads") is None:
            hp["num_key_value_heads"] = hp["num_attention_heads"]
        head_dim_key = family.head_dim_stated or hp.get("head_dim") is not None
        if hp.get("head_dim") is None:
            hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
        rope_key = "rope_parameters" if hp.get("rope_parameters") else "rope_scaling"
        rope = dict(hp.get(rope_key) or {})
        _check_fields(rope, _ROPE_FIELDS, where, f"{rope_key}.")
        rope.setdefault("rope_theta", hp.get("rope_theta", 10000.0))
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        if rope.get("rope_type") == "llama3" and not family.extra_tensors({**hp, "rope_parameters": rope}):
            raise UnsupportedInputError(
                f"{where}: llama3 rope scaling is Llama 3's, and this config is not of a family deltakit writes it for",
                path=where,
            )
        if rope.get("rope_type") == "llama3":
            _check_fields(rope, (_Field("original_max_position_embeddings", "int", 1, _U32),), where, f"{rope_key}.")
        if rope.get("rope_type") == "yarn" and rope.get("factor") is not None:
            _check_fields(rope, (_Field("original_max_position_embeddings", "int", 1, _U32, required=True),), where,
                          f"{rope_key}.")  # fmt: skip
        hp["rope_parameters"] = rope
        heads, kv = hp["num_attention_heads"], hp["num_key_value_heads"]
        if heads % kv:
            raise FormatError(f"{where}: num_key_value_heads {kv} must divide {heads} heads", path=where)
        if hp["head_dim"] % 2:
            raise FormatError(f"{where}: head_dim {hp['head_dim']} must be even (rotary pairs)", path=where)
        return cls(hp, where, family, head_dim_key)

    def __getitem__(self, key: str) -> Any:
        return self.config[key]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _check_tensors(sources: Sequence[tuple[str, Rows]], hp: _Hparams) -> None:
    """Every hyperparameter bounded by the tensors actually present: the layers config.json counts are
    the layers there are, and each tensor has the shape the config gives it (llama.cpp would refuse
    the file when loading it, or read it wrong)."""
    where = hp.where
    layers = {int(m[1]) for name, _ in sources if (m := _LAYER.match(name))}
    if layers != set(range(hp["num_hidden_layers"])):
        raise FormatError(
            f"{where}: num_hidden_layers {hp['num_hidden_layers']} differs from the checkpoint's layers "
            f"({len(layers)}, numbered {min(layers, default=0)} to {max(layers, default=-1)})",
            path=where,
            expected=hp["num_hidden_layers"],
            actual=len(layers),
        )
    e, f, v, d = hp["hidden_size"], hp["intermediate_size"], hp["vocab_size"], hp["head_dim"]
    wanted = hp.family.tensor_shapes(hp.config)
    shapes = dict((name, rows.shape) for name, rows in sources)
    if "model.embed_tokens.weight" not in shapes:
        raise FormatError(
            f"{where}: vocab_size {v} and hidden_size {e} describe model.embed_tokens.weight, which the "
            "checkpoint does not hold",
            path=where,
            tensor="model.embed_tokens.weight",
        )
    for name, shape in sorted(shapes.items(), key=lambda item: item[0] != "model.embed_tokens.weight"):
        key = name[m.end() :] if (m := _LAYER.match(name)) else name
        expected = wanted.get(key)
        if expected is None or tuple(shape) == expected:
            continue
        if key in ("model.embed_tokens.weight", "lm_head.weight") and len(shape) == 2 and shape[1] == e:
            message = f"{where}: vocab_size {v} differs from the {shape[0]} rows of {name!r}"
        else:
            message = (
                f"{where}: {name!r} is {list(shape)}; hidden_size {e}, intermediate_size {f}, vocab_size {v}, "
                f"{hp['num_attention_heads']} heads ({hp['num_key_value_heads']} KV) of head_dim {d} make it "
                f"{list(expected)}"
            )
        raise FormatError(message, path=where, tensor=name, expected=expected, actual=tuple(shape))


@dataclass(frozen=True)
class _Planned:
    """One tensor of the GGUF: its name there, its rows in the order llama.cpp stores them, its type."""

    name: str
    source: str  # the checkpoint's name for it
    rows: Rows
    qtype: gguf_module.GGMLQuantizationType
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape


def _qtype(name: str, shape: tuple[int, ...], quant: str, *, head: bool) -> gguf_module.GGMLQuantizationType:
    """llama.cpp's choice (convert_hf_to_gguf.py prepare_tensors): 1-D tensors, norms and non-weights
    stay F32; the rest take the requested type, or F16 where a row does not split into its blocks.

    ``head``: the output projection (or, tied, the embedding), which llama.cpp's quantizer keeps finer
    than the 4- and 5-bit types: Q6_K there, which needs its C quantizer; Q8_0 here, as llama.cpp does
    itself where Q6_K's 256-wide blocks do not fit.
    """
    import gguf as g

    q = g.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    wanted = q.Q8_0 if head and quant in _NARROW else q[quant.upper()]
    block, _ = g.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        log.warning("%s: rows of %d do not split into %s blocks of %d; written as F16", name, shape[-1], quant, block)
        return q.F16
    return wanted


def _nbytes(shape: tuple[int, ...], qtype: gguf_module.GGMLQuantizationType) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(math.prod(shape) // block * size)


def _plan(sources: Sequence[tuple[str, Rows]], hp: _Hparams, quant: str, *, meta_order: bool) -> list[_Planned]:
    """The GGUF's tensors, in ``sources``' order; ``meta_order``: q/k rows are in Meta's rotary order
    already (a Meta checkpoint), else they are put back in it as llama.cpp does."""
    import gguf as g

    _check_tensors(sources, hp)  # before the name map, whose size follows num_hidden_layers
    names = g.get_tensor_name_map(g.MODEL_ARCH[hp.family.gguf_arch], hp["num_hidden_layers"])
    tied = not any(source == "lm_head.weight" for source, _ in sources)
    planned = []
    for extra, values in hp.family.extra_tensors(hp.config):  # computed from the config, first in the file
        held = _Held(np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint8), "F32", values.shape)
        qtype = _qtype(extra, held.shape, quant, head=False)
        planned.append(_Planned(extra, extra, held, qtype, _nbytes(held.shape, qtype)))
    for source, rows in sources:
        if source.endswith(hp.family.dropped):
            continue
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedInputError(
                f"tensor {source!r} has no place in a LLaMA GGUF; deltakit converts LLaMA-family models only",
                tensor=source,
            )
        if rows.dtype not in ("F16", "BF16", "F32"):
            raise UnsupportedInputError(f"tensor {source!r} is {rows.dtype}; GGUF conversion takes float tensors")
        rotary = hp.family.rotary_permute
        if rotary and source.endswith(("q_proj.weight", "k_proj.weight")) and not meta_order:
            heads = hp["num_attention_heads"] if "q_proj" in source else hp["num_key_value_heads"]
            rows = Rotary(rows, heads, to_hf=False)
        elif rotary and source.endswith(("q_proj.bias", "k_proj.bias")):
            raise UnsupportedInputError(f"tensor {source!r}: q/k biases are not LLaMA's", tensor=source)
        head = name == ("token_embd.weight" if tied else "output.weight")
        qtype = _qtype(name, rows.shape, quant, head=head)
        planned.append(_Planned(name, source, rows, qtype, _nbytes(rows.shape, qtype)))
    return planned


def _encode(block: Bytes, dtype: str, rows: int, width: int, qtype: gguf_module.GGMLQuantizationType) -> Bytes:
    """``rows`` rows of ``width`` elements in GGUF's type: widened to float32 where llama.cpp does (bf16
    always, exactly), then gguf's own quantize."""
    import gguf

    if dtype == "BF16":
        values = (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = block.view(np.float16 if dtype == "F16" else np.float32)
    data = gguf.quants.quantize(values.reshape(rows, width), qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _blocks(reader: RangeReader, t: _Planned, pool: ThreadPoolExecutor) -> Iterator[Bytes]:
    """The tensor in GGUF's type, a block of whole rows at a time (quantization blocks never cross rows),
    encoded on ``pool``'s threads a few blocks ahead (numpy lets go of the GIL), yielded in order."""
    _, width = rows_and_width(t.shape)
    ahead: deque[Future[Bytes]] = deque()
    for first, last in row_blocks(t.rows):
        if last > first:
            data = t.rows.read(reader, first, last)
            ahead.append(pool.submit(_encode, data, t.rows.dtype, last - first, width, t.qtype))
            if len(ahead) > _AHEAD:
                yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


# -------------------------------------------------------------------------------------------------
# Metadata and vocabulary, in the order llama.cpp's converter writes them


def _vocab_sentencepiece(
    files: _Files, vocab_size: int, bar: ProgressBar
) -> tuple[list[bytes], list[float], list[int]]:
    """llama.cpp's ``_create_vocab_sentencepiece``: the SentencePiece pieces, ids past them as
    ``[PAD{id}]``, then added_tokens.json and tokenizer_config.json's added_tokens_decoder over them."""
    from gguf import TokenType as types  # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
    from sentencepiece import SentencePieceProcessor

    folder, shown = files.folder, files.show("tokenizer.model")
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise InputNotFoundError(
            f"{shown} is missing: a LLaMA GGUF carries the SentencePiece vocabulary, and deltakit reads it from "
            "tokenizer.model",
            path=shown,
        )
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{shown}: not a SentencePiece model ({str(e).replace(str(path), str(shown))})",
                          path=shown) from e  # fmt: skip
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    kinds = [int(types.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        if i % _TICK == 0:
            bar.update(0)  # a job's cancellation arrives through its bar
        kind = types.NORMAL
        if sp.IsUnknown(i):
            kind = types.UNKNOWN
        elif sp.IsControl(i):
            kind = types.CONTROL
        elif sp.IsUnused(i):
            kind = types.UNUSED
        elif sp.IsByte(i):
            kind = types.BYTE
        tokens[i], scores[i], kinds[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), int(kind)
    added = folder / "added_tokens.json"
    if added.is_file():
        for text, i in _json_file(files, "added_tokens.json").items():
            if type(i) is int and 0 <= i < vocab_size:
                tokens[i], scores[i], kinds[i] = text.encode(), -1000.0, int(types.USER_DEFINED)
    config = folder / "tokenizer_config.json"
    decoder = _json_file(files, "tokenizer_config.json").get("added_tokens_decoder", {}) if config.is_file() else {}
    for key, token in (decoder if isinstance(decoder, dict) else {}).items():
        i = int(key) if str(key).isdecimal() else -1
        if not 0 <= i < vocab_size or not isinstance(token, dict) or not isinstance(token.get("content"), str):
            continue
        content: str = token["content"]
        if token.get("special") or _looks_special(content):
            kinds[i] = int(types.CONTROL)
        else:
            content = content.replace("\u2581", " ")
            kinds[i] = int(types.USER_DEFINED)
        tokens[i], scores[i] = content.encode(), -1000.0
    return tokens, scores, kinds


# llama.cpp's check text (convert_hf_to_gguf.py, get_vocab_base_pre): the SHA-256 of the ids a tokenizer
# gives it names the pre-tokenizer llama.cpp must split text with.
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple "
    "emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3"
    "\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "\x27\x27\x27\x27\x27\x27```````\x22\x22\x22\x22......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The entries of llama.cpp's table (get_vocab_base_pre) for the tokenizers of the families deltakit writes.
_PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3's first tokenizer.json
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
}


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``, which its decode applies where tokenizer_config.json asks."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


def _vocab_bpe(files: _Files, hp: _Hparams, bar: ProgressBar) -> tuple[list[str], list[int], str]:
    """llama.cpp's ``get_vocab_base`` for a byte-level BPE tokenizer.json: every id up to config.json's
    vocab_size (``[PAD{id}]``, UNUSED, where the tokenizer has none), added tokens CONTROL when special
    or special-looking and USER_DEFINED otherwise, and the pre-tokenizer's name from the ids the
    tokenizer gives llama.cpp's check text; one llama.cpp would not recognise, or not as this family's,
    is refused."""
    from gguf import TokenType as types
    from tokenizers import Tokenizer

    shown, path = files.show("tokenizer.json"), files.folder / "tokenizer.json"
    family = hp.family
    if not path.is_file():
        raise InputNotFoundError(
            f"{shown} is missing: a {family.name} GGUF carries the BPE vocabulary, and deltakit reads it from "
            "tokenizer.json",
            path=shown,
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the Rust library's panics are BaseExceptions
        raise FormatError(f"{shown}: not a tokenizer the tokenizers library reads ({str(e)[:200]})", path=shown) from e
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = hp["vocab_size"]
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise FormatError(
            f"{shown}: token id {top} is past config.json's vocab_size {vocab_size}",
            path=shown,
            expected=vocab_size,
            actual=top + 1,
        )
    ids = tokenizer.encode(_CHECK_TEXT).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    pre = _PRE_TOKENIZER_HASHES.get(digest)
    if pre not in family.pre_tokenizers:
        known = f"llama.cpp's {pre!r}" if pre else "no pre-tokenizer llama.cpp recognises"
        raise UnsupportedInputError(
            f"{shown}: this tokenizer splits text as {known} (check-text hash {digest[:16]}...), not as a "
            f"{family.name} tokenizer does ({', '.join(family.pre_tokenizers)}); deltakit writes the GGUF "
            "vocabularies llama.cpp's converter writes for the families it supports",
            path=shown,
            expected=family.pre_tokenizers,
            actual=pre,
        )
    config = _json_file(files, "tokenizer_config.json") if (files.folder / "tokenizer_config.json").is_file() else {}
    clean_up = config.get("clean_up_tokenization_spaces") is True
    decoder = tokenizer.get_added_tokens_decoder()
    added = {token.content for token in decoder.values()}
    reverse = {i: text for text, i in vocab.items()}
    tokens: list[str] = []
    kinds: list[int] = []
    for i in range(vocab_size):
        if i % _TICK == 0:
            bar.update(0)  # a job's cancellation arrives through its bar
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(int(types.UNUSED))
            continue
        kind = types.NORMAL
        if text in added and i in decoder:
            token = decoder[i]
            if not token.normalized:  # llama.cpp takes added tokens as the tokenizer round-trips them
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
                text = _clean_up_spaces(text) if clean_up else text
            if token.special or _looks_special(text):
                kind = types.CONTROL
            else:
                text, kind = text.replace("▁", " "), types.USER_DEFINED
        tokens.append(text)
        kinds.append(int(kind))
    return tokens, kinds, pre


def _post_processor_adds(special: gguf_module.SpecialVocab, files: _Files) -> None:
    """add_bos/add_eos as llama.cpp's own gguf-py decides them, which is newer than the gguf on PyPI:
    what tokenizer.json's post-processor adds wins over tokenizer_config.json's ``add_*_token``, and a
    ByteLevel processor means no BOS or EOS unless a template adds them."""
    tokenizer = _json_file(files, "tokenizer.json")
    config = _json_file(files, "tokenizer_config.json") if (files.folder / "tokenizer_config.json").is_file() else {}
    adds: dict[str, bool] = {}
    post = tokenizer.get("post_processor") or {}
    for processor in post.get("processors", [post]):
        kind = processor.get("type")
        if kind == "ByteLevel":
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            adds.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = processor.get("single", [])
            if len(single) > 1:
                if first := single[0].get("SpecialToken", {}).get("id"):
                    named = (config.get("bos_token"), config.get("cls_token"))
                    adds["bos"] = not config or first in named or not all(named)
                if single[-1].get("SpecialToken", {}).get("id"):
                    adds["eos"] = True
    merged = dict(adds)
    for kind, value in special.add_special_token.items():
        merged.setdefault(kind, value)
    special.add_special_token = merged


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _write_metadata(writer: gguf_module.GGUFWriter, hp: _Hparams, files: _Files, ftype: int, bar: ProgressBar) -> None:
    """Every key llama.cpp's converter writes for a LLaMA model, in its order (the tensor infos must
    be in ``writer`` already: the size label counts their parameters). ``files`` were checked as they
    were staged; what gguf's own readers still find wrong in them is refused naming them."""
    try:
        _write_metadata_unchecked(writer, hp, files, ftype, bar)
    except DeltakitError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as e:
        names = ", ".join(str(files.show(rel)) for rel in sorted(files.shown)) or str(files.folder)
        raise FormatError(
            f"the model's metadata files ({names}) do not read as llama.cpp's converter reads them: "
            f"{type(e).__name__}: {str(e)[:200]}",
            path=hp.where,
        ) from e
    finally:
        files.parsed.clear()  # the tensors need the memory more: a parsed tokenizer.json is some 100 MB


def _write_metadata_unchecked(
    writer: gguf_module.GGUFWriter, hp: _Hparams, files: _Files, ftype: int, bar: ProgressBar
) -> None:
    import gguf as g

    folder = files.folder
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = g.Metadata.load(None, folder, None, total)
    if metadata.name is None:
        metadata.name = folder.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = g.size_label(total, shared, expert, experts)
    writer.add_type(g.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)

    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp["num_key_value_heads"])
    rope = hp["rope_parameters"]
    factor = rope.get("factor")
    if rope.get("rope_type") == "linear" and factor is not None:
        writer.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope.get("rope_type") == "yarn" and factor is not None:
        writer.add_rope_scaling_type(g.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            value = rope.get(key, rope.get("attn_factor")) if key == "attention_factor" else rope.get(key)
            if value is not None:
                add(value)
    elif rope.get("rope_type") in ("su", "longrope"):
        writer.add_rope_scaling_type(g.RopeScalingType.LONGROPE)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.head_dim_key:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(ftype)
    llama_keys = hp.family.llama_keys  # LlamaModel's own; Qwen's are the generic TextModel's
    if llama_keys:
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_quantization_version(g.GGML_QUANT_VERSION)

    tokenizer_config = folder / "tokenizer_config.json"
    if llama_keys and tokenizer_config.is_file():
        space = _json_file(files, "tokenizer_config.json").get("add_prefix_space")
        if isinstance(space, bool):
            writer.add_add_space_prefix(space)
    if hp.family.vocabulary == "bpe":  # llama.cpp's _set_vocab_gpt2
        bpe_tokens, kinds, pre = _vocab_bpe(files, hp, bar)
        bar.update(0)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(bpe_tokens)
        writer.add_token_types(kinds)
        special = g.SpecialVocab(folder, load_merges=True)
        _post_processor_adds(special, files)
        special.add_to_gguf(writer, quiet=True)
    else:
        tokens, scores, kinds = _vocab_sentencepiece(files, hp["vocab_size"], bar)
        bar.update(0)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(kinds)
        g.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    if llama_keys and hp["vocab_size"] == 32016:  # CodeLlama's infill tokens, as llama.cpp marks them
        special = g.SpecialVocab(folder, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
        for kind, token in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            special._set_special_token(kind, token)
        special.add_to_gguf(writer, quiet=True)
    if llama_keys and hp["vocab_size"] == 49152:
        writer.add_add_bos_token(False)


# -------------------------------------------------------------------------------------------------
# Writing


def _ftype(quant: str) -> int:
    import gguf

    file_type: int = getattr(gguf.LlamaFileType, "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}")
    return file_type


def _check_quant(quant: str) -> None:
    """Refuse an unknown type, or a K-quant without llama.cpp's quantizer, before any work."""
    if quant in QUANTS:
        return
    if quant not in KQUANTS:
        raise UnsupportedInputError(
            f"unknown GGUF type {quant!r}; deltakit writes {', '.join(QUANTS + KQUANTS)}",
            expected=QUANTS + KQUANTS,
            actual=quant,
            argument="quant",
        )
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise UnsupportedInputError(
            f"GGUF type {quant} needs llama.cpp's own quantizer, which is not installed ({KQUANTS_EXTRA} builds "
            f"it); the types deltakit makes without it are {', '.join(QUANTS)}",
            actual=quant,
            argument="quant",
        ) from e


def _working_quant(quant: str, planned_dtypes: set[str]) -> str:
    """The precision a K-quant is made from: the source's own, so nothing is rounded twice."""
    if quant in QUANTS:
        return quant
    return "f32" if "F32" in planned_dtypes else "bf16" if "BF16" in planned_dtypes else "f16"


def _return_freed_memory() -> None:
    """Hand the heap the vocabulary held back to the system before the tensors' buffers are taken: a BPE
    vocabulary's hundreds of thousands of small objects leave glibc's heap fragmented, and without this
    its freed pages stay in the process's RSS beside the largest rebuilt tensor."""
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only; elsewhere nothing to do
            libc.malloc_trim(0)
    except OSError:
        pass


class _Stream:
    """The GGUF writer driven tensor by tensor: header, metadata and tensor index first, then each
    tensor's bytes in row blocks, padded as gguf pads them."""

    def __init__(self, path: Path, writer: gguf_module.GGUFWriter) -> None:
        self.writer = writer
        try:
            self.writer.write_header_to_file(path=path)
            self.writer.write_kv_data_to_file()
            self.writer.kv_data = [{} for _ in self.writer.kv_data]  # written: the vocabulary is let go
            self.writer.write_ti_data_to_file()
            _return_freed_memory()
            assert self.writer.fout is not None
            self.fout = self.writer.fout[0]
            self.writer.write_padding(self.fout, self.fout.tell())
        except BaseException:
            self.close()
            raise
        self.written = 0

    def tensor(self, t: _Planned, blocks: Iterator[Bytes], bar: ProgressBar) -> None:
        size = 0
        for block in blocks:
            self.fout.write(block.data)
            size += block.size
            bar.update(block.size)
        if size != t.nbytes:  # a bug, never the input's fault: the index already promised nbytes
            raise RuntimeError(f"{t.name}: wrote {size} bytes, the GGUF index says {t.nbytes}")
        self.writer.write_padding(self.fout, size)
        self.written += size

    def close(self) -> None:
        for fout in self.writer.fout or ():
            fout.close()


def _writer(prepared: _Prepared, bar: ProgressBar) -> gguf_module.GGUFWriter:
    """The GGUF's header, metadata and tensor index, in memory: everything a conversion refuses in its
    inputs is refused here, before a byte is written."""
    import gguf as g

    writer = g.GGUFWriter(path=None, arch=g.MODEL_ARCH_NAMES[g.MODEL_ARCH[prepared.hp.family.gguf_arch]])
    for t in prepared.planned:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    _write_metadata(writer, prepared.hp, prepared.files, _ftype(prepared.working), bar)
    return writer


# -------------------------------------------------------------------------------------------------
# The model's files: read once from where the user keeps them, checked, staged for gguf's readers


@dataclass(frozen=True)
class _Files:
    """The model's metadata files, staged in ``folder`` (the only copies gguf's readers see);
    ``shown`` maps each to the path the user knows it by, for messages; ``parsed``: the JSON ones as
    checked, so that tokenizer.json (7 to 9 MB for Llama 3 and Qwen) is parsed once, not by each reader."""

    folder: Path
    shown: dict[str, Path]
    parsed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def show(self, rel: str) -> Path:
        return self.shown.get(rel, self.folder / rel)


def _json_file(files: _Files, rel: str) -> dict[str, Any]:
    """A staged JSON file, already checked to be an object (not to be changed: it is shared)."""
    if rel not in files.parsed:
        files.parsed[rel] = json.loads((files.folder / rel).read_text(encoding="utf-8"))
    return files.parsed[rel]


def _check_tokenizer_json(tokenizer: dict[str, Any], shown: Path) -> None:
    """The parts of tokenizer.json gguf's SpecialVocab reads, of the types it reads them as."""

    def refuse(field: str, kind: str, value: object) -> FormatError:
        return FormatError(f"{shown}: {field} must be {kind}, not {json.dumps(value)[:40]}", path=shown)

    added = tokenizer.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise refuse("added_tokens", "a list of objects", added)
    for field in ("model", "post_processor"):
        if tokenizer.get(field) is not None and not isinstance(tokenizer[field], dict):
            raise refuse(field, "an object", tokenizer[field])
    post = tokenizer.get("post_processor") or {}
    processors = post.get("processors", [post])
    if not isinstance(processors, list) or not all(isinstance(p, dict) for p in processors):
        raise refuse("post_processor.processors", "a list of objects", processors)
    for processor in processors:
        for field in ("single", "pair", "cls", "sep"):
            items = processor.get(field)
            if items is None:
                continue
            if not isinstance(items, list) or (field in ("cls", "sep") and not items):
                raise refuse(f"post_processor's {field}", "a list", items)
            if field in ("single", "pair"):
                for item in items:
                    if not isinstance(item, dict) or not all(
                        isinstance(item.get(k, {}), dict) for k in ("SpecialToken", "Sequence")
                    ):
                        raise refuse(f"post_processor's {field}", "a list of SpecialToken/Sequence objects", items)


def _check_card(data: bytes, shown: Path) -> None:
    """A model card's YAML front matter, as gguf's Metadata reads it, parsed safely first: no aliases
    (which expand without bound), a bounded size and node count, and it must parse."""
    import yaml  # type: ignore[import-untyped]  # gguf depends on it; no stubs are installed

    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FormatError(f"{shown}: not UTF-8 text ({e})", path=shown) from e
    if not lines or lines[0] != "---":
        return
    front: list[str] = []
    for line in lines[1:]:
        if line == "---":
            break
        front.append(line)
    text = ("\n".join(front) + "\n").replace("- no\n", '- "no"\n').replace("\t", "  ")  # as gguf reads it
    if len(text) > _CARD_YAML_LIMIT:
        raise FormatError(
            f"{shown}: the model card's YAML front matter is {len(text)} bytes; deltakit reads at most "
            f"{_CARD_YAML_LIMIT}",
            path=shown,
        )

    class CardLoader(yaml.SafeLoader):  # type: ignore[misc]
        nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                raise FormatError(
                    f"{shown}: the model card's YAML front matter uses a YAML alias (*{anchor}), which can "
                    "expand without bound; deltakit reads cards without aliases",
                    path=shown,
                )
            CardLoader.nodes += 1
            if CardLoader.nodes > _CARD_YAML_NODES:
                raise FormatError(
                    f"{shown}: the model card's YAML front matter has more than {_CARD_YAML_NODES} nodes",
                    path=shown,
                )
            return super().compose_node(parent, index)

    try:
        yaml.load(text, Loader=CardLoader)  # a SafeLoader, which refuses aliases
    except yaml.YAMLError as e:
        raise FormatError(f"{shown}: the model card's YAML front matter does not parse: {e}", path=shown) from e
    except RecursionError as e:
        raise FormatError(f"{shown}: the model card's YAML front matter nests too deep", path=shown) from e


def _check_file(rel: str, data: bytes, shown: Path) -> dict[str, Any] | None:
    """Refuse a malformed file by name; returns a JSON file's object."""
    if rel in _JSON_FILES:
        value = json_object(data, shown)
        if rel == "tokenizer.json":
            _check_tokenizer_json(value, shown)
        return value
    if rel == "README.md":
        _check_card(data, shown)
    return None


def _read_limited(path: Path, size: int | None = None) -> bytes:
    """A regular file's bytes (a FIFO or device is refused, never waited on), at most _FILE_LIMIT."""
    st = require_regular(path)
    if st.st_size > _FILE_LIMIT:
        raise FormatError(
            f"{path} is {st.st_size} bytes; deltakit reads model metadata files of at most {_FILE_LIMIT}",
            path=path,
        )
    data = read_regular(path, limit=_FILE_LIMIT)
    if len(data) > _FILE_LIMIT:
        raise FormatError(f"{path} grew past {_FILE_LIMIT} bytes while read", path=path)
    return data


def _stage_files(folder: Path, files: dict[str, tuple[bytes, Path]]) -> _Files:
    """Check each file (``rel``: its bytes and the path it is shown as), then write it into ``folder``,
    where gguf's readers find it."""
    parsed = {}
    for rel, (data, shown) in files.items():
        value = _check_file(rel, data, shown)
        if value is not None:
            parsed[rel] = value
    folder.mkdir(parents=True)
    for rel, (data, _) in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return _Files(folder, {rel: shown for rel, (_, shown) in files.items()}, parsed)


def _model_folder(parent: Path, name: str) -> Path:
    """A folder under ``parent`` named as the model is: llama.cpp reads the model's name (and its size
    label, version...) from its folder's name, so the GGUF's metadata are what converting a folder of
    that name gives. A Hub id keeps its last part; a name that is no safe folder name becomes model."""
    name = name.rsplit("/", 1)[-1]
    if not _FOLDER_NAME.match(name) or name in (".", ".."):
        name = "model"
    return parent / "model-files" / name


def _space_needed(planned: Sequence[_Planned], quant: str) -> int:
    """The GGUF's bytes; for a K-quant, the working GGUF and the (smaller) quantized one side by side."""
    size = sum(t.nbytes for t in planned)
    return size if quant in QUANTS else 2 * size


def _quiet(level: int, text: bytes, user_data: object) -> None:
    pass


_QUIET: object = None


def _quantize_with_llama_cpp(source: Path, out: Path, quant: str) -> None:
    """llama.cpp's own quantizer (what ``llama-quantize`` runs), for the K-quants."""
    import llama_cpp

    global _QUIET
    if _QUIET is None:  # kept alive here: llama.cpp calls it long after this function returns
        _QUIET = llama_cpp.llama_log_callback(_quiet)
    llama_cpp.llama_log_set(_QUIET, None)  # its per-tensor log would bury deltakit's own report
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = 0
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise FormatError(f"llama.cpp's quantizer failed on {source} (status {status})", path=source)


def _types(path: Path, quant: str, planned: Sequence[_Planned]) -> dict[str, int]:
    """Tensors per GGUF type: as planned, or for a K-quant, as llama.cpp's quantizer chose them."""
    if quant in QUANTS:
        return dict(sorted(Counter(t.qtype.name for t in planned).items()))
    import gguf

    reader = gguf.GGUFReader(path)  # it parses the whole vocabulary too: only for what it alone knows
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _finish(staged: StagedFile, written: Path, quant: str) -> Path:
    """The staged output: the GGUF just written, or for a K-quant, llama.cpp's quantization of it."""
    if quant in QUANTS:
        return written
    _quantize_with_llama_cpp(written, staged.file, quant)
    written.unlink()
    return staged.file


# A tensor as it goes into the file: its plan, its bytes in GGUF's type, and the bar that counts them.
_Tensor = tuple[_Planned, Iterator[Bytes], ProgressBar]
# The tensors of one output, made with the reader and encoding pool _write_gguf opens, under its bar.
_Tensors = Callable[[RangeReader, ThreadPoolExecutor, ProgressBar], Iterator[_Tensor]]


def _write_gguf(
    staged: StagedFile,
    prepared: _Prepared,
    quant: str,
    tensors: _Tensors,
    *,
    progress: ProgressFactory,
    total: int,
    label: str,
) -> GGUFReport:
    """The steps every GGUF output ends with: check the disk has room, write the header, metadata and
    index, stream ``tensors`` under a bar of ``total`` bytes, quantize a K-quant, report, commit."""
    planned = prepared.planned
    check_free_space(staged.final, _space_needed(planned, quant))
    written = staged.file if quant in QUANTS else staged.path / f"{prepared.working}.gguf"
    bar = progress(total, label)
    stream = _Stream(written, _writer(prepared, bar))
    try:
        with RangeReader() as reader, ThreadPoolExecutor(2, thread_name_prefix="deltakit-gguf") as pool:
            for t, blocks, counted in tensors(reader, pool, bar):
                stream.tensor(t, blocks, counted)
                del t, blocks, counted  # a rebuilt tensor is freed before the next one is rebuilt
        bar.close()
    finally:
        stream.close()
    result = _finish(staged, written, quant)
    types = _types(result, quant, planned)
    report = GGUFReport(staged.final, quant, prepared.kind, len(planned), result.stat().st_size, types)
    staged.commit()
    return report


# -------------------------------------------------------------------------------------------------
# convert: any LLaMA checkpoint deltakit reads


def _llama_cpp_order(ckpt_tensors: dict[str, TensorInfo]) -> list[str]:
    """llama.cpp's reading order: weight files by name, and within a safetensors file, names sorted."""
    by_file: dict[Path, list[str]] = {}
    for name, info in ckpt_tensors.items():
        by_file.setdefault(info.path, []).append(name)
    order = []
    for path in sorted(by_file, key=lambda p: p.name):
        names = by_file[path]
        order += sorted(names) if path.suffix == ".safetensors" else names
    return order


@dataclass(frozen=True)
class _Prepared:
    """A conversion checked and planned, nothing written yet: the staged files, the hyperparameters,
    every tensor's place and type; for an apply, the delta's plan too."""

    kind: str  # hf, meta or delta
    files: _Files
    hp: _Hparams
    planned: list[_Planned]
    working: str
    apply: ApplyPlan | None = None


def _prepare_convert(source: Path, quant: str, staging: Path) -> _Prepared:
    is_meta = llama.is_meta_checkpoint(source)
    files: dict[str, tuple[bytes, Path]] = {}
    if is_meta:
        hf_sources, shape = llama.meta_to_hf(source)
        if llama3.is_llama3_vocab(dict(hf_sources)["model.embed_tokens.weight"].shape[0]):
            # its HF files depend on what params.json does not say (the release, instruct): convert's to give
            raise UnsupportedInputError(
                f"{source} is a Meta Llama 3 checkpoint, which goes to GGUF through its HF layout: convert it "
                "to hf first (saying its llama_version and instruct), then the HF folder to gguf",
                path=source,
                argument="to",
            )
        # the rows as Meta stores them: GGUF keeps Meta's rotary order, so no permutation either way
        sources = [(n, r.inner if isinstance(r, Rotary) else r) for n, r in hf_sources]
        params = llama.read_params(source / "params.json")
        config = llama.hf_config(shape, params, hf_sources, torch_dtype_name(sources[0][1].dtype))
        files["config.json"] = (config.encode(), source / "params.json")
        if (source / "tokenizer.model").is_file():
            files["tokenizer.model"] = (_read_limited(source / "tokenizer.model"), source / "tokenizer.model")
            tokenizer_config = json.dumps(llama.TOKENIZER_CONFIG, indent=2) + "\n"
            files["tokenizer_config.json"] = (tokenizer_config.encode(), source / "tokenizer.model")
        folder = _model_folder(staging, source.resolve().name)
    else:
        ckpt = open_checkpoint(source)
        sources = [(n, Whole(ckpt.tensors[n])) for n in _llama_cpp_order(ckpt.tensors)]
        for rel in _MODEL_FILES:
            path = ckpt.root / rel
            if os.path.lexists(path):
                files[rel] = (_read_limited(path), path)
        if "config.json" not in files:
            raise InputNotFoundError(f"{ckpt.root / 'config.json'} is missing", path=ckpt.root / "config.json")
        name = ckpt.root.name if ckpt.root.name not in ("", ".", "..") else ckpt.root.resolve().name
        folder = staging / "model-files" / (name or "model")  # the folder's own name, as llama.cpp reads it
    hp = _Hparams.of(json_object(*files["config.json"]), files["config.json"][1])
    staged = _stage_files(folder, files)
    working = _working_quant(quant, {rows.dtype for _, rows in sources})
    planned = _plan(sources, hp, working, meta_order=is_meta)
    return _Prepared("meta" if is_meta else "hf", staged, hp, planned, working)


@dataclass(frozen=True)
class GGUFCheck:
    """A GGUF conversion checked and planned, nothing written: ``types`` counts tensors per GGUF type
    as planned (for a K-quant, the working GGUF's, before llama.cpp's quantizer chooses)."""

    quant: str
    source_kind: str
    tensors: int
    bytes_planned: int
    types: dict[str, int]


def check_gguf(
    source: str | Path, *, delta: str | Path | None = None, quant: str = "f16", sample: bool = False
) -> GGUFCheck:
    """Everything :func:`convert_to_gguf` (or, with ``delta``, :func:`apply_to_gguf` onto the base
    ``source``) checks before writing, and nothing written: the quant type and its quantizer, the
    config's fields and the tensors against them, the architecture, the tokenizer and metadata files.

    Args:
        sample: with ``delta``, also check a few base tensors' digests (seconds): a wrong base fails too.

    Raises:
        UnsupportedInputError: not a LLaMA model, or a K-quant without llama.cpp's quantizer.
        FormatError: a config field, tensor shape or metadata file the conversion would refuse.
        InputNotFoundError: tokenizer.model or config.json is missing.
    """
    _check_quant(quant)
    with tempfile.TemporaryDirectory(prefix="deltakit-gguf-check-") as tmp:
        if delta is None:
            prepared = _prepare_convert(Path(source), quant, Path(tmp))
        else:
            prepared = _prepare_apply(source, delta, quant, Path(tmp), sample=sample)
        _writer(prepared, no_progress(0, "gguf"))
    types = dict(sorted(Counter(t.qtype.name for t in prepared.planned).items()))
    planned_bytes = sum(t.nbytes for t in prepared.planned)
    return GGUFCheck(quant, prepared.kind, len(prepared.planned), planned_bytes, types)


def convert_to_gguf(
    source: str | Path,
    out: str | Path,
    *,
    quant: str = "f16",
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> GGUFReport:
    """Write a LLaMA checkpoint (safetensors, ``.bin`` or Meta's ``consolidated.NN.pth``) as one GGUF file.

    Args:
        quant: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``; or a K-quant
            (``q4_k_m``...), which needs the ``kquants`` extra.
        replace: replace an existing file at ``out`` once the new one is complete (until then the old
            one stays as it was).

    Raises:
        UnsupportedInputError: not a LLaMA model, or a K-quant without llama.cpp's quantizer.
        FormatError: config.json (or a metadata file) is malformed, or disagrees with the tensors.
        InputNotFoundError: tokenizer.model (the vocabulary) is missing.
    """
    source, out = Path(source), Path(out)
    _check_quant(quant)
    with StagedFile(out, replace=replace) as staged:
        if llama.is_meta_checkpoint(source):
            llama.check_meta_checklist(source)
        prepared = _prepare_convert(source, quant, staged.path)

        def tensors(reader: RangeReader, pool: ThreadPoolExecutor, bar: ProgressBar) -> Iterator[_Tensor]:
            for t in prepared.planned:
                yield t, _blocks(reader, t, pool), bar

        total = sum(t.nbytes for t in prepared.planned)
        return _write_gguf(staged, prepared, quant, tensors, progress=progress, total=total, label="gguf")


# -------------------------------------------------------------------------------------------------
# apply: a delta rebuilt against its base, straight to GGUF


@dataclass(frozen=True)
class _Held:
    """A tensor's bytes already in memory (rebuilt and verified), read as rows."""

    data: Bytes
    dtype: str
    shape: tuple[int, ...]

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        row = rows_and_width(self.shape)[1] * itemsize(self.dtype)
        block = self.data[first * row : last * row]
        mapped = getattr(self.data, "_mmap", None)  # a tensor spilled to a scratch file, read back mapped
        if mapped is None:
            return block
        block = np.array(block)  # rows are read once, in order: their mapped pages are let go behind
        start = first * row - first * row % mmap.PAGESIZE
        if last * row > start:
            mapped.madvise(mmap.MADV_DONTNEED, start, last * row - start)
        return block


def _read_carried(plan: ApplyPlan, rel: str) -> tuple[bytes, Path]:
    """A file the delta carries, read from the package (never a FIFO, never past its recorded size)
    and checked against the manifest's SHA-256; shown as the package's own path."""
    record = plan.manifest.target.files[rel]
    path = plan.delta.root / FILES_DIR / rel
    data = _read_limited(path)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record.size or digest != record.sha256:
        raise IntegrityError(
            f"{path}: sha256 {digest[:16]}... differs from the manifest's {record.sha256[:16]}...: "
            "the delta's file is corrupt",
            path=path,
            expected=record.sha256,
            actual=digest,
        )
    return data, path


def _prepare_apply(base: str | Path, delta: str | Path, quant: str, staging: Path, *, sample: bool) -> _Prepared:
    from .engine.apply import plan_apply

    plan = plan_apply(base, delta)
    if sample:
        plan.warm_up()
        plan.check_sample()
    m = plan.manifest
    if "config.json" not in m.target.files:
        raise InputNotFoundError(
            f"{plan.delta.root}: the delta carries no config.json, the model's hyperparameters in a GGUF",
            path=plan.delta.root,
        )
    files = {rel: _read_carried(plan, rel) for rel in _MODEL_FILES if rel in m.target.files}
    hp = _Hparams.of(json_object(*files["config.json"]), files["config.json"][1])
    needed = _VOCABULARY_FILES[hp.family.vocabulary]
    if needed not in m.target.files:
        raise InputNotFoundError(
            f"{plan.delta.root}: the delta carries no {needed}, the vocabulary of a {hp.family.name} GGUF",
            path=plan.delta.root,
        )
    staged = _stage_files(_model_folder(staging, m.target.name), files)
    specs = {s.name: _Shape(s.target.dtype, s.target.shape) for s in plan.steps}
    working = _working_quant(quant, {s.dtype for s in specs.values()})
    planned = _plan(list(specs.items()), hp, working, meta_order=False)
    return _Prepared("delta", staged, hp, planned, working, plan)


def apply_to_gguf(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    quant: str = "f16",
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> GGUFReport:
    """Rebuild the delta's fine-tune from ``base`` straight into one GGUF file, with no model folder
    between: every tensor is checked against the manifest's digest before any of it is converted,
    and a wrong base is refused (sampled digests) before anything is written. With ``replace``, an
    existing file at ``out`` is replaced once the new one is complete and verified.

    Raises:
        BaseMismatchError: the base is not the one the delta was made from.
        IntegrityError: the payload or a carried file is corrupt.
        FormatError: the carried config.json (or a metadata file) is malformed, or disagrees with the tensors.
    """
    from .engine.apply import rebuilt_tensors

    out = Path(out)
    _check_quant(quant)
    with StagedFile(out, replace=replace) as staged:
        prepared = _prepare_apply(base, delta, quant, staged.path, sample=True)
        plan = prepared.apply
        assert plan is not None  # _prepare_apply always plans
        planned = {t.source: t for t in prepared.planned}

        def tensors(reader: RangeReader, pool: ThreadPoolExecutor, bar: ProgressBar) -> Iterator[_Tensor]:
            for extra in prepared.planned:
                if isinstance(extra.rows, _Held):  # computed from the config (rope_freqs), not rebuilt
                    yield extra, _blocks(reader, extra, pool), no_progress(extra.nbytes, "gguf")
            for step, data in rebuilt_tensors(plan, reader, set(plan.sample), bar, scratch=staged.path):
                t = planned.get(step.name)
                if t is None:  # dropped, as llama.cpp drops it (rotary inv_freq): checked all the same
                    continue
                held = _Held(data, step.target.dtype, step.target.shape)
                rows: Rows = Rotary(held, t.rows.heads, to_hf=False) if isinstance(t.rows, Rotary) else held
                blocks = _blocks(reader, _Planned(t.name, t.source, rows, t.qtype, t.nbytes), pool)
                yield t, blocks, no_progress(t.nbytes, "gguf")  # apply's bar counts this tensor as rebuilt
                del data, held, rows, blocks  # freed before the next tensor is rebuilt

        total = sum(t.nbytes for t in plan.specs)
        return _write_gguf(staged, prepared, quant, tensors, progress=progress, total=total, label="apply")


@dataclass(frozen=True)
class _Shape:
    """A tensor known by dtype and shape only, for planning; its rows come later."""

    dtype: str
    shape: tuple[int, ...]

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        raise AssertionError("planning only")
