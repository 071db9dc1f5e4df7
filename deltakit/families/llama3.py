"""Llama 3, 3.1 and 3.2 (and their fine-tunes): the same ``LlamaForCausalLM`` layers as Llama 1 and 2,
with a byte-level BPE vocabulary (tokenizer.json, 128256 ids), RoPE theta 500000, Llama 3.1's rope
scaling (``rope_type: llama3``) and, in 3.2's 1B and 3B, an output projection tied to the embedding.

A config is Llama 3's when its vocabulary is larger than any SentencePiece LLaMA's or its rope type
is ``llama3``; everything else of the architecture stays :mod:`.llama`'s. Each part of this module is
a section of its own: Meta's original checkpoints, then Hugging Face's layout and its GGUF.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, UnsupportedInputError
from ..files import read_json_object
from ..rows import Rows
from .family import Family
from .llama import LLAMA, SENTENCEPIECE_VOCAB_MAX, LlamaShape

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "LLAMA3",
    "META_CONTEXT",
    "PRE_TOKENIZERS",
    "VERSIONS",
    "Llama3Release",
    "bpe_merges",
    "byte_chars",
    "generation_config",
    "hf_config",
    "is_llama3_config",
    "is_llama3_vocab",
    "meta_params",
    "meta_release",
    "read_tiktoken",
    "rope_freqs",
    "special_tokens",
    "tiktoken_from_tokenizer_json",
    "tokenizer_config",
    "tokenizer_json",
]

# =================================================================================================
# Meta's original checkpoints: params.json and the tiktoken tokenizer.model <-> Hugging Face's files,
# as transformers' convert_llama_weights_to_hf.py (--llama_version 3 or 3.1) writes them
# =================================================================================================

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
# Meta's context lengths, as transformers' script records them: 8192 for Llama 3, 131072 from 3.1
META_CONTEXT = {False: 8192, True: 131072}
VERSIONS = ("3", "3.1", "3.2", "3.3")
# Llama 3's split pattern (tiktoken's, as transformers' TikTokenConverter writes it)
_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPECIAL_TOKENS = 256
# the tiktoken file of a tokenizer larger than this is not Llama 3's; bounds what is read
_MAX_TIKTOKEN_BYTES = 64 << 20


def is_llama3_vocab(rows: int) -> bool:
    """An embedding of ``rows`` tokens is Llama 3's BPE kind, not Llama 1 and 2's SentencePiece."""
    return rows > SENTENCEPIECE_VOCAB_MAX


@dataclass(frozen=True)
class Llama3Release:
    """What a Meta Llama 3 checkpoint does not say of itself and its HF files depend on: the release
    (``3``, ``3.1``, ``3.2`` or ``3.3``: the rope scaling factor, a tied head) and whether it is instruct
    (the ids generation stops at)."""

    version: str
    instruct: bool

    @property
    def scaled_rope(self) -> bool:
        return self.version != "3"

    @property
    def rope_factor(self) -> float:
        return 32.0 if self.version == "3.2" else 8.0  # 3.2's 1B and 3B; 8 for 3.1 and 3.3

    @property
    def tied(self) -> bool:
        """3.2's output projection is its embedding (Meta's checkpoint stores it twice, HF's once)."""
        return self.version == "3.2"

    @property
    def context(self) -> int:
        return META_CONTEXT[self.scaled_rope]

    def eos_token_ids(self, bos: int) -> int | list[int]:
        """<|end_of_text|>; an instruct model's generation also stops at <|eom_id|> and <|eot_id|>."""
        return [bos + 1, bos + 8, bos + 9] if self.instruct else bos + 1


def meta_release(
    params: Mapping[str, Any], path: Path, *, llama_version: str | None, instruct: bool | None
) -> Llama3Release:
    """The release of a Meta Llama 3 checkpoint whose ``params.json`` (at ``path``) is ``params``.

    ``params.json`` says whether the rope is scaled (3.1 and later) but not by what factor (8 for 3.1
    and 3.3, 32 for 3.2, whose head is also tied), nor whether the model is instruct: where the HF files
    would silently differ, the caller says, as transformers' script takes ``--llama_version`` and
    ``--instruct``.

    Raises:
        UnsupportedInputError: ``llama_version`` or ``instruct`` is needed and not given, or
            ``llama_version`` is not one of :data:`VERSIONS` or disagrees with ``params.json``.
    """
    scaled = params.get("use_scaled_rope") is True
    if llama_version is not None and llama_version not in VERSIONS:
        raise UnsupportedInputError(
            f"unknown llama_version {llama_version!r}; choose one of {', '.join(VERSIONS)}", argument="llama_version"
        )
    if llama_version is not None and (llama_version != "3") != scaled:
        raise UnsupportedInputError(
            f"llama_version {llama_version} {'scales' if llama_version != '3' else 'does not scale'} the rope, but "
            f"{path.name} says use_scaled_rope: {str(scaled).lower()}",
            path=path,
            argument="llama_version",
        )
    missing = []
    if llama_version is None and scaled:
        missing.append(
            ("llama_version", "the rope scaling factor (llama_version 3.1 or 3.3: 8; 3.2: 32, with a tied head)")
        )
    if instruct is None:
        missing.append(("instruct", "whether the model is instruct (instruct: generation stops at <|eot_id|>)"))
    if missing:
        raise UnsupportedInputError(
            f"{path.name} of a Llama 3 checkpoint does not say {' nor '.join(what for _, what in missing)}; "
            f"give {' and '.join(name for name, _ in missing)}",
            path=path,
            argument=missing[0][0],
        )
    return Llama3Release(version=llama_version or "3", instruct=bool(instruct))


def special_tokens(*, scaled_rope: bool) -> list[str]:
    """The 256 special tokens after the BPE ranks: Llama 3's names, or 3.1's (which uses a few more)."""
    if scaled_rope:
        named = [BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]  # fmt: skip
        first = 3
    else:
        named = [BOS_TOKEN, EOS_TOKEN, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]  # fmt: skip
        first = 5
    return named + [f"<|reserved_special_token_{i}|>" for i in range(first, first + _SPECIAL_TOKENS - len(named))]


def hf_config(
    shape: LlamaShape,
    params: dict[str, Any],
    release: Llama3Release,
    sources: Sequence[tuple[str, Rows]],
    torch_dtype: str,
) -> str:
    """The ``config.json`` of the HF model converted from a Meta checkpoint of ``release`` and ``params``."""
    by_name = dict(sources)
    vocab = by_name["model.embed_tokens.weight"].shape[0]
    bos = vocab - _SPECIAL_TOKENS
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": release.eos_token_ids(bos),
        "hidden_act": "silu",
        "hidden_size": shape.dim,
        "initializer_range": 0.02,
        "intermediate_size": by_name["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "max_position_embeddings": release.context,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_scaling": None,
        "rope_theta": params.get("rope_theta", 500000.0),
        "tie_word_embeddings": release.tied,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if release.scaled_rope:  # as transformers' script and Meta's HF repositories state it
        config["rope_scaling"] = {
            "factor": release.rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": META_CONTEXT[False],
            "rope_type": "llama3",
        }
    return json.dumps(config, indent=2) + "\n"


def generation_config(vocab: int, release: Llama3Release) -> str:
    """``generation_config.json`` as transformers' script writes it."""
    bos = vocab - _SPECIAL_TOKENS
    eos = release.eos_token_ids(bos)
    config = {"bos_token_id": bos, "do_sample": True, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9}
    return json.dumps(config, indent=2) + "\n"


def tokenizer_config(release: Llama3Release) -> str:
    """``tokenizer_config.json``: a fast tokenizer that adds BOS (its post-processor does), as
    transformers' script writes it (without an instruct model's chat template, which Meta's checkpoint
    does not carry and the script fetches from the Hub)."""
    config = {
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>" if release.instruct else EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": release.context,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return json.dumps(config, indent=2) + "\n"


def read_tiktoken(path: Path) -> list[bytes]:
    """A tiktoken ``tokenizer.model``: one ``BASE64 RANK`` line per token, ranks 0, 1, 2... in order;
    returns the tokens' bytes by rank."""
    if path.stat().st_size > _MAX_TIKTOKEN_BYTES:
        raise FormatError(f"{path} is over {_MAX_TIKTOKEN_BYTES} bytes: not a Llama 3 tokenizer", path=path)
    tokens: list[bytes] = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2 or int(fields[1]) != len(tokens):
                raise ValueError
            tokens.append(base64.b64decode(fields[0], validate=True))
        except (ValueError, binascii.Error):
            raise FormatError(
                f"{path}, line {number}: expected 'BASE64 {len(tokens)}', a tiktoken rank in order", path=path
            ) from None
    if len(set(tokens)) != len(tokens):
        raise FormatError(f"{path} lists a token twice", path=path)
    return tokens


def byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b shown as one printable character."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in shown}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def bpe_merges(tokens: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """Every split of each token into two ranked tokens, by the token's rank, then by the parts' ranks
    (as transformers' TikTokenConverter lists them)."""
    rank = {token: i for i, token in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for token in tokens:
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in rank and token[i:] in rank]
        local.sort(key=lambda pair: (rank[pair[0]], rank[pair[1]]))
        merges += local
    return merges


def tokenizer_json(tokens: Sequence[bytes], release: Llama3Release) -> str:
    """The fast tokenizer's ``tokenizer.json`` for tiktoken ``tokens``, the special tokens after them
    and a post-processor that adds BOS: the file transformers' script writes, read the same way."""
    chars = byte_chars()

    def shown(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    bos_id = len(tokens)
    added = [
        {"id": bos_id + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, name in enumerate(special_tokens(scaled_rope=release.scaled_rope))
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "Sequence",
            "processors": [
                byte_level | {"trim_offsets": False},
                {
                    "type": "TemplateProcessing",
                    "single": [
                        {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                    ],
                    "pair": [
                        {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [bos_id], "tokens": [BOS_TOKEN]}},
                },
            ],
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {shown(token): i for i, token in enumerate(tokens)},
            "merges": [[shown(a), shown(b)] for a, b in bpe_merges(tokens)],
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def tiktoken_from_tokenizer_json(path: Path) -> bytes | None:
    """Meta's ``tokenizer.model`` back from a Llama 3 ``tokenizer.json``: its byte-level BPE vocabulary
    below the first added token, one ``BASE64 RANK`` line per token; None where the file is not such a
    tokenizer."""
    document = read_json_object(path)
    model = document.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    added = document.get("added_tokens") or []
    first_added = min((t.get("id", 0) for t in added if isinstance(t, dict)), default=len(model["vocab"]))
    byte_of = {c: b for b, c in enumerate(byte_chars())}
    tokens: dict[int, bytes] = {}
    for text, rank in model["vocab"].items():
        if type(rank) is not int or rank >= first_added:
            continue
        if any(c not in byte_of for c in text):
            return None  # not byte-level
        tokens[rank] = bytes(byte_of[c] for c in text)
    if sorted(tokens) != list(range(len(tokens))):
        raise FormatError(f"{path}: the BPE ranks below {first_added} are not 0, 1, 2...", path=path)
    lines = (base64.b64encode(tokens[r]) + b" " + str(r).encode() + b"\n" for r in range(len(tokens)))
    return b"".join(lines)


def meta_params(shape: LlamaShape, config: dict[str, Any], intermediate: int) -> dict[str, Any]:
    """Meta's ``params.json`` for a Llama 3 or 3.1 HF model: Meta's fields, with an FFN multiplier and
    multiple that give back ``intermediate`` under Meta's formula."""
    hidden = int(2 * (4 * shape.dim) / 3)
    multiplier, multiple = 1.0, intermediate
    for m, k in ((1.3, 1024), (1.3, 4096), (1.2, 4096), (1.5, 256), (1.0, 256), (1.0, 1024)):
        if k * ((int(m * hidden) + k - 1) // k) == intermediate:
            multiplier, multiple = m, k
            break
    scaling = _rope(config)
    params: dict[str, Any] = {
        "dim": shape.dim,
        "ffn_dim_multiplier": multiplier,
        "multiple_of": multiple,
        "n_heads": shape.heads,
        "n_kv_heads": shape.kv_heads,
        "n_layers": shape.layers,
        "norm_eps": config.get("rms_norm_eps", 1e-5),
        "rope_theta": config.get("rope_theta", 500000.0),
        "use_scaled_rope": (scaling.get("rope_type") or scaling.get("type")) == "llama3",
        "vocab_size": config.get("vocab_size"),
    }
    return params


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
