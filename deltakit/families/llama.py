"""LLaMA (1 and 2, and their fine-tunes): Meta's original checkpoint layout and its names in Hugging
Face's, the hyperparameters each layout states them in, the SentencePiece vocabulary rules, and what
a LLaMA GGUF holds.

Meta -> HF merges model-parallel shards along the right dimension per tensor (as transformers'
``convert_llama_weights_to_hf.py`` does) and permutes q/k rows for HF's rotary layout; HF -> Meta
undoes both, so HF -> Meta -> HF gives back every tensor byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputNotFoundError, IntegrityError, UnsupportedInputError
from ..files import read_json_object
from ..formats.safetensors import TensorInfo
from ..formats.torch_zip import read_torch_zip
from ..hashing import algorithm_of, file_hexdigest, read_checksum_file
from ..rows import Concat, Rotary, Rows, Slice, Whole
from .family import Family

__all__ = [
    "GENERATION_CONFIG",
    "LLAMA",
    "MAX_LAYERS",
    "META_SHARDS",
    "SENTENCEPIECE_VOCAB_MAX",
    "TOKENIZER_CONFIG",
    "LlamaShape",
    "check_meta_checklist",
    "hf_config",
    "hf_shape",
    "hf_to_meta",
    "is_meta_checkpoint",
    "meta_params",
    "meta_to_hf",
    "name_map",
    "read_params",
]

# LLaMA 3.1 405B has 126 layers; a config asking for more than this describes no checkpoint.
MAX_LAYERS = 4096
# Meta's own shard counts, by hidden size (7B, 13B, 30B/33B, 65B and 70B).
META_SHARDS = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
# Llama 1 and 2's SentencePiece vocabularies (32000, and fine-tunes' few more) are below this; Llama 3's
# tokenizer (128256, BPE) is another kind.
SENTENCEPIECE_VOCAB_MAX = 65536
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2}
_META_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")


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


def name_map(n_layers: int) -> list[tuple[str, str, int | None]]:
    """``(meta name, hf name, join axis)`` in HF's order: embedding, layers, norm, head."""
    pairs = [("tok_embeddings.weight", *_TOP_MAP["tok_embeddings.weight"])]
    for i in range(n_layers):
        pairs += [(f"layers.{i}.{m}", f"model.layers.{i}.{h}", axis) for m, (h, axis) in _LAYER_MAP.items()]
    pairs += [("norm.weight", *_TOP_MAP["norm.weight"]), ("output.weight", *_TOP_MAP["output.weight"])]
    return pairs


# -------------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass(frozen=True)
class LlamaShape:
    dim: int
    heads: int
    kv_heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @classmethod
    def checked(cls, where: Path, fields: dict[str, Any], names: tuple[str, str, str, str]) -> LlamaShape:
        """A shape from a config's ``names`` (dim, heads, KV heads, layers), each a positive integer in
        range, the heads dividing the width and the KV heads dividing the heads; refused by field."""
        values = []
        for name, cap in zip(names, (1 << 20, 1 << 14, 1 << 14, MAX_LAYERS), strict=True):
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


def read_params(path: Path) -> dict[str, Any]:
    """Meta's ``params.json``: its ``model`` object where it nests one, else the whole file."""
    params = read_json_object(path)
    params = params.get("model", params)
    if not isinstance(params, dict):
        raise FormatError(f"{path}: 'model' is not an object", path=path)
    return params


def hf_shape(config: dict[str, Any], folder: Path) -> LlamaShape:
    """The shape a Hugging Face ``config.json`` (in ``folder``) states."""
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    return LlamaShape.checked(folder / "config.json", config, names)


def hf_config(shape: LlamaShape, params: dict[str, Any], sources: Sequence[tuple[str, Rows]], torch_dtype: str) -> str:
    """The ``config.json`` of the HF model converted from a Meta checkpoint of ``params``."""
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
        "torch_dtype": torch_dtype,
    }
    if config["vocab_size"] <= SENTENCEPIECE_VOCAB_MAX:  # Llama 1 and 2; Llama 3's tokenizer is another kind
        config |= GENERATION_CONFIG
    return json.dumps(config, indent=2) + "\n"


def meta_params(shape: LlamaShape, config: dict[str, Any]) -> dict[str, Any]:
    """Meta's ``params.json`` for the HF model of ``config``."""
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
    return params


# -------------------------------------------------------------------------------------------------
# Meta's checkpoint folder


def is_meta_checkpoint(source: Path) -> bool:
    """A folder of Meta's layout: ``params.json`` and ``consolidated.NN.pth``."""
    return source.is_dir() and (source / "params.json").is_file() and any(source.glob("consolidated.*.pth"))


def check_meta_checklist(folder: Path) -> None:
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


def meta_to_hf(folder: Path) -> tuple[list[tuple[str, Rows]], LlamaShape]:
    """A Meta checkpoint's tensors under their HF names, model-parallel parts joined and q/k rows in
    HF's rotary order, and the shape its ``params.json`` states."""
    shape = LlamaShape.checked(folder / "params.json", read_params(folder / "params.json"),
                               ("dim", "n_heads", "n_kv_heads", "n_layers"))  # fmt: skip
    shards = _meta_shards(folder)
    sources: list[tuple[str, Rows]] = []
    for meta_name, hf_name, axis in name_map(shape.layers):
        parts: list[Rows] = []
        for i, shard in enumerate(shards):
            if meta_name not in shard:
                raise FormatError(
                    f"consolidated.{i:02d}.pth lacks {meta_name!r}", path=folder / f"consolidated.{i:02d}.pth"
                )
            parts.append(Whole(shard[meta_name]))
        if meta_name == "tok_embeddings.weight" and len(parts) > 1 and parts[0].shape[1] == shape.dim:
            axis = 0  # Llama 3 splits the embedding by rows, Llama 1 and 2 by columns
        rows: Rows = parts[0] if axis is None or len(parts) == 1 else Concat(tuple(parts), axis)
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
            rows = Rotary(rows, heads, to_hf=True)
        sources.append((hf_name, rows))
    _refuse_unmapped(shards[0], {m for m, _, _ in name_map(shape.layers)}, ("rope.freqs",), folder)
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


def hf_to_meta(
    tensors: dict[str, TensorInfo], shape: LlamaShape, shards: int, root: Path, *, tied: bool = False
) -> list[list[tuple[str, Rows]]]:
    """An HF checkpoint's tensors under Meta's names, per model-parallel shard, q/k rows in Meta's
    rotary order; ``tied``: the embedding is also the output projection, which Meta's layout stores."""
    if shape.heads % shards or shape.kv_heads % shards:
        raise UnsupportedInputError(
            f"{shape.heads} heads do not split into {shards} model-parallel shards", argument="meta_shards"
        )
    out: list[list[tuple[str, Rows]]] = [[] for _ in range(shards)]
    for meta_name, hf_name, axis in name_map(shape.layers):
        info = tensors.get(hf_name)
        if info is None and tied and hf_name == "lm_head.weight":
            info = tensors.get("model.embed_tokens.weight")
        if info is None:
            raise UnsupportedInputError(f"the checkpoint lacks {hf_name!r}: not a LLaMA model", tensor=hf_name)
        whole = Whole(info)
        if axis is not None and info.shape[axis] % shards:
            raise UnsupportedInputError(
                f"{hf_name!r} has {info.shape[axis]} along dimension {axis}, which does not split into "
                f"{shards} model-parallel shards",
                tensor=hf_name,
                argument="meta_shards",
            )
        for s in range(shards):
            part: Rows = whole
            if axis is not None and shards > 1:
                size = info.shape[axis] // shards
                part = Slice(whole, axis, s * size, (s + 1) * size)
            if meta_name.endswith(("wq.weight", "wk.weight")):
                heads = shape.heads if "wq" in meta_name else shape.kv_heads
                part = Rotary(part, heads // shards, to_hf=False)
            out[s].append((meta_name, part))
    _refuse_unmapped(tensors, {h for _, h, _ in name_map(shape.layers)}, ("rotary_emb.inv_freq",), root)
    return out


# -------------------------------------------------------------------------------------------------
# GGUF


def _tensor_shapes(hp: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    e, f, v, d = hp["hidden_size"], hp["intermediate_size"], hp["vocab_size"], hp["head_dim"]
    q, kv = hp["num_attention_heads"] * d, hp["num_key_value_heads"] * d
    return {
        "model.embed_tokens.weight": (v, e),
        "lm_head.weight": (v, e),
        "model.norm.weight": (e,),
        "self_attn.q_proj.weight": (q, e),
        "self_attn.k_proj.weight": (kv, e),
        "self_attn.v_proj.weight": (kv, e),
        "self_attn.o_proj.weight": (e, q),
        "mlp.gate_proj.weight": (f, e),
        "mlp.up_proj.weight": (f, e),
        "mlp.down_proj.weight": (e, f),
        "input_layernorm.weight": (e,),
        "post_attention_layernorm.weight": (e,),
    }


LLAMA = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "LLaMAForCausalLM"),
    model_types=("llama",),
    gguf_arch="LLAMA",
    # LlamaConfig's defaults (transformers' configuration_llama.py), where the file leaves them out
    config_defaults=(("vocab_size", 32000), ("max_position_embeddings", 2048), ("rms_norm_eps", 1e-6)),
    dropped=(".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias"),  # as llama.cpp drops them
    tensor_shapes=_tensor_shapes,
)
