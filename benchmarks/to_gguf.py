"""Benchmark GGUF output against llama.cpp's own path, on a LLaMA-shaped fp16 model (about 1.9 GB by default),
or with ``--family llama3 qwen2`` on a Llama 3-shaped and a Qwen2-shaped bf16 model (about 0.6 GB each).

Side by side, in one run, each command in its own process from a warm page cache (wall time, peak RSS):

- convert to f16 and to q8_0: ``deltakit convert --to gguf`` against llama.cpp's ``convert_hf_to_gguf.py``;
- a delta rebuilt to GGUF: ``deltakit apply --to gguf --quant q8_0|q4_0`` against the three steps a user
  takes without it: ``deltakit apply`` to a model folder, llama.cpp's converter to f16, llama.cpp's
  quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) to the type.

llama.cpp comes from the source distribution of llama-cpp-python, built once by tests/llamacpp.py (cached).
The LLaMA model is ``deltakit.examples.write_llama_pair``'s fine-tune-like pair with a small SentencePiece
tokenizer trained here (the GGUF pads its vocabulary to the model's 32000 rows, as llama.cpp does). The
Llama 3 and Qwen2 models are the slow tests' (tests/tinyllama3.py, tests/tinyqwen.py) at the sizes of
FAMILY_SHAPES, with the families' real tokenizers (Llama 3's 128256 ids and 280k merges, Qwen's 151643
ranks padded to 151936 rows), and a fine-tune of each that moves every weight.

Usage::

    .venv/bin/python benchmarks/to_gguf.py                  # full size; writes BENCHMARKS.md and JSON
    .venv/bin/python benchmarks/to_gguf.py --layers 2 --hidden 256 --intermediate 688 --vocab 4000 --no-record
    .venv/bin/python benchmarks/to_gguf.py --family llama3 qwen2   # its own section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    LLAMA_1_9GB,
    Pair,
    add_shape_arguments,
    machine,
    record,
    run_cli,
    run_process,
    settle,
    shape_from,
    write_pair_and_delta,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import llamacpp  # noqa: E402 - tests/llamacpp.py builds and caches llama.cpp
from tinyllama import write_finetune  # noqa: E402
from tinyllama3 import write_tiny_llama3  # noqa: E402
from tinyqwen import write_tiny_qwen  # noqa: E402

from deltakit.examples import LlamaShape  # noqa: E402

SECTION_BEGIN = "<!-- benchmarks/to_gguf.py: begin -->"
SECTION_END = "<!-- benchmarks/to_gguf.py: end -->"
FAMILIES_BEGIN = "<!-- benchmarks/to_gguf.py --family: begin -->"
FAMILIES_END = "<!-- benchmarks/to_gguf.py --family: end -->"
# Llama 3.1 8B's proportions (GQA 4:1, its rope scaling, an untied head) and Qwen2.5 0.5B's (hidden 896, 14
# heads over 2 KV heads, q/k/v biases, a tied head) with fewer layers: the vocabulary, which every real
# model of the family carries whole, is most of each file, as it is in the 1B-class models of both.
FAMILY_SHAPES: dict[str, dict[str, int]] = {
    "llama3": {"hidden": 1024, "layers": 4, "intermediate": 3584, "heads": 8, "kv_heads": 2},
    "qwen2": {"hidden": 896, "layers": 8, "intermediate": 4864, "heads": 14, "kv_heads": 2},
}
FAMILY_TITLES = {"llama": "LLaMA", "llama3": "Llama 3", "qwen2": "Qwen2"}


@dataclass
class Step:
    name: str
    wall_s: float
    peak_rss_bytes: int
    output_bytes: int
    runs_s: list[float]


def run_python(args: Sequence[str], log: Path, env: dict[str, str]) -> tuple[float, int]:
    """``python ARGS`` in its own process: (wall seconds, peak RSS bytes)."""
    return run_process([sys.executable, *args], log, env=env)


class Bench:
    def __init__(self, work: Path, llama: llamacpp.LlamaCpp) -> None:
        self.work, self.llama, self.logs = work, llama, work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = llama.env()

    def deltakit(self, tag: str, args: list[str]) -> tuple[float, int]:
        return run_cli(args, self.logs / f"{tag}.log")

    def converter(self, tag: str, model: Path, out: Path, outtype: str) -> tuple[float, int]:
        script = str(self.llama.source / "convert_hf_to_gguf.py")
        args = [script, str(model), "--outfile", str(out), "--outtype", outtype]
        return run_python(args, self.logs / f"{tag}.log", self.env)

    def quantizer(self, tag: str, source: Path, out: Path, quant: str) -> tuple[float, int]:
        code = (
            "import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{quant.upper()}\n"
            "p.nthread = 0\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
        )
        return run_python(["-c", code, str(source), str(out)], self.logs / f"{tag}.log", self.env)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Part:
    """One process of a job: what it writes, and how to run it (returns wall seconds and peak RSS)."""

    output: Path
    run: Callable[[str], tuple[float, int]]  # log tag -> (seconds, RSS)


@dataclass
class Job:
    name: str
    warm: list[Path]  # read before each run, so every run starts from a page cache holding its inputs
    parts: list[Part]  # run in order; times add, the highest RSS counts


def jobs(bench: Bench, base: Path, target: Path, delta: Path, label: str = "") -> list[Job]:
    """The jobs on one model; ``label`` (a family's title) prefixes their names where several families run."""
    out = bench.work / "out"
    out.mkdir(exist_ok=True)
    model_files = sorted(target.glob("*.safetensors"))
    apply_inputs = sorted(base.glob("*.safetensors")) + sorted(delta.glob("*.safetensors"))

    def deltakit(output: Path, *args: str) -> Part:
        return Part(output, lambda tag: bench.deltakit(tag, [*args, "--out", str(output), "--quiet"]))

    def converter(model: Path, output: Path, outtype: str) -> Part:
        return Part(output, lambda tag: bench.converter(tag, model, output, outtype))

    def quantizer(source: Path, output: Path, quant: str) -> Part:
        return Part(output, lambda tag: bench.quantizer(tag, source, output, quant))

    found: list[Job] = []
    for quant in ("f16", "q8_0"):
        ours = deltakit(out / f"convert-{quant}.gguf", "convert", str(target), "--to", "gguf", "--quant", quant)
        theirs = converter(target, out / f"llama-{quant}.gguf", quant)
        found.append(Job(f"convert to {quant}: deltakit convert --to gguf", model_files, [ours]))
        found.append(Job(f"convert to {quant}: llama.cpp convert_hf_to_gguf.py", model_files, [theirs]))
    apply = ("apply", "--base", str(base), "--delta", str(delta))
    for quant in ("q8_0", "q4_0"):
        ours = deltakit(out / f"apply-{quant}.gguf", *apply, "--to", "gguf", "--quant", quant)
        folder, f16 = out / "rebuilt", out / "rebuilt-f16.gguf"
        three = [deltakit(folder, *apply), converter(folder, f16, "f16"), quantizer(f16, out / f"{quant}.gguf", quant)]
        found.append(Job(f"apply to {quant}: deltakit apply --to gguf", apply_inputs, [ours]))
        found.append(Job(f"apply to {quant}: apply, convert_hf_to_gguf.py (f16), llama-quantize", apply_inputs, three))
    for job in found:
        job.name = f"{label}: {job.name}" if label else job.name
    return found


def write_family_pair(work: Path, family: str) -> Pair:
    """A ``family``-shaped base (FAMILY_SHAPES) with its real tokenizer, a fine-tune of it, and the delta."""
    start = time.perf_counter()
    shape = FAMILY_SHAPES[family]
    base = work / "pair" / f"{family}-base"
    if family == "llama3":
        write_tiny_llama3(base, **shape, seed=1)
    else:
        write_tiny_qwen(base, **shape, seed=1)
    target = write_finetune(base, work / "pair" / f"{family}-tuned")
    generate_s = time.perf_counter() - start
    delta = work / f"{family}-delta"
    command = [sys.executable, "-m", "deltakit.cli", "make", "--base", str(base), "--target", str(target)]
    subprocess.run([*command, "--out", str(delta), "--quiet"], check=True, capture_output=True)
    return Pair(base, target, delta, generate_s)


def measure(all_jobs: list[Job], repeat: int) -> list[Step]:
    """Every job ``repeat`` times, interleaved round by round; the best time and the highest RSS count."""
    runs: dict[str, list[tuple[float, int, int]]] = {job.name: [] for job in all_jobs}
    for round_ in range(repeat):
        for index, job in enumerate(all_jobs):
            for part in job.parts:
                remove(part.output)
            settle(job.warm)
            total, rss = 0.0, 0
            for k, part in enumerate(job.parts):
                seconds, peak = part.run(f"job{index}-part{k}-round{round_}")
                total, rss = total + seconds, max(rss, peak)
            runs[job.name].append((total, rss, job.parts[-1].output.stat().st_size))
            for part in job.parts:
                remove(part.output)
    return [
        Step(name, min(t for t, _, _ in r), max(m for _, m, _ in r), r[0][2], [t for t, _, _ in r])
        for name, r in runs.items()
    ]


def table(steps: Sequence[Step]) -> str:
    lines = ["| step | wall s | peak RSS MiB | output GB |", "|---|---:|---:|---:|"]
    for step in steps:
        rss = step.peak_rss_bytes / (1 << 20)
        lines.append(f"| {step.name} | {step.wall_s:.2f} | {rss:.0f} | {step.output_bytes / 1e9:.3f} |")
    return "\n".join(lines)


def ratios(steps: Sequence[Step]) -> list[str]:
    by: dict[str, list[Step]] = {s.name.rsplit(": ", 1)[0]: [] for s in steps}
    for s in steps:
        by[s.name.rsplit(": ", 1)[0]].append(s)
    lines = []
    for group, (ours, theirs) in by.items():
        lines.append(
            f"- {group}: deltakit {ours.wall_s:.2f} s against llama.cpp's path {theirs.wall_s:.2f} s "
            f"(**{ours.wall_s / theirs.wall_s:.2f}x** the time); peak RSS {ours.peak_rss_bytes / (1 << 20):.0f} MiB "
            f"against {theirs.peak_rss_bytes / (1 << 20):.0f} MiB ({ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}x)."
        )
    return lines


def _machine_line(m: dict[str, object]) -> str:
    """The machine and versions a section's figures were measured with (both sections say it alike)."""
    return (
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, deltakit {m['deltakit']} ({m['deltakit_source']}); "
        f"llama.cpp from llama-cpp-python {llamacpp.VERSION}'s source distribution."
    )


def markdown(steps: Sequence[Step], info: dict[str, object], shape: LlamaShape, model_bytes: int) -> str:
    m = info["machine"]
    assert isinstance(m, dict)
    runs = "; ".join(f"{s.name} {', '.join(f'{t:.2f}' for t in s.runs_s)}" for s in steps)
    machine_line = _machine_line(m)
    model_line = (
        f"- Model: hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, "
        f"vocab {shape.vocab} (+256 rows in the fine-tune), fp16, {model_bytes / 1e9:.2f} GB; "
        "a SentencePiece tokenizer of 384 pieces."
    )
    how = (
        "The q4_0 files differ in size by the output projection, kept at Q8_0 by deltakit where llama.cpp's "
        "quantizer uses Q6_K, which only its C code makes (docs/GGUF.md). "
        "The tests check that the files are what llama.cpp writes (tests/test_gguf_llamacpp.py); here only "
        "time and memory are measured. Each command is its own process, started from a small launcher; its "
        "peak RSS is that process's `ru_maxrss` (for the three-step path, the highest of the three). Before "
        "each run, untimed: `sync` and a read of the job's inputs (a warm page cache, as after a download). "
        f"Jobs run interleaved, {info['repeat']} rounds; the best time counts. All timed runs, in seconds: "
        f"{runs}. The machine was shared with other work; every figure comes from this one run. Raw figures: "
        "`benchmarks/results/to_gguf.json`."
    )
    title = "## GGUF: deltakit against llama.cpp's own path"
    date = f"Measured {info['date']} with `{info['command']}`."
    body = [title, "", date, "", machine_line, model_line, "", table(steps), "", *ratios(steps), "", how]
    return "\n".join([SECTION_BEGIN, *body, SECTION_END]) + "\n"


def families_markdown(steps: Sequence[Step], info: dict[str, object], model_bytes: dict[str, int]) -> str:
    """The section of ``--family`` runs: several families, each deltakit's path against llama.cpp's."""
    m = info["machine"]
    assert isinstance(m, dict)
    runs = "; ".join(f"{s.name} {', '.join(f'{t:.2f}' for t in s.runs_s)}" for s in steps)
    machine_line = _machine_line(m)
    described = {
        "llama3": "Llama 3.1-shaped: vocab 128256 (Meta's tokenizer.json, 280k merges), llama3 rope scaling, "
        "an untied head",
        "qwen2": "Qwen2.5-shaped: vocab 151936 (Qwen's 151643 BPE ranks and 22 added tokens, padded), "
        "q/k/v biases, a tied head",
    }
    model_lines = []
    for family, size in model_bytes.items():
        shape = FAMILY_SHAPES[family]
        model_lines.append(
            f"- {FAMILY_TITLES[family]} model: {described[family]}; hidden {shape['hidden']}, {shape['layers']} "
            f"layers, intermediate {shape['intermediate']}, {shape['heads']} heads over {shape['kv_heads']} KV "
            f"heads, bf16, {size / 1e9:.2f} GB; the fine-tune moves every weight."
        )
    how = (
        "Each family's files are checked against llama.cpp's converter in the slow tests "
        "(tests/test_gguf_llama3.py, tests/test_gguf_qwen.py); here only time and memory are measured, as in "
        "the LLaMA section above: each command its own process, its peak RSS that process's `ru_maxrss` (the "
        "highest of the three for the three-step path), `sync` and a warm read of the inputs before each "
        f"run, jobs interleaved, {info['repeat']} rounds, the best time counts. All timed runs, in seconds: "
        f"{runs}. The machine was shared with other work; every figure comes from this one run. Raw figures: "
        "`benchmarks/results/to_gguf_families.json`."
    )
    title = "## GGUF for Llama 3 and Qwen2: deltakit against llama.cpp's own path"
    date = f"Measured {info['date']} with `{info['command']}`."
    body = [title, "", date, "", machine_line, *model_lines, "", table(steps), "", *ratios(steps), "", how]
    return "\n".join([FAMILIES_BEGIN, *body, FAMILIES_END]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(p, LLAMA_1_9GB)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "gguf")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "to_gguf.json")
    p.add_argument("--no-record", action="store_true")
    p.add_argument(
        "--family",
        nargs="+",
        choices=["llama", *FAMILY_SHAPES],
        default=["llama"],
        help="llama (the shape arguments); llama3, qwen2 (FAMILY_SHAPES): their own section, one run",
    )
    args = p.parse_args(argv)
    shape = shape_from(args)
    several = args.family != ["llama"]
    llama = llamacpp.build()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model_bytes: dict[str, int] = {}
    try:
        found: list[Job] = []
        for family in args.family:
            if family == "llama":
                pair = write_pair_and_delta(args.work, shape, tokenizer=True)
            else:
                pair = write_family_pair(args.work, family)
            model_bytes[family] = sum(f.stat().st_size for f in pair.target.glob("*.safetensors"))
            (args.work / family).mkdir(exist_ok=True)
            bench = Bench(args.work / family, llama) if several else Bench(args.work, llama)
            found += jobs(bench, pair.base, pair.target, pair.delta, FAMILY_TITLES[family] if several else "")
        steps = measure(found, args.repeat)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/to_gguf.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(("deltakit",)),
        "repeat": args.repeat,
        "shape": asdict(shape) if not several else {f: FAMILY_SHAPES.get(f) for f in args.family},
        "model_bytes": model_bytes["llama"] if not several else model_bytes,
    }
    print(table(steps))
    print("\n".join(ratios(steps)).replace("**", ""))
    if not args.no_record:
        json_path = args.json.with_name("to_gguf_families.json") if several else args.json
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(info | {"steps": [asdict(s) for s in steps]}, indent=2) + "\n")
        if several:
            record(args.markdown, families_markdown(steps, info, model_bytes), FAMILIES_BEGIN, FAMILIES_END)
        else:
            record(args.markdown, markdown(steps, info, shape, model_bytes["llama"]), SECTION_BEGIN, SECTION_END)
        print(f"\nrecorded in {args.markdown} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
