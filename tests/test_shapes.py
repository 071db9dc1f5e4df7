"""make -> apply -> verify is byte-exact on the shapes of today's families, in bf16 as they ship:
Llama 3.x (GQA, tied embeddings for 3.2 1B/3B), Qwen2/2.5 (q/k/v biases, a config vocabulary larger
than the tokenizer's, tied embeddings for the small ones), Qwen3 (q_norm/k_norm), and fine-tunes that
grow the vocabulary of a tied model or untie its embeddings (lm_head in the target only)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import Tensors, assert_same_tensors, load_checkpoint, nudged, random_tensor, write_checkpoint

from deltakit import apply_delta, make_delta, verify_delta, verify_model
from deltakit.engine.make import MAX_RAW_SHARE


@dataclass(frozen=True)
class Family:
    """The sizes and traits that fix every tensor of a Llama 3 / Qwen2 / Qwen3 checkpoint."""

    model_type: str
    vocab: int = 256  # embedding rows, the config's vocab_size
    tokens: int = 256  # the tokenizer's vocabulary (fewer when the config pads, as Qwen2.5's does)
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2  # GQA
    layers: int = 2
    intermediate: int = 128
    tied: bool = False
    biases: bool = False  # Qwen2's q/k/v biases
    qk_norm: bool = False  # Qwen3's per-head q_norm and k_norm

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict[str, object]:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        return {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "torch_dtype": "bfloat16",
        }

    def tensors(self, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Tensors:
        """Random weights in the order transformers saves them; norms near one."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            for proj, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                shapes.append((f"{p}self_attn.{proj}.weight", (rows, h)))
                if self.biases:
                    shapes.append((f"{p}self_attn.{proj}.bias", (rows,)))
            shapes.append((f"{p}self_attn.o_proj.weight", (h, h)))
            if self.qk_norm:
                shapes += [
                    (f"{p}self_attn.q_norm.weight", (self.head_dim,)),
                    (f"{p}self_attn.k_norm.weight", (self.head_dim,)),
                ]
            shapes += [
                (f"{p}mlp.gate_proj.weight", (self.intermediate, h)),
                (f"{p}mlp.up_proj.weight", (self.intermediate, h)),
                (f"{p}mlp.down_proj.weight", (h, self.intermediate)),
                (f"{p}input_layernorm.weight", (h,)),
                (f"{p}post_attention_layernorm.weight", (h,)),
            ]
        shapes.append(("model.norm.weight", (h,)))
        if not self.tied:
            shapes.append(("lm_head.weight", (self.vocab, h)))
        out: Tensors = {}
        for i, (name, shape) in enumerate(shapes):
            t = random_tensor(shape, torch.float32, seed * 1000 + i)
            out[name] = ((1 + 0.05 * t) if name.endswith("norm.weight") else 0.02 * t).to(dtype)
        return out

    def files(self) -> dict[str, str]:
        """config.json and a tokenizer.json of ``tokens`` entries (fewer than the rows when padded)."""
        vocab = {f"t{i}": i for i in range(self.tokens)}
        tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []}}
        return {"config.json": json.dumps(self.config(), indent=2), "tokenizer.json": json.dumps(tokenizer)}


LLAMA_3_2_1B = Family("llama", tied=True)  # 3.2 1B/3B tie; 3.1 8B does not
LLAMA_3_1_8B = Family("llama", heads=8, kv_heads=2)
QWEN2_5_0_5B = Family("qwen2", vocab=320, tokens=301, heads=4, kv_heads=1, tied=True, biases=True)
QWEN2_5_7B = Family("qwen2", vocab=320, tokens=301, biases=True)
QWEN3 = Family("qwen3", tied=True, qk_norm=True)
FAMILIES = {
    "llama-3.2-1b": LLAMA_3_2_1B,
    "llama-3.1-8b": LLAMA_3_1_8B,
    "qwen2.5-0.5b": QWEN2_5_0_5B,
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen3": QWEN3,
}


def finetune(base: Tensors, target: Family, seed: int = 1) -> Tensors:
    """Every weight of ``base`` nudged (norms and biases too), rows past the base's vocabulary new, and
    an lm_head of the embedding's values where the target unties a tied base."""
    out: Tensors = {}
    new = target.tensors(seed=seed + 100)
    for name, t in new.items():
        held = base.get(name)
        if held is None and name == "lm_head.weight":
            held = base["model.embed_tokens.weight"]  # untying starts from the tied weights
        if held is None:
            out[name] = t
            continue
        moved = nudged(held, seed + len(out), scale=1e-3)
        out[name] = torch.cat([moved, t[held.shape[0] :]]) if t.shape[0] > held.shape[0] else moved
    return out


def write(folder: Path, family: Family, tensors: Tensors) -> Path:
    return write_checkpoint(folder, tensors, files=family.files())


def roundtrip(tmp_path: Path, base: Family, target: Family, **make_kwargs):
    base_tensors = base.tensors()
    target_tensors = finetune(base_tensors, target)
    base_dir = write(tmp_path / "base", base, base_tensors)
    target_dir = write(tmp_path / "target", target, target_tensors)
    report = make_delta(base_dir, target_dir, tmp_path / "delta", **make_kwargs)
    apply_delta(base_dir, tmp_path / "delta", tmp_path / "out")
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target_tensors)
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (target_dir / name).read_bytes(), name
    assert verify_delta(tmp_path / "delta", base=base_dir).ok
    assert verify_model(tmp_path / "out", tmp_path / "delta").ok
    return report, target_tensors


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_each_family_round_trips_byte_exact_in_bf16(tmp_path, family):
    report, target = roundtrip(tmp_path, family, family)

    assert all(t.dtype == torch.bfloat16 for t in target.values())
    assert report.raw_tensors == {} and report.cast == () and report.dropped == ()
    tensors = report.manifest.target.tensors
    assert ("lm_head.weight" in tensors) is not family.tied
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    assert {t.encoding for t in tensors.values()} <= {"xor", "sub", "copy"}
    k_proj = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert list(k_proj.shape) == [family.kv_heads * family.head_dim, family.hidden]
    if family.biases:
        assert list(tensors["model.layers.1.self_attn.v_proj.bias"].shape) == [family.kv_heads * family.head_dim]
    if family.qk_norm:
        assert list(tensors["model.layers.1.self_attn.k_norm.weight"].shape) == [family.head_dim]
    assert tensors["model.embed_tokens.weight"].shape[0] == family.vocab  # the config's rows, not the tokenizer's


@pytest.mark.parametrize("family", [LLAMA_3_2_1B, QWEN2_5_0_5B], ids=["llama-3.2-1b", "qwen2.5-0.5b"])
def test_vocabulary_growth_on_a_tied_model_adds_rows_to_the_embedding_alone(tmp_path, family):
    grown = replace(family, vocab=family.vocab + 24, tokens=family.tokens + 24)

    report, _ = roundtrip(tmp_path, family, grown)

    tensors = report.manifest.target.tensors
    assert tensors["model.embed_tokens.weight"].encoding == "rows"
    assert "lm_head.weight" not in tensors and report.raw_tensors == {}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == grown.vocab


# Llama 3.2 1B: an embedding of 128256 x 2048 in 1.24B parameters; untied, its lm_head is a sixth of the
# fine-tune. The tiny model keeps that proportion: 384 x 64 against 2 layers of 36864 weights.
UNTIED_VOCAB = 384


@pytest.mark.parametrize("grow", [0, 32], ids=["same-vocab", "grown-vocab"])
def test_a_fine_tune_that_unties_embeddings_stores_lm_head_raw_and_is_not_refused(tmp_path, grow):
    base = replace(LLAMA_3_2_1B, vocab=UNTIED_VOCAB, tokens=UNTIED_VOCAB)
    target = replace(base, tied=False, vocab=UNTIED_VOCAB + grow, tokens=UNTIED_VOCAB + grow)

    report, tensors = roundtrip(tmp_path, base, target)

    share = tensors["lm_head.weight"].nbytes / sum(t.nbytes for t in tensors.values())
    assert 0.15 < share < 0.25 < MAX_RAW_SHARE
    assert list(report.raw_tensors) == ["lm_head.weight"]
    assert "not in the base" in report.raw_tensors["lm_head.weight"]
    assert report.manifest.target.tensors["lm_head.weight"].encoding == "raw"
    assert report.manifest.target.tensors["model.embed_tokens.weight"].encoding in (
        ("rows",) if grow else ("xor", "sub")
    )


def test_retying_drops_lm_head(tmp_path):
    report, _ = roundtrip(tmp_path, LLAMA_3_1_8B, replace(LLAMA_3_1_8B, tied=True))
    assert report.dropped == ("lm_head.weight",) and report.raw_tensors == {}


@pytest.mark.slow
def test_the_demo_pair_goes_to_gguf_as_llama_cpps_converter_writes_the_fine_tune(tmp_path):
    """The demo's model (bf16, a trained SentencePiece vocabulary, 200 added tokens): apply --to gguf
    gives the file llama.cpp's own converter writes from the fine-tune's folder, key for key and byte
    for byte."""
    import llamacpp

    from deltakit.examples import write_llama_pair
    from deltakit.gguf import apply_to_gguf

    llama = llamacpp.build()
    base, tuned = write_llama_pair(tmp_path / "demo", noise=1.6e-5, dtype=torch.bfloat16, tokenizer=True)
    make_delta(base, tuned, tmp_path / "delta")
    apply_to_gguf(base, tmp_path / "delta", tmp_path / "ours.gguf")
    theirs = llamacpp.convert_hf(llama, tuned, tmp_path / "theirs.gguf", "f16")

    llamacpp.assert_same_gguf(tmp_path / "ours.gguf", theirs)


def test_a_qwen_fine_tune_that_shrank_its_padded_vocabulary_is_refused_but_rebuilds_with_allow_raw(tmp_path):
    """``resize_token_embeddings(len(tokenizer))`` on Qwen2.5 cuts the padded rows (151936 -> 151665):
    the fine-tune has fewer rows than its base, which make takes for swapped base and target. With
    ``allow_raw`` the embedding is stored whole and the rebuild is exact; a delta of the first rows
    would need an encoding the package format lacks."""
    from deltakit import RawWeightsError

    base = QWEN2_5_0_5B
    shrunk = replace(base, vocab=base.tokens)
    base_tensors = base.tensors()
    target = finetune(base_tensors, shrunk)
    target["model.embed_tokens.weight"] = target["model.embed_tokens.weight"][: base.tokens].clone()
    base_dir = write(tmp_path / "base", base, base_tensors)
    target_dir = write(tmp_path / "target", shrunk, target)
    with pytest.raises(RawWeightsError, match="base and target look swapped"):
        make_delta(base_dir, target_dir, tmp_path / "refused")

    report = make_delta(base_dir, target_dir, tmp_path / "delta", allow_raw=True)
    apply_delta(base_dir, tmp_path / "delta", tmp_path / "out")

    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)
    assert list(report.raw_tensors) == ["model.embed_tokens.weight"]
