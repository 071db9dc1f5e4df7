"""PyTorch .bin/.pth checkpoints: read as byte ranges without running the pickle, streamed like safetensors."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, tensor_bytes

from deltakit import (
    FormatError,
    UnsafePickleError,
    UnsupportedInputError,
    apply_delta,
    make_delta,
    verify_model,
)
from deltakit.formats import open_checkpoint
from deltakit.formats.torch_zip import read_torch_zip


def range_bytes(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def save_bin(folder: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        file_name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save(part, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_byte_ranges_match_what_torch_loads(tmp_path):
    embed = torch.randn(6, 4).to(torch.bfloat16)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": embed,
        "tied": embed,  # same storage as bf16, as tied embeddings are saved
        "tail": torch.arange(10, dtype=torch.int64)[4:],  # a view with a storage offset
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save(tensors, tmp_path / "m.bin")
    infos = read_torch_zip(tmp_path / "m.bin")
    loaded = torch.load(tmp_path / "m.bin", weights_only=True)
    assert list(infos) == list(tensors)
    for name, t in loaded.items():
        info = infos[name]
        assert info.shape == tuple(t.shape), name
        assert range_bytes(info.path, info.start, info.end) == tensor_bytes(t), name
    assert infos["tied"].start == infos["bf16"].start


def test_non_contiguous_tensor_is_refused_by_name(tmp_path):
    torch.save({"t": torch.randn(4, 3).t()}, tmp_path / "m.bin")
    with pytest.raises(UnsupportedInputError, match="'t' is stored non-contiguously"):
        read_torch_zip(tmp_path / "m.bin")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def hostile_archive(path: Path, payload: object) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/version", "3\n")
    return path


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = hostile_archive(tmp_path / "evil.bin", {"w": _RunsCode()})
    with pytest.raises(UnsafePickleError, match=r"asks for (posix|os)\.system"):
        read_torch_zip(path)
    assert not (tmp_path / "pwned").exists()


def test_a_pickle_with_a_non_tensor_object_is_refused(tmp_path):
    path = hostile_archive(tmp_path / "args.bin", {"learning_rate": 1e-4})
    with pytest.raises(UnsupportedInputError, match="'learning_rate' is a float, not a tensor"):
        read_torch_zip(path)


def test_legacy_and_damaged_files(tmp_path):
    torch.save({"t": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsupportedInputError, match=r"legacy torch\.save format"):
        read_torch_zip(tmp_path / "old.bin")
    with zipfile.ZipFile(tmp_path / "nopkl.bin", "w") as z:
        z.writestr("archive/version", "3")
    with pytest.raises(FormatError, match=r"data\.pkl"):
        read_torch_zip(tmp_path / "nopkl.bin")
    with zipfile.ZipFile(tmp_path / "garbage.bin", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}")  # ends before STOP
    with pytest.raises(FormatError, match="not a readable pickle"):
        read_torch_zip(tmp_path / "garbage.bin")


@pytest.mark.parametrize("shards", [1, 3])
def test_make_and_apply_from_bin_checkpoints(tmp_path, shards):
    base = llama_like(torch.float16)
    target = finetune_of(base, extra_vocab=5)
    base_dir = save_bin(tmp_path / "base", base, shards=shards)
    target_dir = save_bin(tmp_path / "target", target, shards=shards)
    (target_dir / "config.json").write_text("{}")
    torch.save({"lr": torch.tensor(1.0)}, target_dir / "training_args.bin")  # a weight-like file, not carried

    report = make_delta(base_dir, target_dir, tmp_path / "delta")
    apply_delta(base_dir, tmp_path / "delta", tmp_path / "out")

    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)
    assert "training_args.bin" in report.ignored_weight_files
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".safetensors")) == [
        "config.json"
    ]
    assert verify_model(tmp_path / "out", tmp_path / "delta").ok


def test_digests_agree_across_formats(tmp_path):
    # a safetensors base and the same weights as .bin have the same fingerprint: apply takes either
    from conftest import write_checkpoint

    base = llama_like(torch.bfloat16)
    target = finetune_of(base)
    st_dir = write_checkpoint(tmp_path / "st", base)
    bin_dir = save_bin(tmp_path / "bin", base)
    target_dir = write_checkpoint(tmp_path / "target", target)
    make_delta(st_dir, target_dir, tmp_path / "delta")
    apply_delta(bin_dir, tmp_path / "delta", tmp_path / "out")
    assert_same_tensors(load_checkpoint(tmp_path / "out"), target)


def test_safetensors_win_when_a_folder_holds_both(tmp_path):
    from conftest import write_checkpoint

    folder = write_checkpoint(tmp_path / "m", {"a": torch.ones(2)})
    torch.save({"b": torch.ones(2)}, folder / "pytorch_model.bin")
    ckpt = open_checkpoint(folder)
    assert list(ckpt.tensors) == ["a"]
    assert ckpt.ignored_weight_files == ("pytorch_model.bin",)


def test_single_meta_consolidated_file_is_read(tmp_path):
    (tmp_path / "meta").mkdir()
    torch.save({"tok_embeddings.weight": torch.ones(4, 2).half()}, tmp_path / "meta" / "consolidated.00.pth")
    (tmp_path / "meta" / "params.json").write_text("{}")
    assert list(open_checkpoint(tmp_path / "meta").tensors) == ["tok_embeddings.weight"]
    torch.save({"tok_embeddings.weight": torch.ones(4, 2).half()}, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(UnsupportedInputError, match="2 model-parallel shards"):
        open_checkpoint(tmp_path / "meta")


def raw_archive(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
    return path


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


@pytest.mark.parametrize(
    ("pickle_bytes", "message"),
    [
        # a 3-million-deep tuple as a dict key: hashing it would crash the interpreter
        (b"\x80\x02}" + b"K\x00" + b"\x85" * 3_000_000 + b"K\x01s.", "nests containers more than 32"),
        # an OrderedDict built from a pair whose key is a deep tuple: OrderedDict would hash it (exit 139)
        (
            b"\x80\x02"
            + _global("collections", "OrderedDict")
            + b"K\x00"
            + b"\x85" * 1_000_000
            + b"K\x01\x86\x85\x85R.",
            "nests containers more than 32",
        ),
        (
            b"\x80\x02" + _global("collections", "OrderedDict") + b"X\x01\x00\x00\x00aK\x01\x86\x85\x85R.",
            "OrderedDict from arguments",
        ),
        # a list grown after it was placed in another: its depth would escape the bound
        (b"\x80\x02]q\x00]h\x00a0K\x00a.", "changes a container after placing it"),
        # a 16 MB bytes object: BINBYTES is no opcode torch writes
        (b"\x80\x03}X\x01\x00\x00\x00aB" + (1 << 24).to_bytes(4, "little") + b"\0" * (1 << 24) + b"s.", "opcode"),
        # torch.Size of something that is not a shape
        (
            b"\x80\x02}X\x01\x00\x00\x00a"
            + _global("torch", "Size")
            + b"(K\x01K\x02K\x03K\x04K\x05K\x06K\x07K\x08K\x09"
            b"tq\x00\x85Rs.",
            "size is a tuple of the wrong length",
        ),
        # BUILD on something other than a state dict
        (
            b"\x80\x02" + _global("torch", "HalfStorage") + b"}X\x05\x00\x00\x00dtypeX\x03\x00\x00\x00F32sb.",
            "sets the state of something",
        ),
    ],
    ids=[
        "deep-key",
        "ordered-dict-deep-key",
        "ordered-dict-args",
        "grown-after-nesting",
        "bytes-opcode",
        "bad-size",
        "build",
    ],
)
def test_hostile_pickles_are_refused_quickly(tmp_path, pickle_bytes, message):
    with pytest.raises(UnsafePickleError, match=message) as caught:
        read_torch_zip(raw_archive(tmp_path / "x.bin", pickle_bytes))
    assert str(caught.value).startswith(f"{tmp_path / 'x.bin'}: ")  # the file is named


def _nested(kind: str, depth: int) -> bytes:
    """``depth`` containers of one kind around the int 0, as pickle opcodes."""
    if kind == "tuple":
        return b"K\x00" + b"\x85" * depth
    if kind == "list":
        return b"]" * depth + b"K\x00" + b"a" * depth
    return b"}X\x01\x00\x00\x00k" * depth + b"K\x00" + b"s" * depth  # dicts


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
@pytest.mark.parametrize("where", ["key", "value", "ordered-dict-item", "tensor-argument", "top"])
@pytest.mark.parametrize("depth", [30, 33, 200_000])
def test_structural_cases_end_in_a_named_error_never_a_crash(tmp_path, kind, where, depth):
    """Depth in every place a pickle can put a container: within the bound it loads (and is refused
    only for not being a tensor), past it it is refused by the bound, and nothing ever crashes."""
    from deltakit import DeltakitError

    inner = _nested(kind, depth)
    rebuild = _global("torch._utils", "_rebuild_tensor_v2")
    body = {
        "key": b"}" + inner + b"K\x01s",
        "value": b"}X\x01\x00\x00\x00a" + inner + b"s",
        "ordered-dict-item": _global("collections", "OrderedDict") + b")R" + b"X\x01\x00\x00\x00a" + inner + b"s",
        "tensor-argument": b"}X\x01\x00\x00\x00a" + rebuild + b"(" + inner + b"K\x00)})tRs",
        "top": inner,
    }[where]
    with pytest.raises(DeltakitError) as caught:
        read_torch_zip(raw_archive(tmp_path / "x.bin", b"\x80\x02" + body + b"."))
    if depth > 32 and where != "key":
        assert "nests containers more than 32" in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        b"}X\x01\x00\x00\x00a](" + b"N" * 1_000_000 + b"es",  # a million-wide list
        b"}" + b"(" + b"".join(b"X\x08\x00\x00\x00" + b"k%07d" % i + b"N" for i in range(200_000)) + b"u",
        b"]" + b"".join(b"r" + i.to_bytes(4, "little") for i in range(0, 1 << 32, 1 << 12)),  # a sparse 2**32 memo
    ],
    ids=["wide-list", "wide-dict", "memo"],
)
def test_wide_pickles_and_large_memos_are_refused_in_bounded_time(tmp_path, body):
    from deltakit import DeltakitError

    with pytest.raises(DeltakitError):
        read_torch_zip(raw_archive(tmp_path / "x.bin", b"\x80\x02" + body + b"."))


def test_random_corruption_never_escapes_as_anything_but_a_deltakit_error(tmp_path):
    import random

    from deltakit import DeltakitError

    torch.save({f"layer.{i}.weight": torch.randn(4, 8).half() for i in range(3)}, tmp_path / "src.bin")
    source = (tmp_path / "src.bin").read_bytes()
    rng = random.Random(7)
    for _ in range(300):
        data = bytearray(source)
        for _ in range(rng.choice([1, 2, 4, 8])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        (tmp_path / "fz.bin").write_bytes(bytes(data))
        with contextlib.suppress(DeltakitError):
            read_torch_zip(tmp_path / "fz.bin")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"__metadata__": torch.ones(2)}, "named '__metadata__'"),  # safetensors keeps the name for its metadata
        ({1: torch.ones(2), "1": torch.zeros(2)}, "not a string"),  # would collapse into one tensor "1"
        (collections.OrderedDict([(1, torch.ones(2)), ("1", torch.zeros(2))]), "not a string"),
    ],
)
def test_tensor_names_safetensors_cannot_hold_are_refused(tmp_path, state, message):
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match=message):
        read_torch_zip(tmp_path / "pytorch_model.bin")


def _patch_sizes(data: bytearray, name: bytes, size: int) -> None:
    """Set the uncompressed size that the central directory and local header give for ``name``."""
    central = data.index(b"PK\x01\x02")  # the first central directory entry
    while (at := data.find(b"PK\x01\x02", central)) != -1:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_len] == name:
            struct.pack_into("<I", data, at + 24, size)
            local = struct.unpack_from("<I", data, at + 42)[0]
            struct.pack_into("<I", data, local + 22, size)
            return
        central = at + 46 + name_len + extra_len + comment_len
    raise AssertionError(f"{name!r} not in the central directory")


def test_a_deflated_pickle_whose_size_lies_is_never_inflated_past_the_cap(tmp_path, monkeypatch):
    """A 200 MB DEFLATE bomb declared as 1 KB: reading it must not allocate the 200 MB."""
    import tracemalloc

    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}." + bytes(200 << 20))
        z.writestr("archive/byteorder", "little")
    data = bytearray(path.read_bytes())
    _patch_sizes(data, b"archive/data.pkl", 1000)
    path.write_bytes(bytes(data))
    monkeypatch.setattr("deltakit.formats.torch_zip.MAX_PICKLE_BYTES", 10 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            read_torch_zip(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"reading a lying 1 KB entry allocated {peak >> 20} MB"


@pytest.mark.parametrize("shift", [4, -4, 64])
def test_a_local_header_extra_length_that_shifts_the_data_is_refused(tmp_path, shift):
    torch.save({"a": torch.arange(64, dtype=torch.float16), "b": torch.ones(64).half()}, tmp_path / "ok.bin")
    data = bytearray((tmp_path / "ok.bin").read_bytes())
    info = zipfile.ZipFile(tmp_path / "ok.bin").getinfo("ok/data/0")
    at = info.header_offset + 28
    struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] + shift)
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="does not end where the archive says"):
        read_torch_zip(tmp_path / "bad.bin")


def test_a_tensor_name_with_a_lone_surrogate_is_refused_by_file(tmp_path):
    torch.save({"ok": torch.ones(2), "bad\ud800": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="lone surrogate") as caught:
        read_torch_zip(tmp_path / "pytorch_model.bin")
    assert caught.value.path == tmp_path / "pytorch_model.bin"


@pytest.mark.parametrize(
    "body",
    [
        b"N" * 2000,  # Nones on the stack, never used
        b"}" * 2000,  # empty dicts: the costliest objects one opcode can make
        b"(" + b"X\x01\x00\x00\x00a" * 2000 + b"l",  # a list of short strings
        b"}X\x01\x00\x00\x00a](" + b"K\x01" * 2000 + b"es",  # a wide list inside a dict
    ],
    ids=["nones", "dicts", "strings", "wide-list"],
)
def test_a_pickle_running_more_operations_than_a_state_dict_needs_is_refused(tmp_path, monkeypatch, body):
    monkeypatch.setattr("deltakit.formats.torch_zip.MAX_PICKLE_OPS", 1000)  # the rule at the real cap is the same
    with pytest.raises(UnsafePickleError, match="more than 1000 operations") as caught:
        read_torch_zip(raw_archive(tmp_path / "x.bin", b"\x80\x02" + body + b"."))
    assert caught.value.path == tmp_path / "x.bin" and str(caught.value).startswith(f"{tmp_path / 'x.bin'}: ")


def test_the_operation_cap_holds_at_its_real_size(tmp_path):
    from deltakit.formats.torch_zip import MAX_PICKLE_OPS

    with pytest.raises(UnsafePickleError, match=f"more than {MAX_PICKLE_OPS} operations"):
        read_torch_zip(raw_archive(tmp_path / "x.bin", b"\x80\x02" + b"N" * (MAX_PICKLE_OPS + 1) + b"}."))


def test_the_operation_cap_counts_what_torch_save_writes_per_tensor(tmp_path, monkeypatch):
    """torch.save spends about 32 operations a tensor: a state dict within the cap reads, a larger one
    is refused (the real cap allows tens of thousands of tensors in one file)."""
    monkeypatch.setattr("deltakit.formats.torch_zip.MAX_PICKLE_OPS", 32 * 20)
    tensors = {f"layers.{i}.weight": torch.zeros(2, 2, dtype=torch.float16) for i in range(40)}
    small = save_bin(tmp_path / "small", dict(list(tensors.items())[:15]))
    assert len(read_torch_zip(small / "pytorch_model.bin")) == 15
    large = save_bin(tmp_path / "large", tensors)
    with pytest.raises(UnsafePickleError, match="operations"):
        read_torch_zip(large / "pytorch_model.bin")
