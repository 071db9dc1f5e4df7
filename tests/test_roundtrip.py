"""make -> apply rebuilds the target byte for byte, whatever the dtypes, shapes and sharding.

Every test here runs on both package formats: 1 (raw payload) and 2 (framed and coded payload).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_same_tensors,
    finetune_of,
    llama_like,
    load_checkpoint,
    nudged,
    random_tensor,
    tensor_bytes,
    write_checkpoint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltakit
from deltakit import apply_delta, make_delta, verify_delta, verify_model
from deltakit.formats import read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOSSLESS = {1: ("xor",), 2: ("xor", "sub")}  # the encodings the lossless codec gives a changed tensor


@pytest.fixture(params=[1, 2], ids=["format1", "format2"], autouse=True)
def fmt(request, monkeypatch):
    """make_delta in this module writes the package format under test."""
    monkeypatch.setitem(globals(), "make_delta", functools.partial(deltakit.make_delta, format=request.param))
    return request.param


def roundtrip(tmp_path: Path, base_dir: Path, target_dir: Path, **make_kwargs) -> deltakit.MakeReport:
    report = make_delta(base_dir, target_dir, tmp_path / "delta", **make_kwargs)
    apply_delta(base_dir, tmp_path / "delta", tmp_path / "out")
    return report


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_xor_roundtrip_with_vocab_growth_is_byte_exact(tmp_path, make_pair, dtype, fmt):
    base = llama_like(dtype)
    target = finetune_of(base, extra_vocab=17)
    base_dir, target_dir = make_pair(base, target)

    report = roundtrip(tmp_path, base_dir, target_dir)

    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)
    encodings = report.manifest.target.tensors
    assert encodings["model.embed_tokens.weight"].encoding == "rows"
    assert encodings["model.embed_tokens.weight"].base_rows == 64
    assert encodings["lm_head.weight"].encoding == "rows"
    assert encodings["model.norm.weight"].encoding == "copy"
    assert encodings["model.layers.0.self_attn.q_proj.weight"].encoding in LOSSLESS[fmt]
    assert encodings["lm_head.weight"].codec in LOSSLESS[fmt]
    assert report.manifest.format == fmt
    assert report.raw_tensors == {}
    assert (tmp_path / "out" / "config.json").read_bytes() == (target_dir / "config.json").read_bytes()
    assert verify_model(tmp_path / "out", tmp_path / "delta").ok
    assert verify_delta(tmp_path / "delta", base=base_dir).ok


def test_sharded_inputs_added_and_dropped_tensors(tmp_path, make_pair):
    base = llama_like(torch.float16, layers=3)
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    target = finetune_of({k: v for k, v in base.items() if "inv_freq" not in k}, extra_vocab=5)
    target["score.weight"] = random_tensor((3, 16), torch.float16, 7)  # new head, no base counterpart
    target["model.layers.1.input_layernorm.weight"] = random_tensor((16, 2), torch.float16, 8)  # reshaped
    base_dir, target_dir = make_pair(base, target, shards=3, files={"config.json": "{}", "sub/tok.json": "[1]"})

    report = roundtrip(tmp_path, base_dir, target_dir, shard_size=4000)

    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)
    assert report.dropped == ("model.layers.0.self_attn.rotary_emb.inv_freq",)
    assert set(report.raw_tensors) == {"score.weight", "model.layers.1.input_layernorm.weight"}
    assert "not in the base" in report.raw_tensors["score.weight"]
    assert len(report.manifest.payload) > 1, "payload should be sharded at 4000 bytes"
    assert (tmp_path / "out" / "sub" / "tok.json").read_text() == "[1]"
    # the base digests cover every base tensor, dropped ones included: the fingerprint is the base's
    assert set(report.manifest.base.tensors) == set(base)


def test_output_is_sharded_with_an_hf_index(tmp_path, make_pair):
    base = llama_like(torch.float32)
    base_dir, target_dir = make_pair(base, finetune_of(base))
    make_delta(base_dir, target_dir, tmp_path / "delta")
    report = apply_delta(base_dir, tmp_path / "delta", tmp_path / "out", shard_size=5000)

    assert len(report.shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert set(index["weight_map"].values()) == set(report.shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    for shard in report.shards:
        assert read_header(tmp_path / "out" / shard).metadata == {"format": "pt"}
    assert_same_tensors(load_checkpoint(tmp_path / "out"), finetune_of(base))


def test_scalars_zero_size_and_integer_tensors(tmp_path, make_pair):
    base = {
        "scalar": torch.tensor(3.5, dtype=torch.float32),
        "empty": torch.zeros((0, 4), dtype=torch.float16),
        "ints": torch.arange(10, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "same_empty": torch.zeros(0, dtype=torch.bfloat16),
    }
    target = {
        "scalar": torch.tensor(-0.0, dtype=torch.float32),
        "empty": torch.zeros((0, 4), dtype=torch.float16),
        "ints": torch.arange(10, dtype=torch.int64) * 3,
        "flags": torch.tensor([False, False, True]),
        "same_empty": torch.zeros(0, dtype=torch.bfloat16),
        "new_empty": torch.zeros((2, 0), dtype=torch.float32),
    }
    base_dir, target_dir = make_pair(base, target)
    report = roundtrip(tmp_path, base_dir, target_dir)
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)
    tensors = report.manifest.target.tensors
    assert tensors["empty"].encoding == "copy"
    assert tensors["new_empty"].encoding == "raw"
    assert tensors["scalar"].encoding == "xor"


def test_base_in_another_dtype_is_cast_round_to_nearest_even(tmp_path, make_pair):
    base32 = llama_like(torch.float32)
    target16 = {n: nudged(t, 5).to(torch.float16) for n, t in base32.items()}
    target16["model.norm.weight"] = base32["model.norm.weight"].to(torch.float16)  # equal after the cast
    base_dir, target_dir = make_pair(base32, target16)

    report = roundtrip(tmp_path, base_dir, target_dir)

    assert_same_tensors(load_checkpoint(tmp_path / "out"), target16)
    assert report.manifest.target.tensors["model.embed_tokens.weight"].cast_from == "F32"
    assert report.manifest.target.tensors["model.norm.weight"].encoding == "copy"
    assert set(report.cast) == set(base32)


def test_new_rows_of_a_cast_tensor_are_framed_by_the_wider_item(tmp_path, make_pair):
    """An fp16 fine-tune of an fp32 base that grows by more than 8 MiB / 4 elements: make framed the new
    rows by the target's 2-byte item, into frames the manifest reader (rightly) refuses, so apply
    refused make's own package."""
    base = {"model.embed_tokens.weight": random_tensor((16, 1024), torch.float32, 3)}
    grown = random_tensor((2100 * 2, 1024), torch.float16, 4)  # 4.3M new elements: over 2M a frame
    target = {"model.embed_tokens.weight": torch.cat([base["model.embed_tokens.weight"].half(), grown])}
    base_dir, target_dir = make_pair(base, target)
    report = roundtrip(tmp_path, base_dir, target_dir)
    assert report.manifest.target.tensors["model.embed_tokens.weight"].encoding == "rows"
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)


def test_add_codec_rebuild_matches_the_manifest_and_reports_inexact_elements(tmp_path, make_pair):
    base = llama_like(torch.bfloat16)
    target = finetune_of(base, extra_vocab=3)
    base_dir, target_dir = make_pair(base, target)

    report = roundtrip(tmp_path, base_dir, target_dir, codec="add")

    rebuilt = load_checkpoint(tmp_path / "out")
    assert verify_model(tmp_path / "out", tmp_path / "delta").ok  # the publisher's rebuild, bit for bit
    tensors = report.manifest.target.tensors
    assert tensors["model.layers.0.self_attn.q_proj.weight"].encoding == "add"
    assert tensors["lm_head.weight"].encoding == "rows" and tensors["lm_head.weight"].codec == "add"
    # add is not bit-exact in general: count the differing elements and check the report agrees
    differing = 0
    for name, t in target.items():
        a = rebuilt[name].view(torch.int16)
        differing += int((a != t.view(torch.int16)).sum())
        # the rebuild stays within one bf16 rounding step of the fine-tune
        assert torch.allclose(rebuilt[name].float(), t.float(), rtol=2**-7, atol=1e-6), name
    assert differing == report.inexact_elements
    for name in report.inexact_tensors:
        assert tensors[name].source_digest is not None
        assert tensors[name].inexact


def test_add_codec_keeps_integer_tensors_exact_with_xor(tmp_path, make_pair):
    base = {"w": random_tensor((8, 8), torch.float16, 1), "steps": torch.arange(5, dtype=torch.int32)}
    target = {"w": nudged(base["w"], 2), "steps": torch.arange(5, dtype=torch.int32) + 1}
    base_dir, target_dir = make_pair(base, target)
    report = roundtrip(tmp_path, base_dir, target_dir, codec="add")
    assert report.manifest.target.tensors["steps"].encoding == "xor"
    assert tensor_bytes(load_checkpoint(tmp_path / "out")["steps"]) == tensor_bytes(target["steps"])


def test_tensor_identical_in_its_first_chunks_then_different(tmp_path, make_pair, monkeypatch):
    # a tensor equal to the base for its first chunks must still encode those chunks once it differs
    monkeypatch.setattr("deltakit.reading.CHUNK_BYTES", 256)
    monkeypatch.setattr("deltakit.manifest.MIN_FRAME_BYTES", 32)  # so that apply reads frames that small
    base = {"w": random_tensor((64, 16), torch.float32, 3)}
    changed = base["w"].clone()
    changed[50:] += 1.0
    base_dir, target_dir = make_pair(base, {"w": changed})
    for codec in ("xor", "add"):
        make_delta(base_dir, target_dir, tmp_path / f"delta-{codec}", codec=codec)
        apply_delta(base_dir, tmp_path / f"delta-{codec}", tmp_path / f"out-{codec}")
        assert verify_model(tmp_path / f"out-{codec}", tmp_path / f"delta-{codec}").ok
    assert tensor_bytes(load_checkpoint(tmp_path / "out-xor")["w"]) == tensor_bytes(changed)


def test_many_chunks_per_tensor(tmp_path, make_pair, monkeypatch):
    monkeypatch.setattr("deltakit.reading.CHUNK_BYTES", 1024)
    monkeypatch.setattr("deltakit.manifest.MIN_FRAME_BYTES", 32)  # so that apply reads frames that small
    base = llama_like(torch.float16, vocab=300, hidden=32)
    target = finetune_of(base, extra_vocab=45)
    base_dir, target_dir = make_pair(base, target)
    roundtrip(tmp_path, base_dir, target_dir)
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)


_float_bits = st.integers(min_value=0, max_value=0xFFFF)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(["F16", "BF16", "F32"]),
    rows=st.integers(min_value=1, max_value=6),
    extra=st.integers(min_value=0, max_value=3),
    cols=st.integers(min_value=1, max_value=5),
    data=st.data(),
)
def test_hypothesis_roundtrip_any_bits(tmp_path_factory, dtype, rows, extra, cols, data):
    """Arbitrary bit patterns, NaN payloads and -0.0 included, come back exactly."""
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    width = torch_dtype.itemsize

    def tensor(n_rows: int) -> torch.Tensor:
        special = [b"\x00" * (width - 1) + b"\x80", b"\xff" * width, b"\x01" + b"\x00" * (width - 2) + b"\xff"]
        chunks = [
            data.draw(st.one_of(st.binary(min_size=width, max_size=width), st.sampled_from(special)))
            for _ in range(n_rows * cols)
        ]
        raw = bytearray(b"".join(chunks))
        return torch.frombuffer(raw, dtype=torch_dtype).reshape(n_rows, cols).clone()

    tmp = tmp_path_factory.mktemp("rt")
    base = {"w": tensor(rows), "same": tensor(1)}
    target = {"w": tensor(rows + extra), "same": base["same"].clone()}
    base_dir = write_checkpoint(tmp / "base", base)
    target_dir = write_checkpoint(tmp / "target", target)
    make_delta(base_dir, target_dir, tmp / "delta")
    apply_delta(base_dir, tmp / "delta", tmp / "out")
    assert_same_tensors(load_checkpoint(tmp / "out"), target)


def test_nan_payloads_survive_bit_for_bit(tmp_path, make_pair):
    nan_bits = torch.tensor([0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000], dtype=torch.int64).to(torch.int32)
    base = {"w": torch.zeros(4, dtype=torch.float32)}
    target = {"w": nan_bits.view(torch.float32).clone()}
    base_dir, target_dir = make_pair(base, target)
    roundtrip(tmp_path, base_dir, target_dir)
    out = load_checkpoint(tmp_path / "out")["w"]
    assert tensor_bytes(out) == tensor_bytes(target["w"])
    assert math.isnan(out[0].item()) and struct.pack("<f", -0.0) == tensor_bytes(out)[12:]


def test_payload_is_spec_valid_safetensors_readable_by_the_reference_library(tmp_path, make_pair, fmt):
    from safetensors import safe_open

    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=2))
    report = make_delta(base_dir, target_dir, tmp_path / "delta")
    for file in report.manifest.payload:
        with safe_open(str(tmp_path / "delta" / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "deltakit": f"delta/{fmt}"}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                record = report.manifest.target.tensors[name]
                shape = record.shape if fmt == 1 else (record.coded_bytes,)  # format 2: the coded bytes, U8
                assert f.get_tensor(name).shape == torch.Size(shape)
    assert not (tmp_path / "delta" / "config.json").exists(), "no top-level config.json in a delta"
    assert (tmp_path / "delta" / "files" / "config.json").exists()


def test_transformers_loads_the_rebuilt_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from deltakit.examples import write_llama_pair

    base, tuned = write_llama_pair(tmp_path / "pair")
    make_delta(base, tuned, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "out", shard_size=200_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    expected = load_checkpoint(tuned)
    state = model.state_dict()
    for name, tensor in expected.items():
        assert tensor_bytes(state[name]) == tensor_bytes(tensor), name


EVERY_DTYPE = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
]


@pytest.mark.parametrize("dtype", EVERY_DTYPE, ids=str)
def test_every_dtype_round_trips_with_growth_and_a_changed_tail(tmp_path, make_pair, dtype, fmt):
    generator = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 256, (40 * 12 * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    base_rows = bits.view(dtype).reshape(40, 12)
    grown = torch.cat([base_rows, base_rows[:3]])  # 3 new rows
    nudged_bits = base_rows.clone().view(torch.uint8)
    nudged_bits[::7] ^= 1  # a few elements one bit off: what a fine-tune looks like in bits
    base = {"w": base_rows, "grown": base_rows.clone(), "same": base_rows.clone()}
    target = {"w": nudged_bits.view(dtype), "grown": grown, "same": base_rows.clone()}
    base_dir, target_dir = make_pair(base, target)
    report = roundtrip(tmp_path, base_dir, target_dir)
    out = load_checkpoint(tmp_path / "out")
    for name, tensor in target.items():
        assert tensor_bytes(out[name]) == tensor_bytes(tensor), name
    tensors = report.manifest.target.tensors
    assert tensors["w"].encoding in LOSSLESS[fmt]
    assert (tensors["grown"].encoding, tensors["same"].encoding) == ("rows", "copy")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_target_cast_from_a_base_with_nans(tmp_path, make_pair, dtype):
    # torch has no masked_fill for float8: the canonical NaN is written as bits
    values = torch.tensor([float("nan"), 1.0, -2.0, float("nan"), 0.5, 3.0, -0.0, 7.0])
    base = {"w": values.clone()}  # F32 base, cast to the target's float8 first
    target = {"w": (values * 1.5).to(dtype)}
    base_dir, target_dir = make_pair(base, target)
    report = roundtrip(tmp_path, base_dir, target_dir)
    assert report.manifest.target.tensors["w"].cast_from == "F32"
    assert tensor_bytes(load_checkpoint(tmp_path / "out")["w"]) == tensor_bytes(target["w"])


def test_a_shard_per_tensor_drops_the_empty_ones_and_hashes_the_rest(tmp_path, make_pair, fmt):
    """Payload shards are hashed as the stream moves past them; shards whose tensors all turned out
    equal to the base (copies) are dropped and the rest numbered without gaps."""
    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=3))

    report = roundtrip(tmp_path, base_dir, target_dir, shard_size=1, format=fmt)

    copies = [n for n, t in report.manifest.target.tensors.items() if t.encoding == "copy"]
    names = sorted(report.manifest.payload)
    assert copies and len(names) == len(report.manifest.target.tensors) - len(copies)
    assert names == [f"delta-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    assert sorted(p.name for p in (tmp_path / "delta").glob("*.safetensors")) == names
    assert verify_delta(tmp_path / "delta", base=base_dir).ok  # every file's SHA-256 as recorded
    assert_same_tensors(load_checkpoint(tmp_path / "out"), finetune_of(base, extra_vocab=3))
