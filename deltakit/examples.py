"""Tiny LLaMA-shaped checkpoints, real safetensors files, for the demo, the tests and the benchmarks.

:func:`write_llama_pair` writes a base and a fine-tune of it the way real releases differ: every
weight nudged, a few left untouched, the vocabulary grown (``embed_tokens`` and ``lm_head`` gain
rows), and a buffer the fine-tune no longer carries (``rotary_emb.inv_freq``); with ``tokenizer``, a
SentencePiece vocabulary like LLaMA's, so the pair also converts to GGUF.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["LlamaShape", "llama_tensors", "train_tokenizer", "write_llama_pair"]


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix every tensor shape of a LLaMA model."""

    vocab: int = 1000
    hidden: int = 64
    layers: int = 2
    intermediate: int = 172
    heads: int = 4

    def config(self, vocab: int, dtype: torch.dtype) -> dict[str, object]:
        """A ``config.json`` that ``transformers`` reads as a LlamaForCausalLM."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "num_hidden_layers": self.layers,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def llama_tensors(shape: LlamaShape, vocab: int, *, inv_freq: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LLaMA checkpoint in HF layout, in the order HF writes them."""
    h, i = shape.hidden, shape.intermediate
    yield "model.embed_tokens.weight", (vocab, h)
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}self_attn.{proj}.weight", (h, h)
        if inv_freq:
            yield f"{p}self_attn.rotary_emb.inv_freq", (h // shape.heads // 2,)
        yield f"{p}mlp.gate_proj.weight", (i, h)
        yield f"{p}mlp.up_proj.weight", (i, h)
        yield f"{p}mlp.down_proj.weight", (h, i)
        yield f"{p}input_layernorm.weight", (h,)
        yield f"{p}post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def train_tokenizer(vocab: int, *, seed: int = 0) -> bytes:
    """A SentencePiece model like LLaMA's (BPE, byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) of
    exactly ``vocab`` pieces, trained on sentences of made-up words: some 50 ms for a thousand pieces.

    Returns:
        The serialized model, the bytes of a ``tokenizer.model``.
    """
    import sentencepiece as spm

    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    # as many words as pieces: enough merges to reach ``vocab`` (SentencePiece refuses a smaller vocabulary)
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(max(vocab, 100))]
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(4 * max(vocab, 100))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
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
    return model.getvalue()


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _base_tensor(seed: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("inv_freq"):
        return 1.0 / (10000 ** (torch.arange(0, 2 * shape[0], 2, dtype=torch.float32) / (2 * shape[0])))
    return (torch.randn(shape, generator=_generator(seed, name)) * 0.02).to(dtype)


def _write_shards(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_size: int | None) -> None:
    """Write each shard as soon as it is full, so a 7B-shaped pair needs one shard in memory, not all."""
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []  # temporary file, tensor names
    size = total = 0

    def flush() -> None:
        path = folder / f"shard-{len(written)}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard_size is not None and shard and size + nbytes > shard_size:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, (path, names) in enumerate(written, start=1):
        file_name = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        path.rename(folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_side_files(folder: Path, shape: LlamaShape, vocab: int, dtype: torch.dtype, tag: str) -> None:
    (folder / "config.json").write_text(json.dumps(shape.config(vocab, dtype), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer", "note": tag}) + "\n"
    )


def write_llama_pair(
    folder: str | Path,
    *,
    shape: LlamaShape = LlamaShape(),
    extra_vocab: int = 200,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    shard_size: int | None = None,
    noise: float = 0.001,
    tokenizer: bool = False,
) -> tuple[Path, Path]:
    """Write ``folder/base`` and ``folder/finetune``, a LLaMA-shaped base and a fine-tune of it.

    The fine-tune nudges every weight except layer 0's ``input_layernorm`` (left equal, so it
    encodes as ``copy``), grows ``embed_tokens`` and ``lm_head`` by ``extra_vocab`` rows, and
    drops the base's ``rotary_emb.inv_freq`` buffers.

    Args:
        noise: the standard deviation of the Gaussian noise added to every weight (which have a
            spread of 0.02). The default moves weights by many ulps of random bits, which no lossless
            coder can shrink; 1.6e-5 moves them by an ulp or two, as little as a real fine-tune does, and
            compresses as much as the real fine-tune in BENCHMARKS.md (a format 2 payload of 26%
            of the target in fp16).
        tokenizer: also write a ``tokenizer.model`` of ``shape.vocab`` pieces (:func:`train_tokenizer`) into
            both, and into the fine-tune an ``added_tokens.json`` naming its ``extra_vocab`` new tokens, as
            a vocabulary extension has it: what ``convert`` and ``apply --to gguf`` need.

    Returns:
        The base and fine-tune folders.
    """
    folder = Path(folder)
    base_dir, tuned_dir = folder / "base", folder / "finetune"
    base_dir.mkdir(parents=True)
    tuned_dir.mkdir(parents=True)
    tuned_vocab = shape.vocab + extra_vocab

    def base_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, dims in llama_tensors(shape, shape.vocab, inv_freq=True):
            yield name, _base_tensor(seed, name, dims, dtype)

    def tuned_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, dims in llama_tensors(shape, tuned_vocab, inv_freq=False):
            base_dims = (shape.vocab, *dims[1:]) if dims[0] == tuned_vocab else dims
            tensor = _base_tensor(seed, name, base_dims, dtype)
            if name != "model.layers.0.input_layernorm.weight":
                moved = torch.randn(base_dims, generator=_generator(seed + 1, name)) * noise
                tensor = (tensor.float() + moved).to(dtype)
            if base_dims != dims:
                new_rows = torch.randn((extra_vocab, *dims[1:]), generator=_generator(seed + 2, name)) * 0.02
                tensor = torch.cat([tensor, new_rows.to(dtype)])
            yield name, tensor

    _write_shards(base_dir, base_tensors(), shard_size)
    _write_shards(tuned_dir, tuned_tensors(), shard_size)
    _write_side_files(base_dir, shape, shape.vocab, dtype, "base")
    _write_side_files(tuned_dir, shape, tuned_vocab, dtype, "fine-tune")
    (tuned_dir / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}) + "\n")
    if tokenizer:
        model = train_tokenizer(shape.vocab, seed=seed)
        (base_dir / "tokenizer.model").write_bytes(model)
        (tuned_dir / "tokenizer.model").write_bytes(model)
        added = {f"<extra_{i}>": shape.vocab + i for i in range(extra_vocab)}
        (tuned_dir / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    return base_dir, tuned_dir
