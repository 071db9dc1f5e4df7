"""LoRA adapters merged by deltakit match peft's merge_and_unload on the same inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_checkpoint
from test_cli import deltakit_cli

from deltakit import UnsupportedInputError
from deltakit.adapters import merge_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, vocab: int = 100) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(torch.float16)


def lora(model: torch.nn.Module, seed: int, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))


def assert_within_one_rounding(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    exact = total = 0
    for name, ref in reference.items():
        got = ours[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        # peft rounds the update to fp16 before adding; deltakit adds in fp32 and rounds once
        eps = torch.finfo(ref.dtype).eps
        assert torch.allclose(got.float(), ref.float(), rtol=eps, atol=eps * 1e-2), name
        exact += int((got.view(torch.int16) == ref.view(torch.int16)).sum())
        total += ref.numel()
    assert exact / total > 0.9, f"only {exact}/{total} elements are bit-identical"


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_merge_matches_peft_with_resized_vocab_rslora_and_modules_to_save(tmp_path):
    base = tiny_llama()
    base_dir = save(base, tmp_path / "base")
    base.resize_token_embeddings(120, mean_resizing=False)  # as Chinese-LLaMA grows LLaMA's vocabulary
    model = lora(
        base,
        1,
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    )
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"note": "extended"}')
    reference = model.merge_and_unload().state_dict()

    report = merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    assert_within_one_rounding(load_checkpoint(tmp_path / "out"), reference)
    assert "model.layers.1.mlp.down_proj.weight" in report.merged
    assert "model.embed_tokens.weight" in report.merged and "lm_head.weight" in report.replaced
    assert report.vocab_size == 120
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 120
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"note": "extended"}'
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float16)
    assert loaded.get_input_embeddings().weight.shape == (120, 32)


def test_stacked_adapters_match_sequential_peft_merges_in_fp32(tmp_path):
    base = tiny_llama(seed=3)
    base_dir = save(base, tmp_path / "base")
    lora(tiny_llama(seed=3), 4, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]).save_pretrained(tmp_path / "a")
    second = lora(
        tiny_llama(seed=3), 5, r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], rank_pattern={"o_proj": 4}
    )
    second.save_pretrained(tmp_path / "b")
    # the reference: peft merging one adapter after the other in fp32, rounded to fp16 once at the end,
    # which is what deltakit computes; merging in fp16 would round after every step
    merged = tiny_llama(seed=3).float()
    for adapter in ("a", "b"):
        merged = peft.PeftModel.from_pretrained(merged, tmp_path / adapter).merge_and_unload()
    reference = {k: v.half() for k, v in merged.state_dict().items()}

    result = deltakit_cli(
        "apply",
        "--base",
        base_dir,
        "--delta",
        tmp_path / "a",
        "--delta",
        tmp_path / "b",
        "--out",
        tmp_path / "out",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "merged a, b" in result.stdout
    assert_within_one_rounding(load_checkpoint(tmp_path / "out"), reference)


def test_fan_in_fan_out_layers_match_peft(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).to(torch.float16)
    base_dir = save(base, tmp_path / "base")
    model = lora(base, 2, r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    model.save_pretrained(tmp_path / "adapter")
    reference = model.merge_and_unload().state_dict()

    merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    ours = load_checkpoint(tmp_path / "out")
    reference = {k: v for k, v in reference.items() if k in ours}  # tied lm_head is not saved twice
    assert_within_one_rounding(ours, reference)


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    llama = lora(tiny_llama(), 1, r=2, lora_alpha=2, target_modules=["q_proj"])
    llama.save_pretrained(tmp_path / "adapter")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    gpt2_dir = save(gpt2, tmp_path / "gpt2")
    with pytest.raises(UnsupportedInputError, match="which the base lacks: it was made for another architecture"):
        merge_adapters(gpt2_dir, [tmp_path / "adapter"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_vocabulary_is_refused(tmp_path):
    base_dir = save(tiny_llama(vocab=100), tmp_path / "base")
    bigger = tiny_llama(vocab=130)
    model = lora(bigger, 1, r=2, lora_alpha=2, target_modules=["embed_tokens"])
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    with pytest.raises(UnsupportedInputError, match=r"'model\.embed_tokens\.weight' is F16 \[100, 32\]"):
        merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")
    result = deltakit_cli("apply", "--base", base_dir, "--delta", tmp_path / "adapter", "--out", tmp_path / "o")
    assert result.returncode == 1 and "another architecture or vocabulary" in result.stderr


def _adapter_with(tmp_path: Path, **edits: object) -> tuple[Path, Path]:
    base_dir = save(tiny_llama(), tmp_path / "base")
    lora(tiny_llama(), 1, r=2, lora_alpha=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(edits)
    config_path.write_text(json.dumps(config))
    return base_dir, tmp_path / "adapter"


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": 1e300}, "lora_alpha must be a finite number"),
        ({"lora_alpha": "4"}, "lora_alpha must be a finite number"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": float("-inf")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
        ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern key 'q_proj\(' is not a regular expression .*missing \)"),
        ({"rank_pattern": [1]}, "rank_pattern must be an object"),
    ],
)
def test_adapter_configs_peft_would_refuse_are_named_errors(tmp_path, edits, message):
    from deltakit import FormatError

    base_dir, adapter = _adapter_with(tmp_path, **edits)
    with pytest.raises(FormatError, match=message) as caught:
        merge_adapters(base_dir, [adapter], tmp_path / "out")
    assert caught.value.path == adapter / "adapter_config.json"
    assert not (tmp_path / "out").exists()


def test_a_backtracking_rank_pattern_is_matched_in_linear_time(tmp_path):
    """``(q+)+x`` against a long run of q takes Python's re some 2**5000 steps; RE2 does not backtrack.
    The match runs in a child process, so that a regression hangs only until the timeout."""
    import subprocess
    import sys

    base_dir, adapter = _adapter_with(tmp_path, rank_pattern={"(q+)+x": 8, "q_proj": 2})
    code = (
        "import json, sys; from pathlib import Path; from deltakit.formats.peft import _Ranks\n"
        "path = Path(sys.argv[1]); ranks = _Ranks.from_config(json.loads(path.read_text()), path)\n"
        "print(ranks.of('model.layers.0.' + 'q' * 5000 + 'y'), ranks.of('model.layers.0.qqqx'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(adapter / "adapter_config.json")], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["(2,", "4.0)", "(8,", "4.0)"], result.stderr
    merge_adapters(base_dir, [adapter], tmp_path / "out")  # the real adapter still merges, q_proj at rank 2


def test_lora_weights_that_overflow_the_model_dtype_are_a_named_error(tmp_path):
    base_dir, adapter = _adapter_with(tmp_path, lora_alpha=1e6)  # fp16 holds at most 65504
    from deltakit import FormatError

    with pytest.raises(FormatError, match="gives infinite or NaN weights") as caught:
        merge_adapters(base_dir, [adapter], tmp_path / "out")
    assert caught.value.tensor and "q_proj" in caught.value.tensor
    assert not (tmp_path / "out").exists()


def test_a_malformed_config_json_is_a_named_error(tmp_path):
    """The merged model's config.json is read to follow a grown embedding: a malformed one is a
    FormatError naming the file (it was an uncaught JSONDecodeError, an "internal error" in the CLI)."""
    from deltakit import FormatError

    base_dir, adapter = _adapter_with(tmp_path)
    (base_dir / "config.json").write_text('{"vocab_size": 100,')
    with pytest.raises(FormatError, match=r"config\.json: cannot read") as caught:
        merge_adapters(base_dir, [adapter], tmp_path / "out")
    assert caught.value.path == base_dir / "config.json"
    assert not (tmp_path / "out").exists()
    result = deltakit_cli("apply", "--base", base_dir, "--delta", adapter, "--out", tmp_path / "o")
    assert result.returncode == 1 and "internal error" not in result.stderr and "config.json" in result.stderr


# Today's families, in bf16 as they ship: Qwen2 (q/k/v biases), Llama 3 (GQA, llama3 rope scaling);
# tied embeddings as in Qwen2.5 0.5B and Llama 3.2 1B/3B (no lm_head tensor in the file).
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_family(family: str, *, tied: bool, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    sizes = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
    }
    if family == "qwen2":
        config, model_class = transformers.Qwen2Config(**sizes), transformers.Qwen2ForCausalLM
    else:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        config = transformers.LlamaConfig(
            **sizes,
            max_position_embeddings=512,
            rope_scaling={**rope, "original_max_position_embeddings": 128, "rope_theta": 500000.0},
        )
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # transformers starts biases at zero; a trained Qwen2's are not
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def merged_in_fp32(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """peft's merge of ``model`` done in fp32 and rounded to ``dtype`` once, which is what deltakit
    computes. peft merging in bf16 rounds the update to bf16 before adding it, which is far from one
    rounding where the update cancels the weight (a weight of -0.0034 moved to -7e-6 comes out 0)."""
    return {k: v.to(dtype) for k, v in model.float().merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_qwen2_and_llama3_adapters_match_peft_in_bf16(tmp_path, family, tied):
    base = tiny_family(family, tied=tied)
    base_dir = save(base, tmp_path / "base")
    assert ("lm_head.weight" in load_checkpoint(base_dir)) is not tied
    model = lora(base, 2, r=4, lora_alpha=8, target_modules=[*ATTENTION_AND_MLP, "embed_tokens"])
    model.save_pretrained(tmp_path / "adapter")
    reference = merged_in_fp32(model)

    report = merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    ours = load_checkpoint(tmp_path / "out")
    if tied:  # one tensor, saved once: the merged embedding is the head
        assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])
    assert_within_one_rounding(ours, reference)
    assert len(report.merged) == 1 + 2 * len(ATTENTION_AND_MLP) and not report.untied
    assert report.replaced == ("model.embed_tokens.weight",)  # peft saves a LoRA'd embedding whole too
    if family == "qwen2":
        assert torch.equal(
            ours["model.layers.1.self_attn.k_proj.bias"], base.state_dict()["model.layers.1.self_attn.k_proj.bias"]
        )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == json.loads((base_dir / "config.json").read_text())


def test_a_grown_vocabulary_on_a_tied_model_grows_the_one_embedding(tmp_path):
    base = tiny_family("qwen2", tied=True)
    base_dir = save(base, tmp_path / "base")
    base.resize_token_embeddings(120, mean_resizing=False)  # the head follows: it is the embedding
    model = lora(base, 3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.save_pretrained(tmp_path / "adapter")
    reference = merged_in_fp32(model)
    assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])

    report = merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    assert_within_one_rounding(load_checkpoint(tmp_path / "out"), reference)
    assert report.vocab_size == 120 and not report.untied
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 120 and config["tie_word_embeddings"] is True


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_modules_to_save_lm_head_on_a_tied_model_unties_it_as_peft_does(tmp_path, family):
    base = tiny_family(family, tied=True, seed=4)
    base_dir = save(base, tmp_path / "base")
    model = lora(base, 5, r=4, lora_alpha=8, target_modules=ATTENTION_AND_MLP, modules_to_save=["lm_head"])
    with torch.no_grad():  # as training moves the head's own copy away from the embedding
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(torch.randn_like(head) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    reference = merged_in_fp32(model)
    assert not torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])

    result = deltakit_cli("apply", "--base", base_dir, "--delta", tmp_path / "adapter", "--out", tmp_path / "out", "-q")

    assert result.returncode == 0, result.stderr
    assert "tie_word_embeddings set to false" in result.stdout
    ours = load_checkpoint(tmp_path / "out")
    assert_within_one_rounding(ours, reference)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.equal(loaded.get_output_embeddings().weight, ours["lm_head.weight"])  # not tied back


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_lora_on_a_tied_head_moves_the_embedding_as_peft_does(tmp_path, family):
    """peft merges a LoRA on the head of a tied model into the one tensor the head and the embedding
    share: the merged model stays tied, its embedding moved by the head's update."""
    base = tiny_family(family, tied=True, seed=8)
    base_dir = save(base, tmp_path / "base")
    model = lora(base, 9, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    model.save_pretrained(tmp_path / "adapter")
    reference = merged_in_fp32(model)
    assert torch.equal(reference.pop("lm_head.weight"), reference["model.embed_tokens.weight"])

    report = merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    ours = load_checkpoint(tmp_path / "out")
    assert_within_one_rounding(ours, reference)
    assert "model.embed_tokens.weight" in report.merged and report.replaced == () and not report.untied
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_a_whole_lm_head_for_a_base_that_unties_it_elsewhere_is_still_refused(tmp_path):
    """A base without lm_head whose config says it is untied is another architecture's model."""
    base = tiny_family("qwen2", tied=True)
    base_dir = save(base, tmp_path / "base")
    lora(base, 5, r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"]).save_pretrained(
        tmp_path / "adapter"
    )
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(UnsupportedInputError, match=r"'lm_head\.weight', which the base lacks"):
        merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")


def test_lora_bias_on_qwen2s_qkv_biases_matches_peft(tmp_path):
    """peft's ``lora_bias``: lora_B carries a bias, and the merge moves the layer's bias by
    ``scale * lora_B.bias``, here Qwen2's q/k/v biases."""
    base = tiny_family("qwen2", tied=True, seed=6)
    base_dir = save(base, tmp_path / "base")
    model = lora(base, 7, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    with torch.no_grad():  # peft starts lora_B's bias at zero even without init_lora_weights
        for name, p in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "adapter")
    reference = merged_in_fp32(model)
    reference.pop("lm_head.weight")

    report = merge_adapters(base_dir, [tmp_path / "adapter"], tmp_path / "out")

    ours = load_checkpoint(tmp_path / "out")
    assert_within_one_rounding(ours, reference)
    assert "model.layers.1.self_attn.v_proj.bias" in report.merged
    bias = "model.layers.0.self_attn.k_proj.bias"
    assert not torch.equal(ours[bias], base.state_dict()[bias])
    from deltakit.inspection import inspect_path

    listed = {t.name for t in inspect_path(tmp_path / "adapter").tensors}
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_B.bias" in listed
