"""GGUF for llama.cpp: a LLaMA checkpoint, or a fine-tune rebuilt from its delta, streamed into one GGUF file.

llama.cpp's own Python package ``gguf`` writes the file (header, metadata, tensor index) and quantizes
(its numpy quantizers are bit-identical to llama.cpp's reference C ones). This module decides what goes
in, the way llama.cpp's ``convert_hf_to_gguf.py`` does for a LLaMA model: tensor names, the q/k rows put
back in Meta's rotary order, each tensor's type, the hyperparameters, the SentencePiece vocabulary and the
special tokens. Tensors go through in row blocks, so memory stays bounded; from a delta, each tensor is
checked against the manifest's digest before a byte of it is converted. K-quants (``q4_k_m``...) need
llama.cpp's C quantizer, which the ``kquants`` extra installs. docs/GGUF.md says where the output differs
from llama.cpp's and why.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .codecs import Bytes
from .convert import (
    _LLAMA_TOKENIZER_CONFIG,
    _hf_config,
    _meta_to_hf,
    _read_json,
    _Rotary,
    _row_blocks,
    _Rows,
    _rows_and_width,
    _Whole,
)
from .convert import _check_checklist as check_meta_checklist
from .dtypes import itemsize
from .errors import FormatError, InputNotFoundError, UnsupportedInputError
from .formats.checkpoint import RangeReader, open_checkpoint
from .progress import ProgressBar, ProgressFactory, no_progress
from .staging import StagedFile, check_free_space

if TYPE_CHECKING:
    import gguf as gguf_module

__all__ = ["KQUANTS", "QUANTS", "GGUFReport", "apply_to_gguf", "convert_to_gguf"]

log = logging.getLogger(__name__)

# --quant: llama.cpp's names. These are made here, in numpy, with gguf's quantizers ...
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# ... and these by llama.cpp's C quantizer (llama_model_quantize), from a GGUF of the source's own precision.
KQUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
KQUANTS_EXTRA = "pip install 'deltakit-llm[kquants]'"
_NARROW = ("q4_0", "q4_1", "q5_0", "q5_1")

_ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")
_DROPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")  # as llama.cpp drops them
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


@dataclass(frozen=True)
class GGUFReport:
    """What was written: ``types`` counts tensors per GGUF type (``Q8_0``: 154, ``F32``: 65...)."""

    out: Path
    quant: str
    source_kind: str
    tensors: int
    bytes_written: int
    types: dict[str, int]


def _gguf() -> Any:
    import gguf

    return gguf


# -------------------------------------------------------------------------------------------------
# What goes in: hyperparameters, tensors and their types


@dataclass(frozen=True)
class _Hparams:
    """config.json as transformers' LlamaConfig reads it (its defaults filled in), which is what
    llama.cpp's converter reads."""

    config: dict[str, Any]

    @classmethod
    def of(cls, config: dict[str, Any], where: Path) -> _Hparams:
        arch = (config.get("architectures") or [None])[0]
        if arch not in _ARCHITECTURES and not (arch is None and config.get("model_type") == "llama"):
            raise UnsupportedInputError(
                f"{where}: architecture {arch!r} is not LLaMA; deltakit writes GGUF for LLaMA-family models "
                "(LlamaForCausalLM) only",
                path=where,
            )
        hp = dict(config)
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
            if type(hp.get(key)) is not int or hp[key] <= 0:
                raise FormatError(f"{where}: {key} must be a positive integer, not {hp.get(key)!r:.40}", path=where)
        # LlamaConfig's defaults (transformers' configuration_llama.py), where the file leaves them out
        hp.setdefault("vocab_size", 32000)
        hp.setdefault("max_position_embeddings", 2048)
        hp.setdefault("rms_norm_eps", 1e-6)
        if hp.get("num_key_value_heads") is None:
            hp["num_key_value_heads"] = hp["num_attention_heads"]
        if hp.get("head_dim") is None:
            hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]
        rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hp.get("rope_theta", 10000.0))
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        if rope.get("rope_type") == "llama3":
            raise UnsupportedInputError(
                f"{where}: Llama 3 models (llama3 rope, a BPE tokenizer) are not supported by deltakit's GGUF "
                "writer; convert the rebuilt model with llama.cpp's convert_hf_to_gguf.py",
                path=where,
            )
        hp["rope_parameters"] = rope
        heads, kv = hp["num_attention_heads"], hp["num_key_value_heads"]
        if type(kv) is not int or kv <= 0 or heads % kv:
            raise FormatError(f"{where}: num_key_value_heads {kv!r:.20} must divide {heads} heads", path=where)
        return cls(hp)

    def __getitem__(self, key: str) -> Any:
        return self.config[key]


@dataclass(frozen=True)
class _Planned:
    """One tensor of the GGUF: its name there, its rows in the order llama.cpp stores them, its type."""

    name: str
    source: str  # the checkpoint's name for it
    rows: _Rows
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape


def _qtype(name: str, shape: tuple[int, ...], quant: str, *, head: bool) -> Any:
    """llama.cpp's choice (convert_hf_to_gguf.py prepare_tensors): 1-D tensors, norms and non-weights
    stay F32; the rest take the requested type, or F16 where a row does not split into its blocks.

    ``head``: the output projection (or, tied, the embedding), which llama.cpp's quantizer keeps finer
    than the 4- and 5-bit types: Q6_K there, which needs its C quantizer; Q8_0 here, as llama.cpp does
    itself where Q6_K's 256-wide blocks do not fit.
    """
    g = _gguf()
    q = g.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    wanted = q.Q8_0 if head and quant in _NARROW else q[quant.upper()]
    block, _ = g.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        log.warning("%s: rows of %d do not split into %s blocks of %d; written as F16", name, shape[-1], quant, block)
        return q.F16
    return wanted


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[qtype]
    return int(math.prod(shape) // block * size)


def _plan(sources: Sequence[tuple[str, _Rows]], hp: _Hparams, quant: str, *, meta_order: bool) -> list[_Planned]:
    """The GGUF's tensors, in ``sources``' order; ``meta_order``: q/k rows are in Meta's rotary order
    already (a Meta checkpoint), else they are put back in it as llama.cpp does."""
    g = _gguf()
    names = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, hp["num_hidden_layers"])
    tied = not any(source == "lm_head.weight" for source, _ in sources)
    planned = []
    for source, rows in sources:
        if source.endswith(_DROPPED):
            continue
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedInputError(
                f"tensor {source!r} has no place in a LLaMA GGUF; deltakit converts LLaMA-family models only",
                tensor=source,
            )
        if rows.dtype not in ("F16", "BF16", "F32"):
            raise UnsupportedInputError(f"tensor {source!r} is {rows.dtype}; GGUF conversion takes float tensors")
        if name == "token_embd.weight" and rows.shape[0] != hp["vocab_size"]:
            raise FormatError(  # llama.cpp would refuse the file when loading it: say so now
                f"config.json's vocab_size {hp['vocab_size']} differs from the {rows.shape[0]} rows of {source!r}",
                tensor=source,
            )
        if source.endswith(("q_proj.weight", "k_proj.weight")) and not meta_order:
            heads = hp["num_attention_heads"] if "q_proj" in source else hp["num_key_value_heads"]
            rows = _Rotary(rows, heads, to_hf=False)
        elif source.endswith(("q_proj.bias", "k_proj.bias")):
            raise UnsupportedInputError(f"tensor {source!r}: q/k biases are not LLaMA's", tensor=source)
        head = name == ("token_embd.weight" if tied else "output.weight")
        qtype = _qtype(name, rows.shape, quant, head=head)
        planned.append(_Planned(name, source, rows, qtype, _nbytes(rows.shape, qtype)))
    return planned


def _encode(block: Bytes, dtype: str, rows: int, width: int, qtype: Any) -> Bytes:
    """``rows`` rows of ``width`` elements in GGUF's type: widened to float32 where llama.cpp does (bf16
    always, exactly), then gguf's own quantize."""
    if dtype == "BF16":
        values = (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = block.view(np.float16 if dtype == "F16" else np.float32)
    data = _gguf().quants.quantize(values.reshape(rows, width), qtype)
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _blocks(reader: RangeReader, t: _Planned, pool: ThreadPoolExecutor) -> Iterator[Bytes]:
    """The tensor in GGUF's type, a block of whole rows at a time (quantization blocks never cross rows),
    encoded on ``pool``'s threads a few blocks ahead (numpy lets go of the GIL), yielded in order."""
    _, width = _rows_and_width(t.shape)
    ahead: deque[Future[Bytes]] = deque()
    for first, last in _row_blocks(t.rows):
        if last > first:
            data = t.rows.read(reader, first, last)
            ahead.append(pool.submit(_encode, data, t.rows.dtype, last - first, width, t.qtype))
            if len(ahead) > _AHEAD:
                yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


_AHEAD = 2  # blocks encoded ahead of the one being written: both cores busy, a few blocks in memory


# -------------------------------------------------------------------------------------------------
# Metadata and vocabulary, in the order llama.cpp's converter writes them


def _vocab_sentencepiece(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """llama.cpp's ``_create_vocab_sentencepiece``: the SentencePiece pieces, ids past them as
    ``[PAD{id}]``, then added_tokens.json and tokenizer_config.json's added_tokens_decoder over them."""
    from sentencepiece import SentencePieceProcessor

    types = _gguf().TokenType  # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise InputNotFoundError(
            f"{path} is missing: a LLaMA GGUF carries the SentencePiece vocabulary, and deltakit reads it from "
            "tokenizer.model (BPE-only tokenizers such as Llama 3's are not supported)",
            path=path,
        )
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{path}: not a SentencePiece model ({e})", path=path) from e
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    kinds = [int(types.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
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
        for text, i in _read_json(added).items():
            if type(i) is int and 0 <= i < vocab_size:
                tokens[i], scores[i], kinds[i] = text.encode(), -1000.0, int(types.USER_DEFINED)
    config = folder / "tokenizer_config.json"
    decoder = _read_json(config).get("added_tokens_decoder", {}) if config.is_file() else {}
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


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _write_metadata(writer: Any, hp: _Hparams, folder: Path, ftype: int) -> None:
    """Every key llama.cpp's converter writes for a LLaMA model, in its order (the tensor infos must
    be in ``writer`` already: the size label counts their parameters)."""
    g = _gguf()
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
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_file_type(ftype)
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_quantization_version(g.GGML_QUANT_VERSION)

    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        space = _read_json(tokenizer_config).get("add_prefix_space")
        if isinstance(space, bool):
            writer.add_add_space_prefix(space)
    tokens, scores, kinds = _vocab_sentencepiece(folder, hp["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    g.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    if hp["vocab_size"] == 32016:  # CodeLlama's infill tokens, as llama.cpp marks them
        special = g.SpecialVocab(folder, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
        for kind, token in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            special._set_special_token(kind, token)
        special.add_to_gguf(writer, quiet=True)
    if hp["vocab_size"] == 49152:
        writer.add_add_bos_token(False)


# -------------------------------------------------------------------------------------------------
# Writing


def _ftype(quant: str) -> int:
    file_type: int = getattr(_gguf().LlamaFileType, "ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}")
    return file_type


def _check_quant(quant: str) -> None:
    """Refuse an unknown type, or a K-quant without llama.cpp's quantizer, before any work."""
    if quant in QUANTS:
        return
    if quant not in KQUANTS:
        raise UnsupportedInputError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS + KQUANTS)}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise UnsupportedInputError(
            f"--quant {quant} needs llama.cpp's own quantizer, which is not installed: {KQUANTS_EXTRA} "
            f"(it builds llama.cpp), or choose one of {', '.join(QUANTS)}"
        ) from e


def _working_quant(quant: str, planned_dtypes: set[str]) -> str:
    """The precision a K-quant is made from: the source's own, so nothing is rounded twice."""
    if quant in QUANTS:
        return quant
    return "f32" if "F32" in planned_dtypes else "bf16" if "BF16" in planned_dtypes else "f16"


class _Stream:
    """The GGUF writer driven tensor by tensor: header, metadata and tensor index first, then each
    tensor's bytes in row blocks, padded as gguf pads them."""

    def __init__(self, path: Path, planned: Sequence[_Planned], hp: _Hparams, folder: Path, quant: str) -> None:
        g = _gguf()
        self.writer: gguf_module.GGUFWriter = g.GGUFWriter(path=None, arch=g.MODEL_ARCH_NAMES[g.MODEL_ARCH.LLAMA])
        for t in planned:
            self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        _write_metadata(self.writer, hp, folder, _ftype(quant))
        try:
            self.writer.write_header_to_file(path=path)
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
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


def _model_folder(staged: StagedFile, name: str) -> Path:
    """A folder in the staging area named as the model is: llama.cpp reads the model's name (and its
    size label, version...) from its folder's name, so the GGUF's metadata are what converting a folder
    of that name gives. A Hub id keeps its last part; a name that is no safe folder name becomes model."""
    name = name.rsplit("/", 1)[-1]
    if not _FOLDER_NAME.match(name) or name in (".", ".."):
        name = "model"
    folder = staged.path / "model-files" / name
    folder.mkdir(parents=True)
    return folder


_FOLDER_NAME = re.compile(r"^[\w.+-][\w .+-]{0,127}$")


def _space_needed(planned: Sequence[_Planned], quant: str) -> int:
    """The GGUF's bytes; for a K-quant, the working GGUF and the (smaller) quantized one side by side."""
    size = sum(t.nbytes for t in planned)
    return size if quant in QUANTS else 2 * size


def _quiet(level: int, text: bytes, user_data: object) -> None:
    pass


_QUIET: Any = None


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
    reader = _gguf().GGUFReader(path)  # it parses the whole vocabulary too: only for what it alone knows
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _finish(staged: StagedFile, written: Path, quant: str) -> Path:
    """The staged output: the GGUF just written, or for a K-quant, llama.cpp's quantization of it."""
    if quant in QUANTS:
        return written
    _quantize_with_llama_cpp(written, staged.file, quant)
    written.unlink()
    return staged.file


# -------------------------------------------------------------------------------------------------
# convert: any LLaMA checkpoint deltakit reads


def _llama_cpp_order(ckpt_tensors: dict[str, Any]) -> list[str]:
    """llama.cpp's reading order: weight files by name, and within a safetensors file, names sorted."""
    by_file: dict[Path, list[str]] = {}
    for name, info in ckpt_tensors.items():
        by_file.setdefault(info.path, []).append(name)
    order = []
    for path in sorted(by_file, key=lambda p: p.name):
        names = by_file[path]
        order += sorted(names) if path.suffix == ".safetensors" else names
    return order


def convert_to_gguf(
    source: str | Path, out: str | Path, *, quant: str = "f16", progress: ProgressFactory = no_progress
) -> GGUFReport:
    """Write a LLaMA checkpoint (safetensors, ``.bin`` or Meta's ``consolidated.NN.pth``) as one GGUF file.

    Args:
        quant: ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``; or a K-quant
            (``q4_k_m``...), which needs the ``kquants`` extra.

    Raises:
        UnsupportedInputError: not a LLaMA model, or a K-quant without llama.cpp's quantizer.
        InputNotFoundError: tokenizer.model (the vocabulary) is missing.
    """
    source, out = Path(source), Path(out)
    _check_quant(quant)
    is_meta = source.is_dir() and (source / "params.json").is_file() and any(source.glob("consolidated.*.pth"))
    with StagedFile(out) as staged:
        if is_meta:
            check_meta_checklist(source)
            hf_sources, shape = _meta_to_hf(source)
            # the rows as Meta stores them: GGUF keeps Meta's rotary order, so no permutation either way
            sources = [(n, r.inner if isinstance(r, _Rotary) else r) for n, r in hf_sources]
            params = _read_json(source / "params.json")
            folder = _model_folder(staged, source.resolve().name)
            (folder / "config.json").write_text(
                _hf_config(shape, params.get("model", params), hf_sources, sources[0][1].dtype), encoding="utf-8"
            )
            if (source / "tokenizer.model").is_file():
                shutil.copyfile(source / "tokenizer.model", folder / "tokenizer.model")
                (folder / "tokenizer_config.json").write_text(json.dumps(_LLAMA_TOKENIZER_CONFIG, indent=2) + "\n")
        else:
            ckpt = open_checkpoint(source)
            sources = [(n, _Whole(ckpt.tensors[n])) for n in _llama_cpp_order(ckpt.tensors)]
            folder = ckpt.root
        hp = _Hparams.of(_read_json(folder / "config.json"), folder / "config.json")
        working = _working_quant(quant, {rows.dtype for _, rows in sources})
        planned = _plan(sources, hp, working, meta_order=is_meta)
        check_free_space(out, _space_needed(planned, quant))
        written = staged.file if quant in QUANTS else staged.path / f"{working}.gguf"
        stream = _Stream(written, planned, hp, folder, working)
        try:
            bar = progress(sum(t.nbytes for t in planned), "gguf")
            with RangeReader() as reader, ThreadPoolExecutor(2, thread_name_prefix="deltakit-gguf") as pool:
                for t in planned:
                    stream.tensor(t, _blocks(reader, t, pool), bar)
            bar.close()
        finally:
            stream.close()
        result = _finish(staged, written, quant)
        kind = "meta" if is_meta else "hf"
        report = GGUFReport(out, quant, kind, len(planned), result.stat().st_size, _types(result, quant, planned))
        staged.commit()
    return report


# -------------------------------------------------------------------------------------------------
# apply: a delta rebuilt against its base, straight to GGUF


@dataclass(frozen=True)
class _Held:
    """A tensor's bytes already in memory (rebuilt and verified), read as rows."""

    data: Bytes
    dtype: str
    shape: tuple[int, ...]

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        row = _rows_and_width(self.shape)[1] * itemsize(self.dtype)
        return self.data[first * row : last * row]


def apply_to_gguf(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    quant: str = "f16",
    progress: ProgressFactory = no_progress,
) -> GGUFReport:
    """Rebuild the delta's fine-tune from ``base`` straight into one GGUF file, with no model folder
    between: every tensor is checked against the manifest's digest before any of it is converted,
    and a wrong base is refused (sampled digests) before anything is written.

    Raises:
        BaseMismatchError: the base is not the one the delta was made from.
        IntegrityError: the payload or a carried file is corrupt.
    """
    from .engine.apply import plan_apply, rebuilt_tensors

    out = Path(out)
    _check_quant(quant)
    plan = plan_apply(base, delta)
    plan.warm_up()
    m = plan.manifest
    plan.check_sample()
    verified = set(plan.sample)
    for needed, why in (("config.json", "its hyperparameters"), ("tokenizer.model", "its vocabulary")):
        if needed not in m.target.files:
            raise InputNotFoundError(
                f"{plan.delta.root}: the delta carries no {needed}, {why} in a LLaMA GGUF (BPE-only tokenizers "
                "such as Llama 3's are not supported)",
                path=plan.delta.root,
            )
    with StagedFile(out) as staged:
        folder = _model_folder(staged, m.target.name)
        for rel in _MODEL_FILES:  # the carried files the metadata is read from, checked as they are copied
            if rel in m.target.files:
                plan.copy_carried(rel, folder / rel)
        hp = _Hparams.of(_read_json(folder / "config.json"), folder / "config.json")
        specs = {s.name: _Shape(s.target.dtype, s.target.shape) for s in plan.steps}
        working = _working_quant(quant, {s.dtype for s in specs.values()})
        planned = {t.source: t for t in _plan(list(specs.items()), hp, working, meta_order=False)}
        check_free_space(out, _space_needed(list(planned.values()), quant))
        written = staged.file if quant in QUANTS else staged.path / f"{working}.gguf"
        stream = _Stream(written, list(planned.values()), hp, folder, working)
        try:
            bar = progress(sum(t.nbytes for t in plan.specs), "apply")
            with RangeReader() as reader, ThreadPoolExecutor(2, thread_name_prefix="deltakit-gguf") as pool:
                for step, data in rebuilt_tensors(plan, reader, verified, bar, scratch=staged.path):
                    t = planned.get(step.name)
                    if t is None:  # dropped, as llama.cpp drops it (rotary inv_freq): checked all the same
                        continue
                    held = _Held(data, step.target.dtype, step.target.shape)
                    rows: _Rows = _Rotary(held, t.rows.heads, to_hf=False) if isinstance(t.rows, _Rotary) else held
                    blocks = _blocks(reader, _Planned(t.name, t.source, rows, t.qtype, t.nbytes), pool)
                    stream.tensor(t, blocks, no_progress(t.nbytes, "gguf"))  # apply's bar counts this tensor
            bar.close()
        finally:
            stream.close()
        result = _finish(staged, written, quant)
        types = _types(result, quant, list(planned.values()))
        report = GGUFReport(out, quant, "delta", len(planned), result.stat().st_size, types)
        staged.commit()
    return report


@dataclass(frozen=True)
class _Shape:
    """A tensor known by dtype and shape only, for planning; its rows come later."""

    dtype: str
    shape: tuple[int, ...]

    def read(self, reader: RangeReader, first: int, last: int) -> Bytes:
        raise AssertionError("planning only")
