"""Benchmark ``deltakit make`` and ``deltakit apply`` on a LLaMA-shaped fp16 checkpoint (about 1.9 GB by default),
with the raw (format 1) and the compressed (format 2) payload side by side.

Measures each command's wall time and peak RSS, and their ratios to I/O floors timed in the same run.

Each command runs as its own process through the real CLI. An I/O floor is a plain one-thread copy: read
every input safetensors file once and write as many bytes as the step writes, fsynced. Every timed step
starts after ``sync`` and a read of its inputs (warm cache); the steps of a group alternate, round by round.

Usage::

    .venv/bin/python benchmarks/apply.py                      # full size; writes BENCHMARKS.md and JSON
    .venv/bin/python benchmarks/apply.py --layers 2 --hidden 256 --intermediate 688 --vocab 4000 --no-record
    .venv/bin/python benchmarks/apply.py --memory-only --hidden 4096 --layers 32 --intermediate 11008 --heads 32 \\
        --noise 1.6e-5                                        # 7B-shaped, 13.5 GB a side: make and apply RSS
    .venv/bin/python benchmarks/apply.py --render             # BENCHMARKS.md again from the recorded JSON

The command line is here; measuring is apply_measure.py, the figures apply_results.py, the text apply_report.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from apply_measure import benchmark, io_floor, measure_memory
from apply_report import (
    MEMORY_BEGIN,
    MEMORY_END,
    SECTION_BEGIN,
    SECTION_END,
    cold_lines,
    markdown,
    memory_markdown,
    table,
    verdicts,
)
from apply_results import load_results
from common import ROOT, StepFailed, record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=ROOT / "benchmarks" / "work" / "apply", help="scratch folder (must be empty)"
    )
    p.add_argument("--keep", action="store_true", help="keep the models, delta and output in --work")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--extra-vocab", type=int, default=256, help="rows the fine-tune adds to the vocabulary")
    p.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=[1.6e-5, 1e-3],
        help="the fine-tune's noise, one pair each: 1.6e-5 moves weights like a real fine-tune, 1e-3 is noise",
    )
    p.add_argument("--input-shard-size", type=int, default=1_000_000_000, help="bytes per input safetensors file")
    p.add_argument("--repeat", type=int, default=5, help="timed apply rounds (floor, format 1, format 2); best of each")
    p.add_argument("--make-repeat", type=int, default=2, help="timed make rounds (floor, format 1, format 2)")
    p.add_argument(
        "--read-limit",
        type=int,
        nargs="*",
        default=[500_000_000, 1_000_000_000],
        help="bytes/s: also apply from a cold cache with disk reads limited to each (root, cgroup v1 blkio)",
    )
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="where to record the results")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "apply.json")
    p.add_argument("--no-record", action="store_true", help="print only; write neither BENCHMARKS.md nor JSON")
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: render BENCHMARKS.md again from the figures in --json (after a change to the text)",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="make and apply (format 2) once each, for wall time and peak RSS: for a 7B shape on a small disk",
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--io-floor"]:  # a cold run's floor, in its own process: DEST BYTES SOURCE...
        seconds, _ = io_floor([Path(p) for p in argv[3:]], int(argv[2]), Path(argv[1]))
        print(f"{seconds:.4f}")
        return 0
    args = parse_args(argv)
    if args.render:
        record(args.markdown, markdown(load_results(args.json)), SECTION_BEGIN, SECTION_END)
        print(f"rendered {args.markdown} from {args.json}")
        return 0
    work: Path = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        print(f"{work} is not empty; remove it or pass another --work", file=sys.stderr)
        return 2
    if args.memory_only:
        try:
            section = memory_markdown(measure_memory(args, work))
        except StepFailed as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 1
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(section)
        if not args.no_record:
            record(args.markdown, section, MEMORY_BEGIN, MEMORY_END)
        return 0
    runs = []
    for index, noise in enumerate(args.noise):
        folder = work / f"pair-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            runs.append(benchmark(args, folder, noise))
        except StepFailed as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 1
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        print(f"noise {noise:g}")
        print(table(runs[-1]))
        print("\n".join(verdicts(runs[-1])).replace("**", ""))
        print("\n".join(cold_lines(runs[-1])).replace("**", ""))
        print(runs[-1].decode_gbps, end="\n\n")
    if not args.no_record:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("[\n" + ",\n".join(r.to_json().rstrip() for r in runs) + "\n]\n", encoding="utf-8")
        record(args.markdown, markdown(runs), SECTION_BEGIN, SECTION_END)
        print(f"recorded in {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
