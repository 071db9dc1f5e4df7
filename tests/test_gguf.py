"""GGUF output, read back with llama.cpp's own gguf reader: names, shapes, types, metadata and values.

No compiler is needed here; tests/test_gguf_llamacpp.py holds the same files to llama.cpp itself (slow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_cli import deltakit_cli
from tinyllama import write_finetune, write_tiny_llama

from deltakit import BaseMismatchError, IntegrityError, OutputExistsError, UnsupportedInputError, make_delta
from deltakit.convert import convert
from deltakit.errors import FormatError, InputNotFoundError
from deltakit.gguf import apply_to_gguf, convert_to_gguf

gguf = pytest.importorskip("gguf")

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, _ = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.weight"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's q/k rows (Meta's rotary order) back to HF's: the inverse of llama.cpp's permute."""
    rows = w.shape[0] // heads
    return w.reshape(heads, rows // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny LLaMA (GQA: 4 heads, 2 KV heads; fp16) and a fine-tune of it with 6 more vocabulary rows."""
    tmp = tmp_path_factory.mktemp("gguf")
    base = write_tiny_llama(tmp / "llama-tiny", seed=3)
    target = write_finetune(base, tmp / "panda-tiny", extra_rows=6)
    make_delta(base, target, tmp / "panda-tiny-delta")
    return tmp, base, target, tmp / "panda-tiny-delta"


def read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_1"])
def test_convert_writes_what_the_gguf_reader_reads_back(models, tmp_path, quant):
    _, _, target, _ = models
    report = convert_to_gguf(target, tmp_path / "m.gguf", quant=quant)
    fields, tensors = read(tmp_path / "m.gguf")
    config = json.loads((target / "config.json").read_text())
    source = load_file(str(target / "model.safetensors"))
    assert report.tensors == len(source) == len(tensors)
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "Panda Tiny"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.vocab_size"] == config["vocab_size"] == 391  # 384 pieces, <pad>, 6 grown rows
    assert fields["llama.context_length"] == 256 and fields["llama.rope.dimension_count"] == 16
    assert fields["llama.rope.freq_base"] == 10000.0
    assert abs(fields["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    tokens, kinds = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 391 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[-1] == "[PAD390]"
    assert kinds[0] == 2 and kinds[1] == kinds[2] == 3 and kinds[3] == 6 and kinds[-1] == 5  # unk, control, byte
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}", 0))
    wanted = gguf.GGMLQuantizationType[quant.upper()]
    for hf_name, tensor in source.items():
        t = tensors[gguf_name(hf_name)]
        assert tuple(int(n) for n in t.shape) == tuple(reversed(tensor.shape)), hf_name
        expected_type = gguf.GGMLQuantizationType.F32 if tensor.dim() == 1 else wanted
        if hf_name == "lm_head.weight" and quant in ("q4_0", "q5_1"):  # kept finer, as llama.cpp keeps it
            expected_type = gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == expected_type, hf_name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensor.shape)
        if "q_proj" in hf_name or "k_proj" in hf_name:
            values = unpermute(values, 4 if "q_proj" in hf_name else 2)
        exact = tensor.float().numpy()
        if quant in ("f32", "f16"):  # the source is fp16: both hold it exactly
            assert np.array_equal(values, exact), hf_name
        else:  # rounding of bf16, or one quantization step of each 32-value block
            coarse = quant in ("q4_0", "q5_1") and hf_name != "lm_head.weight"
            step = np.abs(exact).max() * (2**-8 if quant == "bf16" else 1 / 7 if coarse else 1 / 127)
            assert np.abs(values - exact).max() <= step, hf_name


def test_apply_to_gguf_equals_converting_the_rebuilt_model(models, tmp_path, monkeypatch):
    """Straight from base + delta, byte for byte what converting the fine-tune's own folder gives; the
    same again when every tensor goes through a scratch file instead of memory."""
    from deltakit.engine import apply as apply_module

    _, base, target, delta = models
    for quant in ("f16", "q8_0"):
        apply_to_gguf(base, delta, tmp_path / f"a-{quant}.gguf", quant=quant)
        convert_to_gguf(target, tmp_path / f"c-{quant}.gguf", quant=quant)
        assert (tmp_path / f"a-{quant}.gguf").read_bytes() == (tmp_path / f"c-{quant}.gguf").read_bytes()
    monkeypatch.setattr(apply_module, "MEMORY_TENSOR_BYTES", 1024)
    apply_to_gguf(base, delta, tmp_path / "spilled.gguf", quant="q8_0")
    assert (tmp_path / "spilled.gguf").read_bytes() == (tmp_path / "c-q8_0.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-f16.gguf",
        "a-q8_0.gguf",
        "c-f16.gguf",
        "c-q8_0.gguf",
        "spilled.gguf",
    ]


def test_the_models_name_comes_from_the_delta_as_a_folder_name_never_a_path(models, tmp_path):
    """A Hub id keeps its last part (what llama.cpp reads from a folder of that name); a name that would
    climb out of the staging folder cannot; a delta without the vocabulary is refused by name."""
    _, base, target, _ = models
    for name, expected in (("dandelion/panda-tiny", "Panda Tiny"), ("../../escape", "Escape"), ("..", "Model")):
        make_delta(base, target, tmp_path / "d", name=name)
        apply_to_gguf(base, tmp_path / "d", tmp_path / "m.gguf")
        fields, _ = read(tmp_path / "m.gguf")
        assert fields["general.name"] == expected
        shutil.rmtree(tmp_path / "d")
        (tmp_path / "m.gguf").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not (tmp_path.parent / "escape").exists()
    make_delta(base, target, tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "deltakit.json").read_text())
    del manifest["target"]["files"]["tokenizer.model"]
    (tmp_path / "d" / "deltakit.json").write_text(json.dumps(manifest))
    with pytest.raises(InputNotFoundError, match=r"carries no tokenizer\.model"):
        apply_to_gguf(base, tmp_path / "d", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_meta_checkpoint_gives_the_same_tensors(models, tmp_path):
    """Meta's layout keeps q/k in the rotary order GGUF wants: no permutation either way, same bytes."""
    _, _, target, _ = models
    convert(target, tmp_path / "meta", to="meta")
    shutil.copyfile(target / "tokenizer.model", tmp_path / "meta" / "tokenizer.model")
    convert_to_gguf(tmp_path / "meta", tmp_path / "meta.gguf", quant="q8_0")
    convert_to_gguf(target, tmp_path / "hf.gguf", quant="q8_0")
    _, from_meta = read(tmp_path / "meta.gguf")
    _, from_hf = read(tmp_path / "hf.gguf")
    assert sorted(from_meta) == sorted(from_hf)
    for name, t in from_hf.items():
        assert from_meta[name].tensor_type == t.tensor_type and bytes(from_meta[name].data) == bytes(t.data), name


def test_a_wrong_base_or_a_corrupt_delta_leaves_nothing(models, tmp_path):
    _, base, target, delta = models
    out = tmp_path / "m.gguf"
    with pytest.raises(BaseMismatchError):
        apply_to_gguf(target, delta, out)  # the fine-tune is not the base
    corrupt = tmp_path / "corrupt-delta"
    shutil.copytree(delta, corrupt)
    payload = next(corrupt.glob("delta*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[-100] ^= 0x40  # a byte of the last tensor's payload: found only as it streams
    payload.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        apply_to_gguf(base, corrupt, out)
    assert list(tmp_path.iterdir()) == [corrupt]  # no GGUF, no staging folder
    out.write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        convert_to_gguf(target, out)
    assert out.read_bytes() == b"mine"


def test_what_cannot_become_a_llama_gguf_is_refused_by_name(models, tmp_path):
    _, _, target, _ = models
    other = tmp_path / "gpt"
    shutil.copytree(target, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedInputError, match="'GPT2LMHeadModel' is not LLaMA"):
        convert_to_gguf(other, tmp_path / "a.gguf")
    (other / "config.json").write_text(json.dumps(config | {"vocab_size": 32000}))
    with pytest.raises(FormatError, match=r"vocab_size 32000 differs from the 391 rows of 'model\.embed_tokens"):
        convert_to_gguf(other, tmp_path / "v.gguf")
    (other / "config.json").write_text(json.dumps(config))
    (other / "tokenizer.model").unlink()
    with pytest.raises(InputNotFoundError, match=r"tokenizer\.model is missing"):
        convert_to_gguf(other, tmp_path / "b.gguf")
    with pytest.raises(UnsupportedInputError, match="unknown GGUF type 'q3_0'") as caught:
        convert_to_gguf(target, tmp_path / "c.gguf", quant="q3_0")
    assert caught.value.argument == "quant" and "--quant" not in str(caught.value)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(UnsupportedInputError, match=r"pip install 'deltakit-llm\[kquants\]'") as caught:
            convert_to_gguf(target, tmp_path / "d.gguf", quant="q4_k_m")
        assert caught.value.argument == "quant" and "--quant" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt"]


def test_the_cli_writes_gguf_from_convert_and_apply(models, tmp_path):
    _, base, target, delta = models
    done = deltakit_cli(
        "apply", "--base", base, "--delta", delta, "--out", tmp_path / "a.gguf", "--to", "gguf", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["types"] == {"F16": 16, "F32": 5} and "rebuilt" in done.stderr
    done = deltakit_cli("convert", target, "--to", "gguf", "--quant", "q8_0", "--out", tmp_path / "c.gguf", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["types"] == {"F32": 5, "Q8_0": 16}
    refused = deltakit_cli("convert", target, "--quant", "q8_0", "--out", tmp_path / "x")
    assert refused.returncode == 2 and "--quant is for --to gguf" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "c.gguf"]


def test_force_replaces_a_gguf_only_once_the_new_one_is_verified(models, tmp_path):
    _, base, target, delta = models
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(BaseMismatchError):
        apply_to_gguf(target, delta, out, replace=True)
    assert out.read_bytes() == b"mine" and list(tmp_path.iterdir()) == [out], "the old file stays whole"
    apply_to_gguf(base, delta, out, replace=True)
    assert out.read_bytes()[:4] == b"GGUF" and list(tmp_path.iterdir()) == [out]
    converted = deltakit_cli("convert", target, "--to", "gguf", "--out", out, "-q")
    assert converted.returncode == 1 and "exists" in converted.stderr
    converted = deltakit_cli("convert", target, "--to", "gguf", "--out", out, "-q", "--force")
    assert converted.returncode == 0, converted.stderr
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "old").write_text("x")
    converted = deltakit_cli("convert", target, "--out", folder, "-q", "--force")
    assert converted.returncode == 0, converted.stderr
    assert not (folder / "old").exists() and (folder / "config.json").is_file()
