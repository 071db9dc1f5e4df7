"""Wrong bases, corrupt deltas and occupied outputs: a specific error, and nothing left behind."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import finetune_of, llama_like, random_tensor, write_checkpoint

from deltakit import (
    BaseMismatchError,
    FormatError,
    InputNotFoundError,
    IntegrityError,
    ManifestError,
    OutputExistsError,
    SafetensorsHeaderError,
    UnsupportedInputError,
    apply_delta,
    make_delta,
    verify_delta,
    verify_model,
)
from deltakit.formats import read_header


@pytest.fixture(params=[1, 2], ids=["format1", "format2"])
def delta(tmp_path, make_pair, request):
    """A delta package in each format: every failure below must be caught in both."""
    base = llama_like(torch.float16, layers=3)
    base_dir, target_dir = make_pair(base, finetune_of(base, extra_vocab=4))
    make_delta(base_dir, target_dir, tmp_path / "delta", format=request.param)
    return base, base_dir, tmp_path / "delta"


def leftovers(folder: Path) -> list[str]:
    """Anything apply may have left: the output itself or a staging folder."""
    return sorted(p.name for p in folder.iterdir() if p.name == "out" or ".deltakit-" in p.name)


def test_wrong_base_fails_on_the_sampled_tensors_before_streaming(tmp_path, delta, monkeypatch):
    _, _, delta_dir = delta
    other = llama_like(torch.float16, layers=3, seed=42)  # same names, dtypes, shapes; other weights
    other_dir = write_checkpoint(tmp_path / "other", other)
    streamed = []
    monkeypatch.setattr("deltakit.engine.apply._stream_apply", lambda *a, **k: streamed.append(1))

    with pytest.raises(BaseMismatchError) as err:
        apply_delta(other_dir, delta_dir, tmp_path / "out")

    assert err.value.tensor == "model.embed_tokens.weight"
    assert "differs from the one the delta was made from" in str(err.value)
    assert "expected blake3" in str(err.value)
    assert streamed == [], "the sampled check must fail before any streaming"
    assert leftovers(tmp_path) == []


def test_base_differing_only_in_a_later_layer_fails_while_streaming(tmp_path, delta):
    base, _, delta_dir = delta
    altered = dict(base)
    altered["model.layers.2.self_attn.v_proj.weight"] = random_tensor((16, 16), torch.float16, 77)
    altered_dir = write_checkpoint(tmp_path / "altered", altered)
    with pytest.raises(BaseMismatchError) as err:
        apply_delta(altered_dir, delta_dir, tmp_path / "out")
    assert err.value.tensor == "model.layers.2.self_attn.v_proj.weight"
    assert leftovers(tmp_path) == []


def test_base_missing_a_tensor_or_in_another_dtype(tmp_path, delta):
    base, _, delta_dir = delta
    missing = {k: v for k, v in base.items() if k != "model.norm.weight"}
    with pytest.raises(BaseMismatchError, match=r"lacks tensor 'model\.norm\.weight'"):
        apply_delta(write_checkpoint(tmp_path / "missing", missing), delta_dir, tmp_path / "out")
    as32 = {k: v.float() for k, v in base.items()}
    with pytest.raises(BaseMismatchError, match=r"is F32 .* made from F16"):
        apply_delta(write_checkpoint(tmp_path / "as32", as32), delta_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_corrupt_payload_fails_naming_the_tensor(tmp_path, delta):
    _, base_dir, delta_dir = delta
    payload = next(delta_dir.glob("delta-*.safetensors"))
    info = read_header(payload).tensors["model.layers.1.self_attn.k_proj.weight"]
    flip_byte(payload, info.start + 5)
    with pytest.raises(IntegrityError) as err:
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert err.value.tensor == "model.layers.1.self_attn.k_proj.weight"
    # a flipped coded byte either breaks the frame or decodes to other bits: both are named
    assert "payload is corrupt" in str(err.value) or "frame 0 (elements 0 to" in str(err.value)
    assert leftovers(tmp_path) == []
    report = verify_delta(delta_dir)
    assert not report.ok and report.mismatched[0].name == payload.name


def test_truncated_payload_fails_before_reading(tmp_path, delta):
    _, base_dir, delta_dir = delta
    payload = next(delta_dir.glob("delta-*.safetensors"))
    os.truncate(payload, payload.stat().st_size - 100)
    with pytest.raises(IntegrityError, match="truncated or replaced"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_failed_apply_removes_the_parent_folders_it_created(tmp_path, delta):
    _, _, delta_dir = delta
    other = write_checkpoint(tmp_path / "other", llama_like(torch.float16, layers=3, seed=42))
    with pytest.raises(BaseMismatchError):
        apply_delta(other, delta_dir, tmp_path / "nest" / "a" / "out")
    assert not (tmp_path / "nest").exists()


def test_casts_are_the_same_whatever_the_thread_count():
    # torch keeps NaN payloads in its vector loops but not its scalar tails; the cast must not care
    import numpy as np

    from deltakit.codecs import cast_bits

    n = 2_000_000  # big enough for torch to split the work across threads
    bits = np.zeros(n, dtype=np.uint16)
    bits[::997] = 0x7D01  # NaNs with a payload, in vector loops and at the thread boundaries' scalar tails
    bits[n // 3 - 10 : n // 3 + 10] = 0xFD55
    bits[-7:] = 0x7D01
    raw = bits.view(np.uint8)
    results = []
    for threads in (1, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(bytes(cast_bits(raw, "F16", "F32")))
        finally:
            torch.set_num_threads(old)
    # without canonical NaNs, raw torch gives two different results here (checked when written)
    assert len(set(results)) == 1


def test_corrupt_carried_file_fails(tmp_path, delta):
    _, base_dir, delta_dir = delta
    (delta_dir / "files" / "config.json").write_text('{"vocab_size": 2}\n')  # same size, other bytes
    with pytest.raises(IntegrityError, match=r"config\.json"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_and_left_untouched(tmp_path, delta):
    _, base_dir, delta_dir = delta
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        apply_delta(base_dir, delta_dir, out)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_empty_output_folder_is_accepted(tmp_path, delta):
    _, base_dir, delta_dir = delta
    (tmp_path / "out").mkdir()
    apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_make_refuses_an_existing_output(tmp_path, make_pair):
    base = llama_like(torch.float32)
    base_dir, target_dir = make_pair(base, finetune_of(base))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(OutputExistsError):
        make_delta(base_dir, target_dir, tmp_path / "d")


def edit_manifest(delta_dir: Path, edit) -> None:
    path = delta_dir / "deltakit.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["target"]["files"].update({"../escape.txt": {"sha256": "0" * 64, "size": 1}}), "safe relative"),
        (lambda m: m["target"]["files"].update({"/etc/passwd": {"sha256": "0" * 64, "size": 1}}), "safe relative"),
        (lambda m: m["payload"].update({"sub/x.safetensors": {"sha256": "0" * 64, "size": 1}}), "safe relative"),
        (lambda m: m.update(format=3), "upgrade deltakit"),
        (
            lambda m: m["target"].update(fingerprint=m["base"]["fingerprint"]),
            r"target\.fingerprint: is .*tensor records",
        ),
        (lambda m: m["base"].update(fingerprint="ab" * 32), r"base\.fingerprint: is abababab"),
        (lambda m: m["target"]["tensors"]["lm_head.weight"].update(encoding="zip"), "unknown encoding"),
        (lambda m: m["base"]["tensors"]["lm_head.weight"].update(digest="xyz"), "64 lowercase hex"),
        (lambda m: m["base"]["tensors"]["lm_head.weight"].update(shape=[-1]), "non-negative"),
        (lambda m: m["target"]["tensors"]["lm_head.weight"].update(base_rows=10**6), "base_rows"),
        (lambda m: m["base"].pop("fingerprint"), "missing field 'fingerprint'"),
    ],
)
def test_hostile_manifest_is_refused_with_the_field_named(tmp_path, delta, edit, message):
    _, base_dir, delta_dir = delta
    edit_manifest(delta_dir, edit)
    with pytest.raises(ManifestError, match=message):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "escape.txt").exists()


def test_not_a_delta_and_missing_inputs(tmp_path, delta):
    _, base_dir, delta_dir = delta
    with pytest.raises(ManifestError, match="not a deltakit delta package"):
        apply_delta(base_dir, base_dir, tmp_path / "out")
    with pytest.raises(InputNotFoundError):
        apply_delta(tmp_path / "nope", delta_dir, tmp_path / "out")
    with pytest.raises(UnsupportedInputError, match="is a deltakit delta package, not a model"):
        apply_delta(delta_dir, delta_dir, tmp_path / "out")
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedInputError, match=r"pytorch_model\.bin"):
        make_delta(tmp_path / "binonly", base_dir, tmp_path / "d")


def test_missing_shard_named_by_the_index(tmp_path):
    base = llama_like(torch.float16)
    folder = write_checkpoint(tmp_path / "m", base, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        make_delta(folder, folder, tmp_path / "d")


def test_manifest_target_that_disagrees_with_its_base_record(tmp_path, delta):
    _, base_dir, delta_dir = delta
    q = "model.layers.0.self_attn.q_proj.weight"
    edit_manifest(delta_dir, lambda m: m["target"]["tensors"][q].update(shape=[8, 32]))
    with pytest.raises(ManifestError, match=r"base shape \[16, 16\] differs from the target's \[8, 32\]"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    edit_manifest(delta_dir, lambda m: m["target"]["tensors"][q].update(shape=[16, 16], cast_from="F32"))
    with pytest.raises(ManifestError, match="base is F16, but cast_from says F32"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")


def test_payload_header_that_disagrees_with_the_manifest(tmp_path, delta):
    _, base_dir, delta_dir = delta
    payload = next(delta_dir.glob("delta-*.safetensors"))
    raw = payload.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header["model.norm.weight2"] = header.pop("lm_head.weight")
    body = json.dumps(header).encode().ljust(size)
    assert len(body) == size
    payload.write_bytes(raw[:8] + body + raw[8 + size :])
    with pytest.raises(FormatError, match=r"lacks tensor 'lm_head\.weight'"):
        apply_delta(base_dir, delta_dir, tmp_path / "out")


def test_verify_reports_rather_than_raises(tmp_path, delta):
    _, base_dir, delta_dir = delta
    apply_delta(base_dir, delta_dir, tmp_path / "out")
    # tamper with the rebuilt model: one tensor changed, one file removed
    rebuilt = tmp_path / "out"
    info = read_header(rebuilt / "model.safetensors").tensors["model.norm.weight"]
    flip_byte(rebuilt / "model.safetensors", info.start)
    (rebuilt / "config.json").unlink()
    report = verify_model(rebuilt, delta_dir)
    assert not report.ok
    assert [m.name for m in report.mismatched] == ["model.norm.weight"]
    assert report.missing == ("config.json",)

    other = write_checkpoint(tmp_path / "other", llama_like(torch.float16, layers=3, seed=5) | {"x": torch.ones(1)})
    report = verify_delta(delta_dir, base=other)
    assert not report.ok
    assert "x" in report.extra
    assert {m.name for m in report.mismatched} >= {"model.embed_tokens.weight"}


def test_hostile_safetensors_base_is_refused(tmp_path, delta):
    _, _, delta_dir = delta
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(SafetensorsHeaderError, match="byte cap"):
        apply_delta(bad, delta_dir, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_an_output_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, delta, monkeypatch):
    import shutil
    from collections import namedtuple

    from deltakit import NoSpaceError

    _, base_dir, delta_dir = delta
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(NoSpaceError, match="free: free some space") as err:
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert err.value.actual == 1000 and err.value.expected > 1000
    assert leftovers(tmp_path) == []


def test_a_disk_that_fills_up_mid_write_is_named(tmp_path, delta, monkeypatch):
    """ENOSPC from write(2) names no file; the error must name the output, and leave nothing."""
    import errno

    from deltakit import NoSpaceError

    _, base_dir, delta_dir = delta

    def full(fd, view, offset=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("deltakit.writing.write_all", full)
    with pytest.raises(NoSpaceError, match="the disk filled up while writing it") as err:
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert err.value.path == tmp_path / "out" and str(tmp_path / "out") in str(err.value)
    assert leftovers(tmp_path) == []


def test_a_disk_that_fills_up_under_a_direct_write_is_named(tmp_path, delta, monkeypatch):
    """apply writes its output in aligned blocks on a thread of their own (O_DIRECT where the
    filesystem takes it): ENOSPC there names the output too, and leaves nothing."""
    import errno

    from deltakit import NoSpaceError, writing

    _, base_dir, delta_dir = delta
    write_all = writing.write_all

    probe = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if not writing.set_direct(probe, True):
            pytest.skip("this filesystem refuses O_DIRECT")
    finally:
        os.close(probe)
        os.unlink(tmp_path / "probe")
    refused = []

    def full_when_direct(fd, view, offset=None):
        if writing.fcntl.fcntl(fd, writing.fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_all(fd, view, offset)

    monkeypatch.setattr(writing, "DIRECT_BLOCK", 16384)
    monkeypatch.setattr(writing, "write_all", full_when_direct)
    with pytest.raises(NoSpaceError, match="the disk filled up while writing it") as err:
        apply_delta(base_dir, delta_dir, tmp_path / "out")
    assert refused and err.value.path == tmp_path / "out"
    assert leftovers(tmp_path) == []


def test_a_disk_that_fills_up_while_make_flushes_its_payload_is_named(tmp_path, make_pair, monkeypatch):
    """make flushes its payload to disk behind the writing; ENOSPC from that flush (delayed
    allocation) names the output like any other, and leaves nothing."""
    import errno

    from deltakit import NoSpaceError
    from deltakit.engine.make import _PayloadShards

    base = llama_like(torch.float16, layers=2)
    base_dir, target_dir = make_pair(base, finetune_of(base))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_PayloadShards, "WRITEBACK_BYTES", 1024)
    monkeypatch.setattr(os, "fdatasync", full, raising=False)
    out = tmp_path / "out"
    with pytest.raises(NoSpaceError, match="the disk filled up while writing it") as err:
        make_delta(base_dir, target_dir, out)
    assert err.value.path == out
    assert leftovers(tmp_path) == []


def test_side_files_linking_outside_their_folder_are_not_copied(tmp_path, make_pair):
    from deltakit import UnsupportedInputError

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    base = llama_like(torch.float16)
    base_dir, target_dir = make_pair(base, finetune_of(base))
    (target_dir / "tokenizer.model").symlink_to(secret)
    with pytest.raises(UnsupportedInputError, match=r"tokenizer\.model: links to .*secret\.txt, outside its folder"):
        make_delta(base_dir, target_dir, tmp_path / "d")
    assert not (tmp_path / "d").exists()

    (target_dir / "tokenizer.model").unlink()
    (target_dir / "tokenizer.model").write_text("spm")
    (target_dir / "inside.json").symlink_to(target_dir / "tokenizer.model")  # inside its folder: fine
    make_delta(base_dir, target_dir, tmp_path / "d")
    # a hostile package: a carried file swapped for a link out of it, its size and hash recorded to match
    carried = tmp_path / "d" / "files" / "tokenizer.model"
    carried.unlink()
    carried.symlink_to(secret)
    manifest = json.loads((tmp_path / "d" / "deltakit.json").read_text())
    manifest["target"]["files"]["tokenizer.model"] = {
        "sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
        "size": secret.stat().st_size,
    }
    (tmp_path / "d" / "deltakit.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedInputError, match="outside its folder"):
        apply_delta(base_dir, tmp_path / "d", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_a_later_run_reclaims_what_a_killed_one_left_and_says_so(tmp_path, delta, caplog):
    import fcntl
    import logging

    from deltakit.staging import _MACHINE

    _, base_dir, delta_dir = delta
    killed = tmp_path / f".out.deltakit-{_MACHINE}-0123456789ab.tmp"  # what kill -9 leaves: a folder nobody locks
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    older = tmp_path / ".old.deltakit-0123456789ab.tmp"  # named as releases before 0.3 named them
    older.mkdir()
    elsewhere = tmp_path / ".x.deltakit-ffffffff-0123456789ab.tmp"  # another machine's: its lock is not seen here
    elsewhere.mkdir()
    live = tmp_path / ".other.deltakit-ba9876543210.tmp"  # another run's, still building: locked
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.WARNING, logger="deltakit"):
            apply_delta(base_dir, delta_dir, tmp_path / "out")
    finally:
        os.close(lock)
    assert not killed.exists() and not older.exists() and live.exists() and elsewhere.exists()
    assert f"removed {killed}, the temporary folder of an earlier run that was killed" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("mapped", [False, True, "unmappable"])
def test_a_file_that_shrinks_under_a_read_is_named_and_mapped_reads_give_the_same_bytes(tmp_path, mapped, monkeypatch):
    """make and apply map their inputs rather than copy them; a range past the end of a file (one cut
    short after its header was read) is an IntegrityError naming it, as with pread, never a SIGBUS.
    Where the file system cannot map files (some FUSE mounts), reads fall back to pread."""
    import mmap

    from deltakit.formats.checkpoint import RangeReader
    from deltakit.reading import Chunk, Prefetcher, Read

    if mapped == "unmappable":

        def refuse(*args, **kwargs):
            raise OSError(19, "No such device")

        monkeypatch.setattr(mmap, "mmap", refuse)

    data = os.urandom(3 * 65536 + 123)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    ranges = [(0, 10), (4097, 70000), (65535, 2), (len(data) - 5, 5), (17, 0)]
    chunks = [Chunk(k, 0, 0, 0, (Read(path, offset, length),)) for k, (offset, length) in enumerate(ranges)]
    with RangeReader() as reader:
        got = [bytes(views[0]) for _, views in Prefetcher(reader, mapped=bool(mapped)).run(chunks)]
        assert got == [data[offset : offset + length] for offset, length in ranges]
        os.truncate(path, len(data) - 100)
        with pytest.raises(IntegrityError, match=r"weights\.bin.*shrank or is truncated"):
            list(Prefetcher(reader, mapped=bool(mapped)).run([Chunk(0, 0, 0, 0, (Read(path, len(data) - 200, 150),))]))


def _refused_without_blocking(read, fifo: Path) -> UnsupportedInputError:
    """``read()`` must refuse the FIFO ``fifo`` by name at once; if it blocks opening it, a writer is
    connected to release it, and the test fails instead of hanging."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the blocked open return
        worker.join(5)
        pytest.fail(f"reading {fifo} blocked on the FIFO")
    error = outcome[0]
    assert isinstance(error, UnsupportedInputError), repr(error)
    assert str(fifo) in str(error) and "FIFO" in str(error)
    return error


def test_library_readers_refuse_a_fifo_by_name_without_blocking(tmp_path, delta):
    from deltakit.formats import open_checkpoint
    from deltakit.formats.torch_zip import read_torch_zip
    from deltakit.hashing import file_sha256, read_checksum_file
    from deltakit.manifest import load_manifest

    _, base_dir, delta_dir = delta
    fifos = tmp_path / "fifos"
    fifos.mkdir()
    for name in ("x.safetensors", "x.bin", "deltakit.json", "sums.txt", "model.safetensors"):
        os.mkfifo(fifos / name)
    _refused_without_blocking(lambda: read_header(fifos / "x.safetensors"), fifos / "x.safetensors")
    _refused_without_blocking(lambda: read_torch_zip(fifos / "x.bin"), fifos / "x.bin")
    _refused_without_blocking(lambda: load_manifest(fifos), fifos / "deltakit.json")
    _refused_without_blocking(lambda: file_sha256(fifos / "sums.txt"), fifos / "sums.txt")
    _refused_without_blocking(lambda: read_checksum_file(fifos / "sums.txt"), fifos / "sums.txt")
    _refused_without_blocking(lambda: open_checkpoint(fifos / "x.safetensors"), fifos / "x.safetensors")
    (fifos / "deltakit.json").unlink()
    _refused_without_blocking(lambda: open_checkpoint(fifos), fifos / "model.safetensors")
    payload = next(delta_dir.glob("delta-*.safetensors"))
    payload.unlink()
    os.mkfifo(payload)
    _refused_without_blocking(lambda: apply_delta(base_dir, delta_dir, tmp_path / "out"), payload)
    assert not (tmp_path / "out").exists()


def test_json_inputs_are_read_into_named_errors(tmp_path):
    from deltakit.errors import FormatError, InputNotFoundError
    from deltakit.files import read_json_object

    with pytest.raises(InputNotFoundError):
        read_json_object(tmp_path / "config.json")
    for text, found in (("[1]", "not a JSON object but list"), ("{", "cannot read"), ("\xff", "cannot read")):
        (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(FormatError, match=found) as caught:
            read_json_object(tmp_path / "config.json")
        assert caught.value.path == tmp_path / "config.json"
    (tmp_path / "config.json").write_text('{"a": "' + "x" * 100 + '"}')
    with pytest.raises(FormatError, match="byte cap"):
        read_json_object(tmp_path / "config.json", limit=50)
    assert read_json_object(tmp_path / "config.json", limit=200) == {"a": "x" * 100}
