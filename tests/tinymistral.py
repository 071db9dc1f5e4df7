"""A tiny real Mistral for the GGUF tests: transformers' own MistralForCausalLM with seeded weights, the
config.json a Mistral 7B release has (v0.1's or v0.3's keys, tiny sizes), and Mistral's own SentencePiece
tokenizer as the ``mistral-common`` package ships it (``tokenizer.model.v1``: v0.1's 32000 pieces;
``mistral_instruct_tokenizer_240216.model.v2``: the 32768 pieces of v0.3, whose 771 control tokens
<unk>, <s>, </s>, [INST] ... [control_768] are those v0.3's Hugging Face release lists), saved by
transformers' LlamaTokenizer with the tokenizer_config.json keys Mistral's releases carry.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

# mistral-common's copies of the tokenizer.model files of Mistral 7B's Hugging Face releases
TOKENIZERS = {"v0.1": "tokenizer.model.v1", "v0.3": "mistral_instruct_tokenizer_240216.model.v2"}
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


def mistral_tokenizer(release: str) -> Path:
    """The SentencePiece model file of Mistral 7B ``release``, from the installed mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None and spec.submodule_search_locations, "mistral-common is in the dev extra"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / TOKENIZERS[release]


def write_tiny_mistral(
    folder: Path,
    *,
    release: str = "v0.3",
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = 2,
    dtype: str = "bfloat16",
    defaults: bool = False,
    echo: bool = False,
    seed: int = 0,
) -> Path:
    """An HF Mistral folder: config.json as ``release`` has it, safetensors weights, Mistral's tokenizer.

    ``defaults`` leaves out what MistralConfig fills in (max_position_embeddings, rms_norm_eps, and with
    ``kv_heads=None`` num_key_value_heads, which it makes 8 where LlamaConfig makes it the head count).
    ``echo``: the head scores each token by its own embedding (see tinyllama.write_tiny_llama).
    """
    import torch
    from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_tokenizer(release), folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=release == "v0.1")
    vocab = 32000 if release == "v0.1" else 32768
    config = {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0 if release == "v0.1" else 1000000.0,
        "sliding_window": 4096 if release == "v0.1" else None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.34.0.dev0" if release == "v0.1" else "4.42.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
    }
    if release == "v0.1":
        del config["attention_dropout"]
    if defaults:
        del config["max_position_embeddings"], config["rms_norm_eps"]
    if kv_heads is None:
        del config["num_key_value_heads"]
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    with torch.no_grad():  # weights of a trained model's spread, and norms that are not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                quiet = echo and "layers." in name
                p.copy_(torch.randn_like(p) * (0.02 if quiet else 0.08))
        if echo:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight * 8)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    tokenizer.save_pretrained(folder)
    _release_tokenizer_config(folder, release)
    return folder


def _release_tokenizer_config(folder: Path, release: str) -> None:
    """tokenizer_config.json's keys as Mistral's release has them: v0.3 lists its 771 control tokens
    (<unk>, <s>, </s>, [INST]..., [control_768]) in added_tokens_decoder, and carries a chat template."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    specials = 3 if release == "v0.1" else 771
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok |= {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": sp.IdToPiece(i), **flags} for i in range(specials)},
        "legacy": release == "v0.1",
        "tokenizer_class": "LlamaTokenizer",
    }
    if release == "v0.3":
        tok["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
