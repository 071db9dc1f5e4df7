"""Benchmark GGUF output against llama.cpp's own path, on a LLaMA-shaped fp16 model (about 1.9 GB by default).

Side by side, in one run, each command in its own process from a warm page cache (wall time, peak RSS):

- convert to f16 and to q8_0: ``deltakit convert --to gguf`` against llama.cpp's ``convert_hf_to_gguf.py``;
- a delta rebuilt to GGUF: ``deltakit apply --to gguf --quant q8_0|q4_0`` against the three steps a user
  takes without it: ``deltakit apply`` to a model folder, llama.cpp's converter to f16, llama.cpp's
  quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) to the type.

llama.cpp comes from the source distribution of llama-cpp-python, built once by tests/llamacpp.py (cached).
The model is ``deltakit.examples.write_llama_pair``'s fine-tune-like pair with a small SentencePiece
tokenizer trained here (the GGUF pads its vocabulary to the model's 32000 rows, as llama.cpp does).

Usage::

    .venv/bin/python benchmarks/to_gguf.py                  # full size; writes BENCHMARKS.md and JSON
    .venv/bin/python benchmarks/to_gguf.py --layers 2 --hidden 256 --intermediate 688 --vocab 4000 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    LLAMA_1_9GB,
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

from deltakit.examples import LlamaShape  # noqa: E402

SECTION_BEGIN = "<!-- benchmarks/to_gguf.py: begin -->"
SECTION_END = "<!-- benchmarks/to_gguf.py: end -->"


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


def jobs(bench: Bench, base: Path, target: Path, delta: Path) -> list[Job]:
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
    return found


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
    by = {s.name.split(": ", 1)[0]: [] for s in steps}
    for s in steps:
        by[s.name.split(": ", 1)[0]].append(s)
    lines = []
    for group, (ours, theirs) in by.items():
        lines.append(
            f"- {group}: deltakit {ours.wall_s:.2f} s against llama.cpp's path {theirs.wall_s:.2f} s "
            f"(**{ours.wall_s / theirs.wall_s:.2f}x** the time); peak RSS {ours.peak_rss_bytes / (1 << 20):.0f} MiB "
            f"against {theirs.peak_rss_bytes / (1 << 20):.0f} MiB ({ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}x)."
        )
    return lines


def markdown(steps: Sequence[Step], info: dict[str, object], shape: LlamaShape, model_bytes: int) -> str:
    m = info["machine"]
    assert isinstance(m, dict)
    runs = "; ".join(f"{s.name} {', '.join(f'{t:.2f}' for t in s.runs_s)}" for s in steps)
    machine_line = (
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, deltakit {m['deltakit']} ({m['deltakit_source']}); "
        f"llama.cpp from llama-cpp-python {llamacpp.VERSION}'s source distribution."
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(p, LLAMA_1_9GB)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "gguf")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "to_gguf.json")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    shape = shape_from(args)
    llama = llamacpp.build()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    try:
        pair = write_pair_and_delta(args.work, shape, tokenizer=True)
        model_bytes = pair.target_bytes
        steps = measure(jobs(Bench(args.work, llama), pair.base, pair.target, pair.delta), args.repeat)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/to_gguf.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(("deltakit",)),
        "repeat": args.repeat,
        "shape": asdict(shape),
        "model_bytes": model_bytes,
    }
    print(table(steps))
    print("\n".join(ratios(steps)).replace("**", ""))
    if not args.no_record:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info | {"steps": [asdict(s) for s in steps]}, indent=2) + "\n")
        record(args.markdown, markdown(steps, info, shape, model_bytes), SECTION_BEGIN, SECTION_END)
        print(f"\nrecorded in {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
