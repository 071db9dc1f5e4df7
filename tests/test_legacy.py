"""Deltas from older tools rebuild exactly as those tools rebuild them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, llama_like, load_checkpoint, nudged, random_tensor, tensor_bytes
from conftest import write_checkpoint as write
from test_cli import deltakit_cli

from deltakit import BaseMismatchError, FormatError, UnsupportedInputError, apply_delta, verify_model
from deltakit.legacy import apply_legacy_delta, make_delta_from_legacy


def fastchat_make_delta_v0(base: dict, target: dict) -> dict:
    """FastChat 0.1's make_delta: target - base in fp16, base subtracted from the shared rows only."""
    delta = {}
    for name, t in target.items():
        d = t.clone()
        b = base[name]
        d[: b.shape[0]] -= b
        delta[name] = d
    return delta


def fastchat_apply_delta_v0(base: dict, delta: dict) -> dict:
    """FastChat 0.1's apply_delta, as it runs: both in fp16, ``param.data[:rows] += base``."""
    out = {}
    for name, d in delta.items():
        param = d.clone()
        b = base[name].to(torch.float16)
        param[: b.shape[0], ...] += b
        out[name] = param
    return out


def finetuned(base: dict, extra_rows: int) -> dict:
    target = {}
    for i, (name, t) in enumerate(base.items()):
        t = nudged(t, 100 + i, scale=2e-3).to(torch.float16)
        if extra_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, random_tensor((extra_rows, t.shape[1]), torch.float16, 7)])
        target[name] = t
    return target


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("extra_rows", [0, 1], ids=["same-vocab", "vicuna-v0-32001"])
def test_fastchat_delta_rebuilds_byte_for_byte(tmp_path, base_dtype, extra_rows):
    base = {k: v.to(base_dtype) for k, v in llama_like(torch.float16).items()}
    target = finetuned(base, extra_rows)
    delta = fastchat_make_delta_v0({k: v.to(torch.float16) for k, v in base.items()}, target)
    base_dir = write(tmp_path / "llama", base)
    delta_dir = write(tmp_path / "vicuna-delta", delta, files={"config.json": "{}", "tokenizer_config.json": "{}"})

    report = apply_legacy_delta(base_dir, delta_dir, tmp_path / "out")

    expected = fastchat_apply_delta_v0(base, delta)
    assert report.kind == "fastchat"
    assert_same_tensors(load_checkpoint(tmp_path / "out"), expected)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert set(report.grown) == ({"model.embed_tokens.weight", "lm_head.weight"} if extra_rows else set())


def test_alpaca_diff_recovers_with_the_pad_row_as_the_mean(tmp_path):
    base = llama_like(torch.float16, vocab=40)
    raw = {k: v.float() for k, v in base.items()}
    # Alpaca's smart_tokenizer_and_embedding_resize: one [PAD] row, the mean of the others
    resized = dict(raw)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        resized[name] = torch.cat([raw[name], raw[name].mean(dim=0, keepdim=True)])
    tuned = {k: nudged(v, 3, scale=1e-3) for k, v in resized.items()}
    diff = {k: tuned[k] - resized[k] for k in tuned}  # weight_diff.py make_diff, fp32
    base_dir = write(tmp_path / "llama", base)
    diff_dir = write(tmp_path / "alpaca-diff", diff)

    report = apply_legacy_delta(base_dir, diff_dir, tmp_path / "out")

    assert report.kind == "alpaca"
    ours = load_checkpoint(tmp_path / "out")
    expected = {k: diff[k] + resized[k] for k in diff}  # weight_diff.py recover, fp32
    for name, want in expected.items():
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == want.shape
        rows = base[name].shape[0] if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        assert tensor_bytes(got[:rows]) == tensor_bytes(want[:rows]), name
        # the mean is summed in fp64 here and in fp32 by torch: equal within fp32 rounding
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name


def test_legacy_delta_whose_vocab_does_not_match_the_base(tmp_path):
    base = llama_like(torch.float16, vocab=64)
    small = {k: (v[:60] if v.shape[0] == 64 else v) * 0.001 for k, v in llama_like(torch.float16, vocab=64).items()}
    base_dir = write(tmp_path / "llama", base)
    delta_dir = write(tmp_path / "delta", small)
    with pytest.raises(UnsupportedInputError, match="vocabulary does not match"):
        apply_legacy_delta(base_dir, delta_dir, tmp_path / "out")
    partial = {k: v * 0.001 for k, v in base.items() if k != "model.norm.weight"}
    with pytest.raises(UnsupportedInputError, match=r"lacks base tensor 'model\.norm\.weight'"):
        apply_legacy_delta(base_dir, write(tmp_path / "partial", partial), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_model_passed_as_a_delta_is_refused(tmp_path):
    base = llama_like(torch.float16)
    base_dir = write(tmp_path / "llama", base)
    model_dir = write(tmp_path / "panda", finetuned(base, 0))
    result = deltakit_cli("apply", "--base", base_dir, "--delta", model_dir, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert "does not look like a delta" in result.stderr
    assert not (tmp_path / "out").exists()


def test_make_from_legacy_gains_digests_and_rebuilds_the_same_bytes(tmp_path):
    base = llama_like(torch.float16)
    target = finetuned(base, 1)
    delta = fastchat_make_delta_v0(base, target)
    base_dir = write(tmp_path / "llama", base)
    delta_dir = write(tmp_path / "vicuna-7b-delta-v0", delta, files={"config.json": "{}"})

    result = deltakit_cli("make", "--base", base_dir, "--from-legacy", delta_dir, "--out", tmp_path / "packaged", "-q")
    assert result.returncode == 0, result.stderr
    assert "as a delta of kind fastchat" in result.stdout
    assert not list(tmp_path.glob(".packaged.legacy-*")), "the scratch rebuild is removed"

    apply_delta(base_dir, tmp_path / "packaged", tmp_path / "via-format-1")
    apply_legacy_delta(base_dir, delta_dir, tmp_path / "via-legacy")
    assert_same_tensors(load_checkpoint(tmp_path / "via-format-1"), load_checkpoint(tmp_path / "via-legacy"))
    assert verify_model(tmp_path / "via-legacy", tmp_path / "packaged").ok

    for spelling in ("--legacy", "--legacy-kind"):  # apply's spelling, and 0.1's for make
        out = tmp_path / spelling.strip("-")
        args = ["--base", base_dir, "--from-legacy", delta_dir, spelling, "fastchat", "--out", out, "-q"]
        named = deltakit_cli("make", *args)
        assert named.returncode == 0 and "as a delta of kind fastchat" in named.stdout, named.stderr

    _, made = make_delta_from_legacy(base_dir, delta_dir, tmp_path / "lib", name="vicuna-7b")
    assert made.manifest.target.name == "vicuna-7b"
    assert made.encodings["rows"] == 2


def test_cli_applies_a_legacy_delta_and_says_how_it_read_it(tmp_path):
    base = llama_like(torch.float16)
    delta = fastchat_make_delta_v0(base, finetuned(base, 0))
    base_dir = write(tmp_path / "llama", base)
    delta_dir = write(tmp_path / "delta", delta)
    result = deltakit_cli("apply", "--base", base_dir, "--delta", delta_dir, "--out", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "from a fastchat delta" in result.stdout and "--legacy alpaca if it is not" in result.stdout


def oasst_xor_release(release: Path, target: Path, base: Path) -> None:
    """OpenAssistant's xor_codec.py encode: gzip(target file XOR base file, zero-padded or cut)."""
    import gzip

    import numpy as np

    release.mkdir()
    for path in sorted(target.iterdir()):
        if path.name == "added_tokens.json":
            (release / path.name).write_bytes(path.read_bytes())
            continue
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        key = np.zeros(len(data), dtype=np.uint8)
        other = np.frombuffer((base / path.name).read_bytes(), dtype=np.uint8)[: len(data)]
        key[: len(other)] = other
        with gzip.open(release / path.name, "wb") as f:
            f.write(np.bitwise_xor(data, key).tobytes())


def oasst_setup(tmp_path: Path) -> dict:
    base = llama_like(torch.float16)
    for name in ("llama", "oasst", "other"):
        (tmp_path / name).mkdir()
    torch.save(base, tmp_path / "llama" / "pytorch_model.bin")
    (tmp_path / "llama" / "config.json").write_text('{"vocab_size": 64}')
    torch.save(finetuned(base, 0), tmp_path / "oasst" / "pytorch_model.bin")
    (tmp_path / "oasst" / "config.json").write_text('{"vocab_size": 64, "note": "a longer config than the base"}')
    (tmp_path / "oasst" / "added_tokens.json").write_text('{"<|prompter|>": 32000}')
    # another conversion of the base: same layout, other bytes
    torch.save({k: nudged(v, 9, scale=1e-2) for k, v in base.items()}, tmp_path / "other" / "pytorch_model.bin")
    (tmp_path / "other" / "config.json").write_text('{"vocab_size": 64}')
    oasst_xor_release(tmp_path / "release", tmp_path / "oasst", tmp_path / "llama")
    sums = "".join(
        f"{hashlib.sha256((tmp_path / 'oasst' / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("pytorch_model.bin", "config.json")
    )
    (tmp_path / "sums.txt").write_text(sums)
    return base


def test_oasst_xor_release_rebuilds_the_files_byte_for_byte(tmp_path):
    oasst_setup(tmp_path)
    result = deltakit_cli(
        "apply",
        "--base",
        tmp_path / "llama",
        "--delta",
        tmp_path / "release",
        "--out",
        tmp_path / "out",
        "--checksums",
        tmp_path / "sums.txt",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "from an oasst-xor delta" in result.stdout and "checked   against the published checksums" in result.stdout
    for name in ("pytorch_model.bin", "config.json", "added_tokens.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "oasst" / name).read_bytes(), name


def test_oasst_xor_release_against_another_base(tmp_path):
    oasst_setup(tmp_path)
    # without checksums, a wrong base yields plausible weights: the rebuild is flagged unverified
    result = deltakit_cli(
        "apply", "--base", tmp_path / "other", "--delta", tmp_path / "release", "--out", tmp_path / "unchecked", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING   not verified" in result.stdout
    # with the published checksums it is refused, and nothing is left behind
    with pytest.raises(BaseMismatchError, match="does not match its published checksum"):
        apply_legacy_delta(tmp_path / "other", tmp_path / "release", tmp_path / "out", checksums=tmp_path / "sums.txt")
    assert not (tmp_path / "out").exists()


def test_make_from_an_xor_release_needs_its_checksums(tmp_path):
    from deltakit.legacy import make_delta_from_legacy

    oasst_setup(tmp_path)
    with pytest.raises(UnsupportedInputError, match="pass the release's published checksums"):
        make_delta_from_legacy(tmp_path / "llama", tmp_path / "release", tmp_path / "packaged")
    _, made = make_delta_from_legacy(
        tmp_path / "llama", tmp_path / "release", tmp_path / "packaged", checksums=tmp_path / "sums.txt"
    )
    assert made.manifest.target.files["config.json"].size > 0


def test_inv_freq_buffers_in_an_old_delta_are_ignored(tmp_path):
    base = llama_like(torch.float16)
    delta = fastchat_make_delta_v0(base, finetuned(base, 0))
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4, dtype=torch.float32)
    report = apply_legacy_delta(write(tmp_path / "llama", base), write(tmp_path / "d", delta), tmp_path / "out")
    assert report.tensors == len(base)


def _gzip_with_trailer(path: Path, data_size: int, trailer: int | None = None) -> None:
    import gzip

    with gzip.open(path, "wb", compresslevel=1) as f:
        for _ in range(data_size >> 20):
            f.write(bytes(1 << 20))
    if trailer is not None:
        raw = bytearray(path.read_bytes())
        raw[-4:] = trailer.to_bytes(4, "little")
        path.write_bytes(bytes(raw))


class _Counted:
    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, total: int, label: str) -> _Counted:
        return self

    def update(self, n: int) -> None:
        self.seen += n

    def close(self) -> None:
        pass


def test_an_xor_file_promising_far_more_than_its_base_is_refused_before_anything_is_written(tmp_path):
    oasst_setup(tmp_path)
    _gzip_with_trailer(tmp_path / "release" / "pytorch_model.bin", 200 << 20)  # 200 MB of zeros, 200 KB on disk
    counted = _Counted()
    with pytest.raises(FormatError, match="out of proportion to the base") as caught:
        apply_legacy_delta(tmp_path / "llama", tmp_path / "release", tmp_path / "out", progress=counted)
    assert caught.value.path == tmp_path / "release" / "pytorch_model.bin"
    assert counted.seen == 0 and not (tmp_path / "out").exists()


def test_an_xor_file_whose_trailer_understates_it_stops_one_byte_past_the_promise(tmp_path):
    oasst_setup(tmp_path)
    promised = (tmp_path / "llama" / "pytorch_model.bin").stat().st_size
    _gzip_with_trailer(tmp_path / "release" / "pytorch_model.bin", 200 << 20, trailer=promised)
    counted = _Counted()
    with pytest.raises(FormatError, match="inflates past the"):
        apply_legacy_delta(tmp_path / "llama", tmp_path / "release", tmp_path / "out", progress=counted)
    assert counted.seen <= promised and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "tiny"])
def test_a_damaged_xor_file_is_a_named_error(tmp_path, damage):
    oasst_setup(tmp_path)
    payload = tmp_path / "release" / "pytorch_model.bin"
    raw = bytearray(payload.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2] + raw[-8:]  # the trailer kept: the stream just ends early
    elif damage == "bit-flip":
        raw[len(raw) // 2] ^= 0x10
    else:
        raw = raw[:12]
    payload.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as caught:
        apply_legacy_delta(tmp_path / "llama", tmp_path / "release", tmp_path / "out")
    assert caught.value.path == payload and str(payload) in str(caught.value)
    assert not (tmp_path / "out").exists()
