"""The CLI through its real entry point, in a subprocess: exit codes, one-line errors, outputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, write_checkpoint

import deltakit


def deltakit_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("deltakit", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "deltakit"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    base = llama_like(torch.bfloat16)
    target = finetune_of(base, extra_vocab=6)
    base_dir = write_checkpoint(tmp / "llama", base)
    target_dir = write_checkpoint(tmp / "panda", target, files={"config.json": "{}", "tokenizer.json": "{}"})
    return tmp, base_dir, target_dir, target


def test_make_apply_verify_inspect(pair):
    tmp, base_dir, target_dir, target = pair
    made = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "d", "--quiet")
    assert made.returncode == 0, made.stderr
    assert "2 rows" in made.stdout and "panda from llama" in made.stdout

    dry = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / "d", "--out", tmp / "o", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "digests of model.embed_tokens.weight" in dry.stdout and ": ok" in dry.stdout
    assert not (tmp / "o").exists()

    applied = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / "d", "--out", tmp / "o")
    assert applied.returncode == 0, applied.stderr
    assert "apply:" in applied.stderr and "B/s" in applied.stderr, "a progress bar in bytes on stderr"
    assert "all digests match" in applied.stdout
    assert_same_tensors(load_checkpoint(tmp / "o"), target)

    verified = deltakit_cli("verify", tmp / "o", "--delta", tmp / "d", "-q")
    assert verified.returncode == 0 and verified.stdout.startswith("OK:"), verified.stdout
    assert verified.stderr == "", "--quiet silences the bars"
    verified = deltakit_cli("verify", tmp / "d", "--base", base_dir, "--json", "-q")
    assert json.loads(verified.stdout)["ok"] is True

    shown = deltakit_cli("inspect", tmp / "d", "--json")
    info = json.loads(shown.stdout)
    assert info["kind"] == "delta" and info["base_name"] == "llama" and info["target_name"] == "panda"
    encodings = info["encodings"]
    assert encodings.pop("copy") == 3 and encodings.pop("rows") == 2
    assert sum(encodings.values()) == 8 and set(encodings) <= {"xor", "sub"}, "lossless: xor or sub per tensor"
    shown = deltakit_cli("inspect", base_dir, "--fingerprint", "-q")
    manifest = deltakit.load_manifest(tmp / "d")
    assert f"fingerprint {manifest.base.fingerprint}" in shown.stdout
    assert "model checkpoint" in shown.stdout


def test_failures_exit_1_with_one_line_and_usage_exits_2(pair):
    tmp, base_dir, target_dir, _ = pair
    deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "d2", "-q")
    wrong = write_checkpoint(tmp / "wrong", llama_like(torch.bfloat16, seed=9))

    failed = deltakit_cli("apply", "--base", wrong, "--delta", tmp / "d2", "--out", tmp / "o2", "-q")
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("deltakit: error: base tensor 'model.embed_tokens.weight'")
    dry = deltakit_cli("apply", "--base", wrong, "--delta", tmp / "d2", "--out", tmp / "o2", "--dry-run", "-q")
    assert dry.returncode == 1 and "base tensor 'model.embed_tokens.weight'" in dry.stderr, "a dry run checks too"
    assert not (tmp / "o2").exists()
    assert "Traceback" not in failed.stderr
    assert not (tmp / "o2").exists()
    assert not list(tmp.glob(".o2.deltakit-*"))

    assert deltakit_cli("apply", "--base", base_dir).returncode == 2
    assert deltakit_cli("make", "--base", "x", "--target", "y", "--out", "z", "--shard-size", "lots").returncode == 2
    missing = deltakit_cli("inspect", tmp / "nothing-here")
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr

    bad = deltakit_cli("verify", tmp / "d2", "--base", wrong, "-q")
    assert bad.returncode == 1 and bad.stdout.startswith("FAILED: delta ") and " differ of " in bad.stdout
    assert "mismatched" not in bad.stdout and len(bad.stdout.splitlines()) == 2, "a summary, the details on request"
    detailed = deltakit_cli("verify", tmp / "d2", "--base", wrong, "-q", "--verbose")
    assert detailed.returncode == 1 and "mismatched  model.embed_tokens.weight" in detailed.stdout


def test_demo_runs_end_to_end(tmp_path):
    result = deltakit_cli("demo", "--dir", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout and "side files identical: True" in result.stdout
    # the demo's model carries a SentencePiece vocabulary, so the delta also goes straight to GGUF
    assert "apply --base base --delta delta --to gguf" in result.stdout and "(f16)" in result.stderr + result.stdout
    from gguf import GGUFReader

    tokens = GGUFReader(tmp_path / "demo" / "finetune.gguf").fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 1200  # 1000 SentencePiece pieces and the fine-tune's 200 added tokens
    assert bytes(tokens.parts[tokens.data[1000]]) == b"<extra_0>"
    again = deltakit_cli("demo", "--dir", tmp_path / "demo")
    assert again.returncode == 1 and "not empty" in again.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5_000_000_000), ("500MB", 500_000_000), ("2GiB", 2 * 1024**3), ("1000", 1000), ("1.5KB", 1500)],
)
def test_parse_size(text, size):
    from deltakit.units import parse_size

    assert parse_size(text) == size


def test_bad_registry_bad_ports_and_shard_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "registry.json").write_text("[1, 2]")
    listed = deltakit_cli("registry", "list")
    assert listed.returncode == 1 and "the registry is unreadable" in listed.stderr
    assert "internal error" not in listed.stderr
    assert deltakit_cli("serve", "--port", "99999").returncode == 2
    assert deltakit_cli("convert", str(tmp_path), "--out", str(tmp_path / "o"), "--meta-shards", "-1").returncode == 2


def test_a_name_that_is_also_a_folder_is_resolved_as_registered_and_says_so(tmp_path, monkeypatch):
    base = llama_like(torch.float16)
    write_checkpoint(tmp_path / "llama", base)
    other = write_checkpoint(tmp_path / "elsewhere", base)
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    assert deltakit_cli("registry", "add", "llama", other, "-q").returncode == 0
    shown = deltakit_cli("inspect", "llama", cwd=tmp_path)
    assert shown.returncode == 0
    assert "is both a registered name and a path here" in shown.stderr


def test_make_formats_and_levels(pair):
    tmp, base_dir, target_dir, target = pair
    raw = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "f1", "--format", "1", "-q")
    assert raw.returncode == 0, raw.stderr
    small = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "max", "--max", "-q")
    assert small.returncode == 0, small.stderr
    shown = {name: json.loads(deltakit_cli("inspect", tmp / name, "--json").stdout) for name in ("f1", "max")}
    assert shown["f1"]["format"] == 1 and shown["max"]["format"] == 2
    assert "format 1" in deltakit_cli("inspect", tmp / "f1").stdout
    assert "(format 2, compressed)" in deltakit_cli("inspect", tmp / "max").stdout
    assert shown["max"]["payload_bytes"] < shown["f1"]["payload_bytes"]
    for name in ("f1", "max"):
        applied = deltakit_cli("apply", "--base", base_dir, "--delta", tmp / name, "--out", tmp / f"out-{name}", "-q")
        assert applied.returncode == 0, applied.stderr
        assert_same_tensors(load_checkpoint(tmp / f"out-{name}"), target)
    for bad in (["--level", "0"], ["--level", "23"], ["--format", "3"], ["--level", "3", "--max"]):
        refused = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp / "no", *bad)
        assert refused.returncode == 2, bad
    assert not (tmp / "no").exists()


def run_patched(patch: str, *args: str | Path) -> subprocess.Popen[str]:
    """The CLI in a subprocess, after ``patch`` (Python code) has run in it."""
    code = f"import sys, deltakit.cli; {patch}; sys.exit(deltakit.cli.main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_verbose_shows_the_traceback_of_an_internal_error(pair):
    _, base_dir, _, _ = pair
    patch = "import deltakit.cli.delta as d; d._cmd_inspect = lambda args: 1 // 0"
    quiet = run_patched(patch, "inspect", base_dir)
    _, err = quiet.communicate(timeout=120)
    assert quiet.returncode == 1 and "ZeroDivisionError" in err and "run with --verbose" in err
    assert "Traceback" not in err
    loud = run_patched(patch, "inspect", base_dir, "--verbose")
    _, err = loud.communicate(timeout=120)
    assert loud.returncode == 1 and "Traceback (most recent call last)" in err and "in <lambda>" in err


def test_sigterm_during_apply_exits_143_and_leaves_nothing(pair):
    tmp, base_dir, target_dir, _ = pair
    deltakit.make_delta(base_dir, target_dir, tmp / "sig-delta", format=1)
    out = tmp / "sig-out"
    # tiny chunks: an apply that takes long enough to be signalled while it streams
    apply = run_patched(
        "import deltakit.reading as s; s.CHUNK_BYTES = 16",
        "apply",
        "--base",
        base_dir,
        "--delta",
        tmp / "sig-delta",
        "--out",
        out,
        "-q",
    )
    deadline = time.monotonic() + 60
    while not list(tmp.glob(".sig-out.deltakit-*")) and apply.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    apply.send_signal(signal.SIGTERM)
    _, err = apply.communicate(timeout=120)
    assert apply.returncode == 143, err
    assert "terminated (SIGTERM); nothing was left half-written" in err
    assert not out.exists() and not list(tmp.glob(".sig-out.deltakit-*"))


def test_short_version_flag():
    shown = deltakit_cli("-V")
    assert shown.returncode == 0 and shown.stdout.strip() == f"deltakit {deltakit.__version__}"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DELTAKIT_ROOTS", "/x", "DELTAKIT_ROOTS is not a JSON list of folders"),
        ("DELTAKIT_WORKERS", "abc", "DELTAKIT_WORKERS is not a whole number from 1 to 64"),
        ("DELTAKIT_WORKERS", "0", "DELTAKIT_WORKERS is not a whole number from 1 to 64"),
    ],
)
def test_a_mistaken_setting_is_named_with_its_form(tmp_path, monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    for command in (["serve", "--port", "0"], ["token", "create", "--scope", "read"]):
        result = deltakit_cli(*command, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"deltakit: error: the setting {expected}"), lines


def test_quiet_and_verbose_also_go_before_the_command(pair):
    tmp, base_dir, target_dir, _ = pair
    made = deltakit_cli("-q", "make", "--base", base_dir, "--target", target_dir, "--out", tmp / "first-q")
    assert made.returncode == 0 and made.stderr == "", made.stderr
    shown = deltakit_cli("-v", "inspect", tmp / "first-q")
    assert shown.returncode == 0
    assert "a checkpoint, delta package, adapter or legacy delta" in deltakit_cli("inspect", "-h").stdout


def test_serve_stops_cleanly_on_sigterm_as_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    exe = shutil.which("deltakit", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "deltakit"]
    serve = subprocess.Popen([*command, "serve", "--port", "0"], stderr=subprocess.PIPE, text=True)
    assert serve.stderr is not None
    for line in serve.stderr:  # uvicorn logs its start-up on stderr
        if "Application startup complete" in line:
            break
    serve.send_signal(signal.SIGTERM)  # what docker stop and systemd send
    _, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err
    assert "terminated" not in err and "Application shutdown complete" in err


@pytest.mark.parametrize(
    ("command", "where", "name"),
    [
        ("apply", "delta", "deltakit.json"),
        ("verify", "delta", "deltakit.json"),
        ("apply", "delta", "delta-00001-of-00001.safetensors"),
        ("verify", "delta", "delta-00001-of-00001.safetensors"),
        ("apply", "base", "model.safetensors"),
        ("verify", "base", "model.safetensors"),
        ("verify-model", "model", "model.safetensors"),
    ],
)
def test_a_fifo_in_place_of_an_input_fails_promptly_naming_it(pair, tmp_path, command, where, name):
    """A FIFO blocks whoever opens it for reading until a writer comes: every input is opened without
    blocking and refused unless it is a regular file. The timeout turns a regression into a failure."""
    _, base_dir, target_dir, _ = pair
    folders = {"base": tmp_path / "base", "model": tmp_path / "model", "delta": tmp_path / "delta"}
    shutil.copytree(base_dir, folders["base"])
    shutil.copytree(target_dir, folders["model"])
    deltakit.make_delta(folders["base"], folders["model"], folders["delta"])
    fifo = folders[where] / name
    assert fifo.is_file(), f"the package has no {name}"
    fifo.unlink()
    os.mkfifo(fifo)
    args = {
        "apply": ["apply", "--base", folders["base"], "--delta", folders["delta"], "--out", tmp_path / "out"],
        "verify": ["verify", folders["delta"], "--base", folders["base"]],
        "verify-model": ["verify", folders["model"], "--delta", folders["delta"]],
    }[command]
    exe = shutil.which("deltakit", path=str(Path(sys.executable).parent))
    run = subprocess.run(
        [*([exe] if exe else [sys.executable, "-m", "deltakit"]), *map(str, args), "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert not (tmp_path / "out").exists()
    if (command, where, name) == ("verify", "delta", "delta-00001-of-00001.safetensors"):
        # verify reports a payload file it cannot check rather than raising: named, with what is there
        assert "1 differ" in run.stdout
        listed = subprocess.run([*run.args[:-1], "--verbose"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 1
        assert f"mismatched  {name}: expected a regular file, found a FIFO" in listed.stdout, listed.stdout
        return
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fifo) in lines[0] and "FIFO" in lines[0], run.stderr


def test_library_errors_state_facts_and_the_cli_adds_its_flags(pair, tmp_path, monkeypatch):
    """staging and the registry name the argument (argument="out"), never a flag; the CLI turns it into
    the running command's flag and the advice that fits."""
    from deltakit import OutputExistsError
    from deltakit.registry import Registry, StaleNameError
    from deltakit.staging import check_output_file_free, check_output_free
    from deltakit.units import parse_size

    _, base_dir, target_dir, _ = pair
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"x")
    for check in (check_output_free, check_output_file_free):
        with pytest.raises(OutputExistsError) as refused:
            check(tmp_path / "full")
        assert refused.value.argument == "out" and "--" not in str(refused.value), refused.value
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_size("lots")

    made = deltakit_cli("make", "--base", base_dir, "--target", target_dir, "--out", tmp_path / "full", "-q")
    assert made.returncode == 1 and "not empty" in made.stderr and "choose another --out" in made.stderr
    converted = deltakit_cli("convert", base_dir, "--to", "gguf", "--out", tmp_path / "full" / "x", "-q")
    assert converted.returncode == 1 and "choose another --out" in converted.stderr, converted.stderr

    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "home"))
    delta = deltakit.make_delta(base_dir, target_dir, tmp_path / "delta", format=1).out
    moved = shutil.copytree(base_dir, tmp_path / "moved")
    Registry(tmp_path / "home").add("moved", moved)
    shutil.rmtree(moved)
    with pytest.raises(StaleNameError) as stale:
        Registry(tmp_path / "home").resolve("moved")
    assert stale.value.argument == "name" and "deltakit" not in str(stale.value)
    applied = deltakit_cli("apply", "--base", "moved", "--delta", delta, "--out", tmp_path / "o", "-q")
    assert applied.returncode == 1 and "`deltakit registry remove moved` forgets it" in applied.stderr
    hub_id = deltakit_cli("registry", "add", "x", delta, "--hub-id", "org/x", "-q")
    assert hub_id.returncode == 1 and "no use for a Hub id" in hub_id.stderr and "--hub-id" in hub_id.stderr


def test_the_advice_names_the_running_commands_flag():
    from deltakit import DeltakitError, OutputExistsError
    from deltakit.cli.advice import _advice

    flags = {"out": "--out", "source": "SOURCE"}
    assert (
        _advice(OutputExistsError("o exists", argument="out"), flags) == "; choose another --out or remove it yourself"
    )
    assert _advice(OutputExistsError("o exists", argument="out"), {}) == "", "no flag, no advice about one"
    assert _advice(DeltakitError("bad", argument="source"), flags) == "; check SOURCE"
    assert _advice(DeltakitError("bad"), flags) == ""


def test_ray_is_refused_for_what_it_cannot_fan_out(pair, tmp_path):
    """--ray with a legacy delta (or LoRA adapters) ran on one machine, the flag silently dropped."""
    _, base_dir, _, _ = pair
    legacy = tmp_path / "legacy-release"
    legacy.mkdir()  # a folder without deltakit.json is read as a legacy delta
    run = deltakit_cli("apply", "--base", base_dir, "--delta", legacy, "--out", tmp_path / "o", "--ray", "auto")
    assert run.returncode == 2 and "--ray rebuilds a deltakit delta" in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()
