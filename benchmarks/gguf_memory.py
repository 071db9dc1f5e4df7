"""Peak memory of GGUF output on a 7B-shaped model: ``deltakit convert --to gguf`` and ``deltakit apply --to
gguf`` (q8_0), once each, wall time and peak RSS, on a pair too large to time every step of on this disk.

Usage::

    .venv/bin/python benchmarks/gguf_memory.py             # 7B-shaped (13.5 GB a side); writes BENCHMARKS.md
    .venv/bin/python benchmarks/gguf_memory.py --hidden 256 --layers 2 --intermediate 688 --heads 4 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from common import LLAMA_7B, add_shape_arguments, machine, record, run_cli, settle, shape_from, write_pair_and_delta

ROOT = Path(__file__).resolve().parent.parent

MIB = 1 << 20
SECTION_BEGIN = "<!-- benchmarks/gguf_memory.py: begin -->"
SECTION_END = "<!-- benchmarks/gguf_memory.py: end -->"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(p, LLAMA_7B)
    p.add_argument("--quant", default="q8_0")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "gguf-memory")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    shape = shape_from(args)
    shutil.rmtree(args.work, ignore_errors=True)
    logs = args.work / "logs"
    logs.mkdir(parents=True)
    try:
        pair = write_pair_and_delta(args.work, shape, tokenizer=True)
        base, target, delta, generated, model = pair.base, pair.target, pair.delta, pair.generate_s, pair.target_bytes
        out = args.work / "out.gguf"
        rows = []
        for name, command, inputs in (
            ("convert --to gguf", ["convert", str(target), "--to", "gguf"], sorted(target.glob("*.safetensors"))),
            (
                "apply --to gguf",
                ["apply", "--base", str(base), "--delta", str(delta), "--to", "gguf"],
                sorted(base.glob("*.safetensors")) + sorted(delta.glob("*.safetensors")),
            ),
        ):
            out.unlink(missing_ok=True)
            settle(inputs)
            seconds, rss = run_cli([*command, "--quant", args.quant, "--out", str(out), "--quiet"], logs / "x.log")
            rows.append((name, seconds, rss, out.stat().st_size))
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    m = machine(("deltakit",))
    worst = max(r for _, _, r, _ in rows)
    command = " ".join(["python", "benchmarks/gguf_memory.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        SECTION_BEGIN,
        f"## memory: GGUF output ({args.quant}) of a 7B-shaped model",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} with `{command}` "
        f"({m['cpus']} CPUs, {m['ram_gib']} GiB RAM; deltakit {m['deltakit_source']}).",
        "",
        f"- Model: hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, vocab "
        f"{shape.vocab} (+256 rows), fp16: {model / 1e9:.2f} GB a side; generated in {generated:.0f} s.",
        "",
        "| step | wall s | peak RSS MiB | GGUF GB |",
        "|---|---:|---:|---:|",
        *(f"| `deltakit {n}` | {s:.1f} | {r / MIB:.0f} | {b / 1e9:.2f} |" for n, s, r, b in rows),
        "",
        f"- Peak RSS under 1 GiB: **{'met' if worst < 1 << 30 else 'not met'}** (at most {worst / MIB:.0f} MiB). "
        "apply holds each tensor whole, checked, before converting it: the largest, the embedding with its "
        f"grown vocabulary, is {(shape.vocab + 256) * shape.hidden * 2 / 1e6:.0f} MB here.",
        "",
        "One run each, from a page cache holding as much of the inputs as fits; each command is its own process "
        "and its peak RSS is `ru_maxrss` (the page cache is not part of it).",
        SECTION_END,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(args.markdown, text, SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
