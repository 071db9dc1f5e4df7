"""convert: Meta <-> HF layouts, .bin -> safetensors, dtypes and resharding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, load_checkpoint, random_tensor, tensor_bytes
from test_cli import deltakit_cli

from deltakit import FormatError, InputNotFoundError, IntegrityError
from deltakit.convert import convert

DIM, HEADS, LAYERS, FFN, VOCAB = 32, 4, 2, 48, 40


def meta_checkpoint(folder: Path, shards: int, *, kv_heads: int = HEADS, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Meta-layout checkpoint split the way Meta splits model-parallel shards; returns the whole tensors."""
    hd = DIM // HEADS
    whole = {"tok_embeddings.weight": random_tensor((VOCAB, DIM), torch.float16, seed)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        whole[p + "attention.wq.weight"] = random_tensor((DIM, DIM), torch.float16, seed + 1 + 10 * i)
        whole[p + "attention.wk.weight"] = random_tensor((kv_heads * hd, DIM), torch.float16, seed + 2 + 10 * i)
        whole[p + "attention.wv.weight"] = random_tensor((kv_heads * hd, DIM), torch.float16, seed + 3 + 10 * i)
        whole[p + "attention.wo.weight"] = random_tensor((DIM, DIM), torch.float16, seed + 4 + 10 * i)
        whole[p + "feed_forward.w1.weight"] = random_tensor((FFN, DIM), torch.float16, seed + 5 + 10 * i)
        whole[p + "feed_forward.w2.weight"] = random_tensor((DIM, FFN), torch.float16, seed + 6 + 10 * i)
        whole[p + "feed_forward.w3.weight"] = random_tensor((FFN, DIM), torch.float16, seed + 7 + 10 * i)
        whole[p + "attention_norm.weight"] = random_tensor((DIM,), torch.float16, seed + 8 + 10 * i)
        whole[p + "ffn_norm.weight"] = random_tensor((DIM,), torch.float16, seed + 9 + 10 * i)
    whole["norm.weight"] = random_tensor((DIM,), torch.float16, seed + 98)
    whole["output.weight"] = random_tensor((VOCAB, DIM), torch.float16, seed + 99)
    axis = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "tok_embeddings": 1, "output": 0}
    folder.mkdir(parents=True)
    for s in range(shards):
        part = {}
        for name, t in whole.items():
            key = next((k for k in axis if f"{k}." in name or name.startswith(k)), None)
            if key is None:
                part[name] = t.clone()  # norms are replicated
            else:
                part[name] = t.chunk(shards, dim=axis[key])[s].clone()
        part["rope.freqs"] = torch.ones(hd // 2)
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": DIM, "n_heads": HEADS, "n_layers": LAYERS, "norm_eps": 1e-5, "vocab_size": -1, "multiple_of": 16}
    if kv_heads != HEADS:
        params["n_kv_heads"] = kv_heads
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    return whole


def reference_hf(whole: dict[str, torch.Tensor], kv_heads: int = HEADS) -> dict[str, torch.Tensor]:
    """transformers' convert_llama_weights_to_hf, on the merged tensors: names and the rotary permute."""

    def permute(w, n_heads, dim1=DIM, dim2=DIM):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    kv_dim = DIM // HEADS * kv_heads
    out = {"model.embed_tokens.weight": whole["tok_embeddings.weight"]}
    for i in range(LAYERS):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = permute(whole[p + "attention.wq.weight"], HEADS)
        out[q + "self_attn.k_proj.weight"] = permute(whole[p + "attention.wk.weight"], kv_heads, kv_dim, DIM)
        out[q + "self_attn.v_proj.weight"] = whole[p + "attention.wv.weight"]
        out[q + "self_attn.o_proj.weight"] = whole[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = whole[p + "feed_forward.w1.weight"]
        out[q + "mlp.down_proj.weight"] = whole[p + "feed_forward.w2.weight"]
        out[q + "mlp.up_proj.weight"] = whole[p + "feed_forward.w3.weight"]
        out[q + "input_layernorm.weight"] = whole[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = whole[p + "ffn_norm.weight"]
    out["model.norm.weight"] = whole["norm.weight"]
    out["lm_head.weight"] = whole["output.weight"]
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize(("shards", "kv_heads"), [(1, HEADS), (2, HEADS), (2, 2)], ids=["7b-like", "13b-like", "gqa"])
def test_meta_to_hf_matches_the_transformers_conversion(tmp_path, shards, kv_heads):
    whole = meta_checkpoint(tmp_path / "meta", shards, kv_heads=kv_heads)
    report = convert(tmp_path / "meta", tmp_path / "hf")
    assert report.source_kind == "meta"
    assert_same_tensors(load_checkpoint(tmp_path / "hf"), reference_hf(whole, kv_heads))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (DIM, FFN, VOCAB)
    assert config["num_key_value_heads"] == kv_heads
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"


def test_converted_meta_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    meta_checkpoint(tmp_path / "meta", 2)
    convert(tmp_path / "meta", tmp_path / "hf", shard_size=20_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float16)
    assert model.config.num_hidden_layers == LAYERS
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_hf_to_meta_to_hf_is_byte_exact(tmp_path, shards):
    whole = meta_checkpoint(tmp_path / "meta", 2, kv_heads=4)
    convert(tmp_path / "meta", tmp_path / "hf")
    result = deltakit_cli(
        "convert", tmp_path / "hf", "--out", tmp_path / "meta2", "--to", "meta", "--meta-shards", str(shards), "-q"
    )
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "meta2").iterdir())
    assert files == sorted(
        [f"consolidated.{s:02d}.pth" for s in range(shards)] + ["checklist.chk", "params.json", "tokenizer.model"]
    )
    # each Meta shard is what torch.load reads, and holds its slice of Meta's layout
    part = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    assert tensor_bytes(part["layers.0.attention.wq.weight"]) == tensor_bytes(
        whole["layers.0.attention.wq.weight"].chunk(shards)[0]
    )
    assert tensor_bytes(part["layers.1.feed_forward.w2.weight"]) == tensor_bytes(
        whole["layers.1.feed_forward.w2.weight"].chunk(shards, dim=1)[0]
    )
    convert(tmp_path / "meta2", tmp_path / "hf2")  # checklist.chk is checked on the way
    assert_same_tensors(load_checkpoint(tmp_path / "hf2"), load_checkpoint(tmp_path / "hf"))


def test_checklist_and_missing_shards(tmp_path):
    meta_checkpoint(tmp_path / "meta", 2)
    folder = tmp_path / "meta"
    digest = hashlib.md5((folder / "params.json").read_bytes()).hexdigest()
    (folder / "checklist.chk").write_text(f"{digest}  params.json\n{'0' * 32}  consolidated.00.pth\n")
    with pytest.raises(IntegrityError, match=r"consolidated\.00\.pth: md5 .* differs from checklist\.chk"):
        convert(folder, tmp_path / "out")
    (folder / "checklist.chk").unlink()
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(FormatError, match="a shard is missing"):
        convert(folder, tmp_path / "out")
    (folder / "consolidated.00.pth").rename(folder / "consolidated.01.pth")
    with pytest.raises(InputNotFoundError, match=r"consolidated\.00\.pth is missing"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bin_to_safetensors_with_a_dtype_change(tmp_path):
    tensors = {"w": torch.randn(64, 8), "b": torch.randn(8), "steps": torch.arange(3)}
    (tmp_path / "m").mkdir()
    torch.save(tensors, tmp_path / "m" / "pytorch_model.bin")
    (tmp_path / "m" / "config.json").write_text('{"torch_dtype": "float32"}')
    convert(tmp_path / "m", tmp_path / "out", dtype="bfloat16", shard_size=600)
    out = load_checkpoint(tmp_path / "out")
    assert tensor_bytes(out["w"]) == tensor_bytes(tensors["w"].to(torch.bfloat16))
    assert out["steps"].dtype == torch.int64, "integer tensors keep their dtype"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_llama3_row_split_embedding_is_joined_by_rows(tmp_path):
    whole = meta_checkpoint(tmp_path / "meta", 2)
    embedding = whole["tok_embeddings.weight"]
    for s in range(2):  # re-save with the embedding split by rows, as Llama 3 is
        path = tmp_path / "meta" / f"consolidated.{s:02d}.pth"
        part = torch.load(path, weights_only=True)
        part["tok_embeddings.weight"] = embedding.chunk(2, dim=0)[s].clone()
        torch.save(part, path)
    convert(tmp_path / "meta", tmp_path / "hf")
    assert tensor_bytes(load_checkpoint(tmp_path / "hf")["model.embed_tokens.weight"]) == tensor_bytes(embedding)


def test_conversions_that_would_lose_or_garble_tensors_are_refused(tmp_path):
    from deltakit import UnsupportedInputError

    meta_checkpoint(tmp_path / "meta", 1)
    extra = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    extra["layers.0.attention.wq.bias"] = torch.zeros(DIM, dtype=torch.float16)
    torch.save(extra, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(UnsupportedInputError, match=r"'layers\.0\.attention\.wq\.bias' has no counterpart"):
        convert(tmp_path / "meta", tmp_path / "hf")
    del extra["layers.0.attention.wq.bias"]
    torch.save(extra, tmp_path / "meta" / "consolidated.00.pth")
    convert(tmp_path / "meta", tmp_path / "hf")
    with pytest.raises(UnsupportedInputError, match="do not split into 3"):
        convert(tmp_path / "hf", tmp_path / "meta3", to="meta", meta_shards=3)
    assert not (tmp_path / "meta3").exists()


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"n_heads": 0}, "n_heads must be an integer from 1 to"),
        ({"n_layers": 100_000_000}, "n_layers must be an integer from 1 to 4096"),
        ({"n_layers": 2.0}, "n_layers must be an integer"),
        ({"dim": "32"}, "dim must be an integer"),
        ({"n_heads": 5}, "n_heads 5 must divide dim 32"),
        ({"n_kv_heads": 3}, "n_kv_heads 3 must divide n_heads"),
        ({"n_layers": None}, "n_layers must be an integer"),
    ],
)
def test_params_json_out_of_bounds_is_a_named_error(tmp_path, edits, message):
    meta_checkpoint(tmp_path / "meta", 1)
    params_path = tmp_path / "meta" / "params.json"
    params = json.loads(params_path.read_text())
    params.update(edits)
    params_path.write_text(json.dumps(params))
    with pytest.raises(FormatError, match=message) as caught:
        convert(tmp_path / "meta", tmp_path / "hf")
    assert caught.value.path == params_path
    assert not (tmp_path / "hf").exists()


def test_the_family_registry_finds_llama_by_architecture_or_model_type():
    from deltakit.families import FAMILIES, family_of
    from deltakit.families.llama import LLAMA

    assert LLAMA in FAMILIES
    assert family_of({"architectures": ["LlamaForCausalLM"]}) is LLAMA
    assert family_of({"architectures": ["LLaMAForCausalLM"], "model_type": "other"}) is LLAMA
    assert family_of({"model_type": "llama"}) is LLAMA
    assert family_of({"architectures": [], "model_type": "llama"}) is LLAMA
    assert family_of({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"}) is None
    assert family_of({"model_type": "gpt2"}) is None and family_of({}) is None
