"""Format 2 frames: byte-exact round trips, and hostile frames refused with named errors in bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import finetune_of, llama_like
from hypothesis import given, settings
from hypothesis import strategies as st

from deltakit import CorruptFrameError, ManifestError, apply_delta, make_delta, verify_delta
from deltakit.codecs import CODECS
from deltakit.codecs.frames import MAX_FRAME_BYTES, CorruptFrame, Frame, decode_frame, encode_frame
from deltakit.formats import read_header


def coded_bytes(pieces: list) -> memoryview:
    return memoryview(b"".join(bytes(piece) for piece in pieces))


@settings(max_examples=60, deadline=None)
@given(
    itemsize=st.sampled_from([1, 2, 4, 8]),
    split=st.sampled_from(["bytes", "none"]),
    data=st.data(),
)
def test_any_bytes_round_trip_through_a_frame(itemsize, split, data):
    elements = data.draw(st.integers(min_value=0, max_value=300))
    raw = data.draw(st.binary(min_size=elements * itemsize, max_size=elements * itemsize))
    payload = np.frombuffer(raw, dtype=np.uint8)
    for min_saving in (0.0, 0.5):  # coded, and (mostly) stored
        frame, pieces = encode_frame(payload, itemsize, split=split, level=1, min_saving=min_saving)
        assert frame.elements == elements
        if elements:
            decoded = decode_frame(coded_bytes(pieces), frame, itemsize, split)
            assert decoded.tobytes() == raw


@settings(max_examples=80, deadline=None)
@given(
    itemsize=st.sampled_from([1, 2, 4, 8]),
    split=st.sampled_from(["bytes", "none"]),
    transform=st.sampled_from(["xor", "sub"]),
    data=st.data(),
)
def test_a_fused_transform_frames_exactly_what_the_numpy_codec_computes(itemsize, split, transform, data):
    """encode_frame's compiled pass (transform and byte split at once) against the reference codec:
    the same frame bytes as coding the codec's payload, and decode gives the target back."""
    elements = data.draw(st.integers(min_value=0, max_value=300))
    dtype = {1: "U8", 2: "F16", 4: "F32", 8: "F64"}[itemsize]
    target = np.frombuffer(data.draw(st.binary(min_size=elements * itemsize, max_size=elements * itemsize)), np.uint8)
    # a base near the target (small differences of either sign, as a fine-tune's) or anything at all
    near = data.draw(st.booleans())
    moved = np.frombuffer(data.draw(st.binary(min_size=target.size, max_size=target.size)), np.uint8)
    base = (target.view(np.uint8) ^ (moved & 3)) if near else moved
    payload = CODECS[transform].encode(target, base, dtype)
    for min_saving in (0.0, 0.5):  # coded, and (mostly) stored
        frame, pieces = encode_frame(
            target, itemsize, split=split, level=1, min_saving=min_saving, base=base, transform=transform
        )
        reference = encode_frame(payload, itemsize, split=split, level=1, min_saving=min_saving)
        assert (frame, coded_bytes(pieces).tobytes()) == (reference[0], coded_bytes(reference[1]).tobytes())
        if elements:
            decoded = decode_frame(coded_bytes(pieces), frame, itemsize, split, base=base, transform=transform)
            assert decoded.tobytes() == target.tobytes()
            assert decode_frame(coded_bytes(pieces), frame, itemsize, split).tobytes() == payload.tobytes()


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64", "I8", "U8", "I32"])
@pytest.mark.parametrize("codec", ["xor", "sub"])
def test_lossless_transforms_invert_exactly(dtype, codec):
    rng = np.random.default_rng(7)
    size = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I32": 4}[dtype]
    target = rng.integers(0, 256, 1000 * size, dtype=np.uint8)
    base = rng.integers(0, 256, 1000 * size, dtype=np.uint8)
    payload = CODECS[codec].encode(target, base, dtype)
    assert CODECS[codec].decode(base, payload, dtype).tobytes() == target.tobytes()


def test_sub_maps_small_differences_of_either_sign_to_small_numbers():
    base = np.array([1000, 1000, 1000, 1000, 0], dtype=np.uint16).view(np.uint8)
    target = np.array([1000, 999, 1001, 998, 0xFFFF], dtype=np.uint16).view(np.uint8)
    payload = CODECS["sub"].encode(target, base, "F16").view(np.uint16)
    assert payload.tolist() == [0, 1, 2, 3, 1]  # 0, -1, +1, -2, and -1 across the wrap


def test_a_frame_that_does_not_pay_is_stored_and_decodes_without_a_copy():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    frame, pieces = encode_frame(noise, 2, split="bytes", level=1, min_saving=1 / 16)
    assert frame == Frame(2048, "stored")
    coded = coded_bytes(pieces)
    decoded = decode_frame(coded, frame, 2, "bytes")
    assert decoded.tobytes() == noise.tobytes()
    assert np.shares_memory(decoded, np.frombuffer(coded, dtype=np.uint8))


def zstd_frame(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(data)


def test_hostile_frames_are_refused_by_name():
    good = zstd_frame(bytes(128))  # one stream of 128 two-byte elements
    big = zstd_frame(bytes(256))
    cases = [
        (Frame(128, "zstd", (len(good), 5)), good + bytes(5), "stream 1: not a zstd frame"),
        (Frame(128, "zstd", (len(good) + 1, len(good))), good + good, "coded bytes"),  # record and data disagree
        (Frame(128, "zstd", (len(good),)), good, "streams"),  # one stream for two-byte elements
        (Frame(128, "zstd", (len(big), len(big))), big + big, "declares 256 bytes, the frame needs 128"),
        (Frame(128, "zstd", (len(good) - 3, len(good))), good[:-3] + good, "17 bytes of the 14|truncated"),
        (Frame(128, "stored"), bytes(10), "coded bytes"),  # truncated stored frame
    ]
    for frame, data, message in cases:
        with pytest.raises(CorruptFrame, match=message):
            decode_frame(memoryview(data), frame, 2, "bytes")


def test_a_stream_without_its_size_or_with_data_after_it_is_refused():
    unsized = zstd_frame(bytes(128), content_size=False)
    with pytest.raises(CorruptFrame, match="declares no size"):
        decode_frame(memoryview(unsized), Frame(128, "zstd", (len(unsized),)), 1, "none")
    frame = zstd_frame(bytes(128))
    skippable = b"\x50\x2a\x4d\x18" + len(frame).to_bytes(4, "little") + bytes(len(frame))
    for stream, message in [
        (frame + zstd_frame(bytes(64)), "of the 34 it is given"),  # another frame after it
        (frame + zstd_frame(b""), "of the 26 it is given"),  # an empty frame after it
        (frame + skippable[:12], "of the 29 it is given"),  # a skippable frame after it
        (skippable[:8] + frame, "must start with the zstd magic"),  # a skippable frame before it
    ]:
        with pytest.raises(CorruptFrame, match=message):
            decode_frame(memoryview(stream), Frame(128, "zstd", (len(stream),)), 1, "none")


def test_a_decompression_bomb_is_refused_before_anything_is_allocated():
    bomb = zstd_frame(bytes(1 << 30))  # 1 GiB of zeros in a few tens of KiB
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFrame, match="declares 1073741824 bytes"):
            decode_frame(memoryview(bomb), Frame(1024, "zstd", (len(bomb),)), 1, "none")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_a_bomb_that_hides_its_size_cannot_decode_past_its_frame():
    # the header says 1 KiB but the data holds far more: decoding stops at the frame's size and refuses
    bomb = bytearray(zstd_frame(bytes(4 << 20), content_size=False))
    honest = zstd_frame(bytes(1024))
    assert zstandard.get_frame_parameters(honest).content_size == 1024
    # forge the header: the honest frame's header (with its size) before the bomb's blocks
    header_size = zstandard.frame_header_size(honest)
    forged = honest[:header_size] + bytes(bomb[zstandard.frame_header_size(bytes(bomb)) :])
    with pytest.raises(CorruptFrame):
        decode_frame(memoryview(forged), Frame(1024, "zstd", (len(forged),)), 1, "none")


@pytest.fixture
def package(tmp_path, make_pair):
    base = llama_like(torch.float16, layers=2)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=4))
    make_delta(base_dir, target_dir, tmp_path / "delta")
    return base_dir, tmp_path / "delta"


def edit_manifest(delta: Path, edit) -> None:
    path = delta / "deltakit.json"
    manifest = json.loads(path.read_text())
    edit(manifest["target"]["tensors"])
    path.write_text(json.dumps(manifest))


def first_coded(tensors: dict) -> dict:
    return next(t for t in tensors.values() if t.get("frames") and t["encoding"] != "rows")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ts: first_coded(ts)["frames"][0].__setitem__(0, MAX_FRAME_BYTES), "is not between 1 and"),
        (lambda ts: first_coded(ts)["frames"].append([8, "stored"]), "cover"),
        (lambda ts: first_coded(ts)["frames"][0].__setitem__(1, "brotli"), "unknown coder"),
        (lambda ts: first_coded(ts).__setitem__("split", "planes"), "unknown split"),
        (lambda ts: first_coded(ts)["frames"].__setitem__(0, [first_coded(ts)["frames"][0][0], "zstd", 1]), "needs 2"),
        (lambda ts: first_coded(ts).pop("frames"), "missing field 'frames'"),
        (lambda ts: ts["model.norm.weight"].update(split="bytes", frames=[]), "belong to format 2 tensors"),
        (
            lambda ts: first_coded(ts)["frames"].__setitem__(0, [first_coded(ts)["frames"][0][0], "zstd", 1 << 40, 1]),
            "larger than the frame",
        ),
    ],
)
def test_hostile_frame_tables_are_refused_with_the_field_named(package, edit, message):
    base_dir, delta = package
    edit_manifest(delta, edit)
    with pytest.raises(ManifestError, match=message):
        apply_delta(base_dir, delta, delta.parent / "out")
    assert not (delta.parent / "out").exists()


def test_frames_may_not_cross_the_base_rows_of_a_grown_tensor(package):
    base_dir, delta = package

    def cross(tensors: dict) -> None:
        rows = tensors["lm_head.weight"]
        frames = rows["frames"]
        # merge the shared-rows frame and the new-rows frame into one stored frame
        rows["frames"] = [[sum(f[0] for f in frames), "stored"]]

    edit_manifest(delta, cross)
    with pytest.raises(ManifestError, match="crosses the base's last row"):
        apply_delta(base_dir, delta, delta.parent / "out")


def test_a_corrupt_frame_is_named_with_its_tensor_and_offset_and_leaves_nothing(package):
    base_dir, delta = package
    tensors = json.loads((delta / "deltakit.json").read_text())["target"]["tensors"]
    name = next(n for n, t in tensors.items() if t.get("frames") and t["frames"][0][1] == "zstd")
    payload = next(delta.glob("delta-*.safetensors"))
    info = read_header(payload).tensors[name]
    with open(payload, "r+b") as f:  # cut the first stream's zstd magic number
        f.seek(info.start)
        f.write(b"\x00\x00\x00\x00")
    with pytest.raises(CorruptFrameError) as err:
        apply_delta(base_dir, delta, delta.parent / "out")
    assert err.value.tensor == name
    assert err.value.actual == info.start
    assert f"bytes {info.start} to" in str(err.value) and name in str(err.value)
    assert not (delta.parent / "out").exists()
    assert not [p for p in delta.parent.iterdir() if ".deltakit-" in p.name]
    assert not verify_delta(delta).ok, "the payload's SHA-256 no longer matches"


@pytest.mark.parametrize("codec", ["xor", "sub", "add"])
def test_codecs_write_only_where_their_buffer_says(codec):
    from deltakit.reading import Arena

    rng = np.random.default_rng(3)
    target, base = rng.integers(0, 256, 4096, dtype=np.uint8), rng.integers(0, 256, 4096, dtype=np.uint8)
    target[1::2] &= 0x3B  # finite fp16 values, so add is defined everywhere
    base[1::2] &= 0x3B
    kept = target.copy(), base.copy()
    arena = Arena()
    payload = CODECS[codec].encode(target, base, "F16", arena.take).copy()
    rebuilt = CODECS[codec].decode(base, payload, "F16", arena.take)
    assert target.tobytes() == kept[0].tobytes() and base.tobytes() == kept[1].tobytes()
    if CODECS[codec].exact:
        assert rebuilt.tobytes() == target.tobytes()


def test_a_manifest_of_too_many_frames_is_refused_before_they_are_read(package, monkeypatch):
    base_dir, delta = package
    monkeypatch.setattr("deltakit.manifest.MAX_FRAMES", 4)  # the real cap is a million; the rule is the same
    with pytest.raises(ManifestError, match="past 4 frames"):
        apply_delta(base_dir, delta, delta.parent / "out")


@pytest.mark.parametrize("stream", [b"\x28\xb5\x2f\xfd", b"\x28\xb5\x2f\xfd\x20"], ids=["magic", "magic+1"])
def test_a_stream_that_is_little_more_than_the_zstd_magic_is_a_corrupt_frame(stream):
    with pytest.raises(CorruptFrame, match="stream 0: not a zstd frame"):
        decode_frame(memoryview(stream), Frame(128, "zstd", (len(stream),)), 1, "none")


def test_every_cut_of_a_zstd_stream_is_a_corrupt_frame():
    good = zstd_frame(bytes(range(128)))
    for end in range(len(good)):
        with pytest.raises(CorruptFrame, match="stream 0: "):
            decode_frame(memoryview(good[:end]), Frame(128, "zstd", (end,)), 1, "none")
    rng = np.random.default_rng(5)
    for _ in range(300):  # the magic number, then header bytes of any value
        stream = good[:4] + rng.integers(0, 256, int(rng.integers(0, 12)), dtype=np.uint8).tobytes()
        with pytest.raises(CorruptFrame, match="stream 0: "):
            decode_frame(memoryview(stream), Frame(128, "zstd", (len(stream),)), 1, "none")


@pytest.mark.parametrize("kept", [4, 5])
def test_a_payload_stream_cut_to_the_zstd_magic_is_named_with_its_tensor_and_offset(package, kept):
    """The frame table gives the first stream only the magic number (plus ``kept - 4`` bytes) of its
    zstd frame, and the second the rest: sizes that add up, a stream that is no zstd frame."""
    base_dir, delta = package
    tensors = json.loads((delta / "deltakit.json").read_text())["target"]["tensors"]
    name = next(n for n, t in tensors.items() if t.get("frames") and t["frames"][0][1] == "zstd")

    def cut(ts: dict) -> None:
        elements, coder, *streams = ts[name]["frames"][0]
        ts[name]["frames"][0] = [elements, coder, kept, sum(streams) - kept, *streams[2:]]

    edit_manifest(delta, cut)
    start = read_header(next(delta.glob("delta-*.safetensors"))).tensors[name].start
    with pytest.raises(CorruptFrameError, match="not a zstd frame") as err:
        apply_delta(base_dir, delta, delta.parent / "out")
    assert (err.value.tensor, err.value.actual) == (name, start)
    assert name in str(err.value) and f"bytes {start} to" in str(err.value)
    assert not (delta.parent / "out").exists()


@pytest.fixture
def stored_package(tmp_path, make_pair):
    """A delta of one 4096-element F16 tensor of noise: every frame is stored, so its frame table can
    be cut anywhere and the payload still agrees with it."""
    rng = np.random.default_rng(11)
    base, target = (
        {"w": torch.from_numpy(rng.integers(0, 1 << 16, 4096, dtype=np.uint16).view(np.float16).copy())}
        for _ in range(2)
    )
    base_dir, target_dir = make_pair(base, target)
    make_delta(base_dir, target_dir, tmp_path / "delta")
    assert all(
        f[1] == "stored"
        for f in json.loads((tmp_path / "delta/deltakit.json").read_text())["target"]["tensors"]["w"]["frames"]
    )
    return base_dir, target_dir, tmp_path / "delta"


def test_a_frame_table_of_one_element_frames_is_refused_while_the_manifest_is_read(stored_package):
    base_dir, _, delta = stored_package
    edit_manifest(delta, lambda ts: ts["w"].update(frames=[[1, "stored"]] * 4096))
    with pytest.raises(
        ManifestError, match=r"target\.tensors\['w'\]\.frames: 4096 frames for 4096 elements; at most 2"
    ):
        apply_delta(base_dir, delta, delta.parent / "out")
    assert not (delta.parent / "out").exists()


def test_a_tensor_may_hold_one_frame_per_min_frame_bytes_plus_one(stored_package, monkeypatch):
    base_dir, target_dir, delta = stored_package
    monkeypatch.setattr("deltakit.manifest.MIN_FRAME_BYTES", 1024)  # 8192 bytes: at most 8 + 1 frames
    # uneven frames: the rule counts frames, whatever their sizes
    edit_manifest(delta, lambda ts: ts["w"].update(frames=[[1, "stored"]] * 8 + [[4088, "stored"]]))
    apply_delta(base_dir, delta, delta.parent / "out")
    assert (delta.parent / "out/model.safetensors").read_bytes() == (target_dir / "model.safetensors").read_bytes()
    edit_manifest(delta, lambda ts: ts["w"].update(frames=[[1, "stored"]] * 9 + [[4087, "stored"]]))
    with pytest.raises(ManifestError, match="10 frames for 4096 elements; at most 9"):
        apply_delta(base_dir, delta, delta.parent / "out2")
    assert not (delta.parent / "out2").exists()
