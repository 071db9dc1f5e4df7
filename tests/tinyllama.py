"""A tiny real LLaMA for the GGUF tests: transformers' own LlamaForCausalLM with seeded weights, saved
by ``save_pretrained``, and a SentencePiece tokenizer trained here (BPE with byte fallback, as LLaMA's),
saved by transformers' LlamaTokenizer with one added special token, so vocabulary growth is exercised.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

_WORDS = (  # noqa: SIM905 - a text is easier to read than 40 quoted words
    "the a delta base model weights tensor file rebuild verify apply make release panda llama vicuna "
    "alpaca fine tune train step loss token vocab row column head layer norm rope gguf quant bit byte "
    "你好 世界 模型 权重 中文 词表"
).split()


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic sentences over a small word list (some of them Chinese, so bytes fall back)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(lines)]


def train_tokenizer(folder: Path, vocab: int = 384) -> Path:
    """A SentencePiece model like LLaMA's: BPE, byte fallback, <unk>=0, <s>=1, </s>=2, no pad."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=str(folder / "sp"),
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return folder / "sp.model"


def write_tiny_llama(
    folder: Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: str = "float16",
    extra_rows: int = 0,
    legacy: bool = False,
    echo: bool = False,
    seed: int = 0,
) -> Path:
    """An HF LLaMA folder: config, safetensors weights, tokenizer (384 SentencePiece pieces + ``<pad>``).

    ``extra_rows`` adds embedding rows beyond the tokenizer's (as a vocabulary padded to a multiple
    does), which converters fill with placeholder tokens. ``legacy`` writes the files as LLaMA-1/2
    era releases have them: a config.json without head_dim, KV heads or rope parameters, and a
    tokenizer_config.json with ``added_tokens_decoder`` and ``add_bos_token``. ``echo`` makes the head
    score each token by its own embedding: a model that predicts the token it reads, by margins wide
    enough that 4-bit rounding keeps every top-1 (random weights alone give near ties).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model_file = train_tokenizer(folder.parent / f"{folder.name}-sentencepiece")
    shutil.copyfile(model_file, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder)  # transformers converts it (tokenizer.json)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vocab = len(tokenizer) + extra_rows
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights of a trained model's spread, and norms that are not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:  # with echo, blocks quiet enough that the embedding still leads the residual stream
                quiet = echo and "layers." in name
                p.copy_(torch.randn_like(p) * (0.02 if quiet else 0.08))
        if echo:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight * 8)
    model.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if legacy:
        _legacy_files(folder, tokenizer.pad_token_id)
    return folder


def _legacy_files(folder: Path, pad_id: int) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key in ("head_dim", "rope_parameters", "dtype"):
        config.pop(key, None)
    if config["num_key_value_heads"] == config["num_attention_heads"]:
        del config["num_key_value_heads"]
    config |= {"torch_dtype": "float16", "rope_scaling": {"type": "linear", "factor": 2.0}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokens = {"0": "<unk>", "1": "<s>", "2": "</s>", str(pad_id): "<pad>"}
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok |= {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {k: {"content": v, "special": True} for k, v in tokens.items()},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))


def write_finetune(base: Path, folder: Path, *, extra_rows: int = 0, seed: int = 1) -> Path:
    """A fine-tune of the tiny LLaMA at ``base``: every weight nudged, and ``extra_rows`` more rows in the
    embedding and the head (config.json's vocab_size grown to match), as a vocabulary extension makes."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copyfile(path, folder / path.name)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    for name, t in tensors.items():
        t = (t.float() + torch.randn(t.shape, generator=g) * 0.004).to(t.dtype)
        if extra_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, (torch.randn(extra_rows, t.shape[1], generator=g) * 0.08).to(t.dtype)])
        tensors[name] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += extra_rows
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
