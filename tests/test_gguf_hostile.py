"""Hostile and malformed inputs to GGUF conversion: each refused by name (file, field, what was found),
quickly, in bounded memory, with nothing left at the output; the same checks in a dry run and at job
submission."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import deltakit_cli
from tinyllama import write_finetune, write_tiny_llama

from deltakit import gguf as library
from deltakit import make_delta
from deltakit.errors import DeltakitError, FormatError, UnsupportedInputError
from deltakit.gguf import apply_to_gguf, convert_to_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    base = write_tiny_llama(tmp / "llama-tiny", seed=3)
    target = write_finetune(base, tmp / "panda-tiny", extra_rows=6)
    return tmp, base, target


def altered(target: Path, folder: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of ``target`` with config.json's fields replaced (None deletes one) and tensors replaced
    (None deletes one)."""
    shutil.copytree(target, folder)
    if config:
        data = json.loads((folder / "config.json").read_text())
        for key, value in config.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / "config.json").write_text(json.dumps(data))
    if tensors:
        weights = load_file(str(folder / "model.safetensors"))
        for key, value in tensors.items():
            if value is None:
                weights.pop(key)
            else:
                weights[key] = value
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


Q0 = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"

CONFIGS = {  # config.json's fields -> the error, and a fragment of its message after "config.json: "
    "float vocab_size": ({"vocab_size": 391.0}, FormatError, "vocab_size must be an integer"),
    "3e9 vocab_size": ({"vocab_size": 3e9}, FormatError, "vocab_size must be an integer"),
    "huge vocab_size": ({"vocab_size": 3_000_000_000}, FormatError, "vocab_size must be an integer from 1 to"),
    "negative head_dim": ({"head_dim": -16}, FormatError, "head_dim must be an integer from 1 to"),
    "huge head_dim": ({"head_dim": 2**40}, FormatError, "head_dim must be an integer from 1 to"),
    "head_dim against q_proj": ({"head_dim": 8}, FormatError, "of head_dim 8 make it [16, 64]"),
    "negative context": ({"max_position_embeddings": -1}, FormatError, "max_position_embeddings must be"),
    "huge context": ({"max_position_embeddings": 2**70}, FormatError, "max_position_embeddings must be"),
    "string rope_theta": ({"rope_theta": "10000"}, FormatError, "rope_theta must be a finite number"),
    "string rms_norm_eps": ({"rms_norm_eps": "1e-5"}, FormatError, "rms_norm_eps must be a finite number"),
    "NaN rms_norm_eps": ({"rms_norm_eps": float("nan")}, FormatError, "rms_norm_eps must be a finite number"),
    "yarn, no original context": (
        {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
        FormatError,
        "rope_scaling.original_max_position_embeddings is missing",
    ),
    "list rope_parameters": ({"rope_parameters": [1, 2]}, FormatError, "rope_parameters must be an object"),
    "string rope factor": (
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": "2"}},
        FormatError,
        "rope_scaling.factor must be",
    ),
    "non-list architectures": (
        {"architectures": "LlamaForCausalLM"},
        FormatError,
        "architectures must be a list of strings",
    ),
    "5e7 layers": ({"num_hidden_layers": 50_000_000}, FormatError, "num_hidden_layers must be an integer"),
    "layers not present": ({"num_hidden_layers": 3}, FormatError, "num_hidden_layers 3"),
    "negative bos_token_id": ({"bos_token_id": -1}, FormatError, "bos_token_id must be"),
    "bool hidden_size": ({"hidden_size": True}, FormatError, "hidden_size must be an integer"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_malformed_config_is_refused_by_file_and_field(models, tmp_path, case):
    _, _, target = models
    fields, error, fragment = CONFIGS[case]
    source = altered(target, tmp_path / "model", config=fields)
    with pytest.raises(error) as caught:
        convert_to_gguf(source, tmp_path / "m.gguf")
    assert f"{source / 'config.json'}" in str(caught.value) and fragment in str(caught.value), str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


TENSORS = {  # (config fields, tensors) -> a fragment of the message
    "scalar q_proj": ({}, {Q0: torch.tensor(1.0, dtype=torch.float16)}, "q_proj.weight"),
    "zero-row q_proj": ({}, {Q0: torch.zeros(0, 64, dtype=torch.float16)}, "q_proj.weight"),
    "q_proj of another shape": ({}, {Q0: torch.zeros(32, 64, dtype=torch.float16)}, "q_proj.weight"),
    "no embedding, 3e9 vocab": ({"vocab_size": 3_000_000_000}, {EMBED: None}, "vocab_size"),
    "no embedding": ({}, {EMBED: None}, "model.embed_tokens.weight"),
    "zero-width embedding": ({"vocab_size": 100_000}, {EMBED: torch.zeros(100_000, 0)}, "embed_tokens"),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_tensors_that_disagree_with_the_config_are_refused(models, tmp_path, case):
    _, _, target = models
    fields, tensors, fragment = TENSORS[case]
    source = altered(target, tmp_path / "model", config=fields, tensors=tensors)
    with pytest.raises(FormatError) as caught:
        convert_to_gguf(source, tmp_path / "m.gguf")
    assert fragment in str(caught.value) and "config.json" in str(caught.value), str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("garbage{", "tokenizer.json: cannot read"), ('{"added_tokens": 5}', "added_tokens must be a list")],
)
def test_a_garbage_tokenizer_json_is_refused_by_name(models, tmp_path, content, fragment):
    _, _, target = models
    source = altered(target, tmp_path / "model")
    (source / "tokenizer.json").write_text(content)
    with pytest.raises(FormatError, match=fragment) as caught:
        convert_to_gguf(source, tmp_path / "m.gguf")
    assert str(source / "tokenizer.json") in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


BOMB = "---\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(20)
)


def test_a_model_card_with_yaml_aliases_is_refused(models, tmp_path):
    _, _, target = models
    source = altered(target, tmp_path / "model")
    (source / "README.md").write_text(BOMB + "---\n# card\n")
    with pytest.raises(FormatError, match="YAML alias") as caught:
        convert_to_gguf(source, tmp_path / "m.gguf")
    assert str(source / "README.md") in str(caught.value)
    (source / "README.md").write_text("---\nlicense: [\n---\n")
    with pytest.raises(FormatError, match=r"README\.md"):
        convert_to_gguf(source, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_fifo_in_place_of_config_json_fails_promptly(models, tmp_path):
    _, _, target = models
    source = altered(target, tmp_path / "model")
    (source / "config.json").unlink()
    os.mkfifo(source / "config.json")
    done = subprocess.run(
        [sys.executable, "-m", "deltakit", "convert", str(source), "--to", "gguf", "--out", str(tmp_path / "m.gguf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and "config.json" in done.stderr and "FIFO" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def bad_delta(models, tmp_path: Path, config: dict) -> Path:
    _, base, target = models
    bad = altered(target, tmp_path / "bad-target", config=config)
    make_delta(base, bad, tmp_path / "bad-delta")
    shutil.rmtree(bad)
    return tmp_path / "bad-delta"


def test_apply_errors_name_the_deltas_own_files_never_the_staging_folder(models, tmp_path):
    _, base, _ = models
    delta = bad_delta(models, tmp_path, {"rms_norm_eps": "tiny"})
    with pytest.raises(FormatError) as caught:
        apply_to_gguf(base, delta, tmp_path / "m.gguf")
    message = str(caught.value)
    assert str(delta / "files" / "config.json") in message and "rms_norm_eps" in message, message
    assert "deltakit-" not in message and "model-files" not in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-delta"]


def test_a_dry_run_and_the_check_refuse_what_the_real_run_refuses(models, tmp_path):
    _, base, target = models
    delta = bad_delta(models, tmp_path, {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedInputError, match="'GPT2LMHeadModel' is not LLaMA"):
        library.check_gguf(base, delta=delta)
    out = tmp_path / "m.gguf"
    done = deltakit_cli("apply", "--base", base, "--delta", delta, "--out", out, "--to", "gguf", "--dry-run")
    assert done.returncode == 1 and "GPT2LMHeadModel" in done.stderr and "model-files" not in done.stderr
    make_delta(base, target, tmp_path / "good-delta")
    done = deltakit_cli(
        "apply", "--base", base, "--delta", tmp_path / "good-delta", "--out", out, "--to", "gguf", "--dry-run"
    )
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing written" in done.stdout + done.stderr
    checked = library.check_gguf(target, quant="q8_0")
    assert checked.tensors == 21 and checked.types == {"F32": 5, "Q8_0": 16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-delta", "good-delta"]


def test_a_service_refuses_a_gguf_job_it_cannot_carry_out_with_422(models, tmp_path):
    from conftest import register_for_service
    from test_service import LiveServer, client

    from deltakit_service.settings import Settings

    _, base, target = models
    root = tmp_path / "home"
    shutil.copytree(base, root / "data" / "llama-tiny")
    bad = altered(target, root / "data" / "gpt-tiny", config={"architectures": ["GPT2LMHeadModel"]})
    make_delta(root / "data" / "llama-tiny", bad, root / "data" / "gpt-delta")
    token = register_for_service(root, llama_tiny=root / "data" / "llama-tiny", gpt_tiny=bad,
                                 gpt_delta=root / "data" / "gpt-delta")  # fmt: skip
    with LiveServer(Settings(home=root)) as url, client(url, token) as http:
        for request in (
            {"kind": "apply", "base": "llama-tiny", "delta": "gpt-delta", "output": "x", "to": "gguf"},
            {"kind": "convert", "model": "gpt-tiny", "output": "y"},
        ):
            refused = http.post("/v1/jobs", json=request)
            assert refused.status_code == 422, refused.text
            body = refused.json()
            assert body["type"] == "UnsupportedInputError" and "GPT2LMHeadModel" in body["detail"], body
            assert str(root) not in body["detail"], body
        assert http.get("/v1/jobs").json() == []


def test_check_gguf_refuses_like_the_real_run(models, tmp_path):
    _, _, target = models
    source = altered(target, tmp_path / "model", config={"rope_theta": "x"})
    with pytest.raises(DeltakitError, match="rope_theta"):
        library.check_gguf(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
