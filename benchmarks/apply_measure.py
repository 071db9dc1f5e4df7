"""Measuring make and apply for benchmarks/apply.py: the I/O floors, the interleaved warm rounds, the cold
throttled runs, and the ``--memory-only`` run; each returns the figures, rendering is apply_report's."""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from apply_results import APPLY, GIB, MAKE, MemoryRun, Results, Step
from common import READ_CHUNK, ROOT, decode_throughput, machine, run_cli, run_process, settle

from deltakit.engine import plan_apply
from deltakit.examples import LlamaShape, write_llama_pair
from deltakit.writing import DIRECT_ALIGN, set_direct, write_all

# The script that runs a cold run's I/O floor in its own process (``apply.py --io-floor``).
SCRIPT = Path(__file__).resolve().with_name("apply.py")
BLKIO = Path("/sys/fs/cgroup/blkio")

Run = tuple[float, int | None, int | None]  # (seconds, peak RSS, bytes read)
Job = Callable[[int], Run]  # round -> Run


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def io_floor(sources: Sequence[Path], write_bytes: int, dest: Path) -> tuple[float, int]:
    """Read every source once and write ``write_bytes`` to ``dest``, fsynced; returns (seconds, bytes read).

    A plain copy on one thread, reads and writes alternating: the bytes just read are written out until
    ``write_bytes`` have gone, and the last buffer is repeated if the sources run out first. Writes go with
    O_DIRECT where the filesystem takes it (the tail that is not a whole page the ordinary way), as apply's
    do: on this VM that writes about 3x faster than through the page cache, so the floor stays a floor.
    """
    buffer = mmap.mmap(-1, READ_CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    read = 0
    left = write_bytes
    start = time.perf_counter()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        direct = set_direct(fd, True)

        def write(k: int) -> None:
            nonlocal direct, left
            if direct and k % DIRECT_ALIGN:  # the tail: not a whole page
                direct = not set_direct(fd, False)
            write_all(fd, view[:k])
            left -= k

        for path in sources:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    read += n
                    if left:
                        write(min(n, left))
        while left:
            write(min(len(buffer), left))
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync(dest.parent)
    return time.perf_counter() - start, read


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def total_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def check_disk(work: Path, model_bytes: int) -> None:
    """Base, fine-tune, delta, output and floor file: about five model sizes, plus room."""
    need = 6 * model_bytes
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / GIB:.1f} GiB free, this run needs about {need / GIB:.1f} GiB")


def model_bytes(shape: LlamaShape, extra_vocab: int, dtype: torch.dtype) -> int:
    h, i, v = shape.hidden, shape.intermediate, shape.vocab + extra_vocab
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return (shape.layers * per_layer + 2 * v * h + h) * torch.empty(0, dtype=dtype).element_size()


def interleaved(jobs: dict[str, tuple[Sequence[Path], Job]], repeat: int) -> dict[str, list[Run]]:
    """Run every job once per round, ``repeat`` rounds, each from a settled page cache holding its inputs.

    Writes into the page cache of the VM this was written on are now and then several times slower, at
    random; interleaving the jobs and taking the best of each keeps that out of their ratios.
    """
    runs: dict[str, list[Run]] = {name: [] for name in jobs}
    for index in range(repeat):
        for name, (inputs, job) in jobs.items():
            settle(inputs)
            runs[name].append(job(index))
    return runs


def best(name: str, runs: list[tuple[float, int | None, int | None]], written: int | None) -> Step:
    rss = [r for _, r, _ in runs if r is not None]
    return Step(
        name, min(t for t, _, _ in runs), max(rss) if rss else None, runs[0][2], written, [t for t, _, _ in runs]
    )


def floor_job(sources: Sequence[Path], write_bytes: int, dest: Path) -> Job:
    def run(index: int) -> Run:
        seconds, read = io_floor(sources, write_bytes, dest)
        dest.unlink()
        return seconds, None, read

    return run


def cli_job(args: list[str], out: Path, logs: Path, tag: str) -> Job:
    def run(index: int) -> Run:
        if out.exists():
            shutil.rmtree(out)
        seconds, rss = run_cli([*args, "--out", str(out), "--quiet"], logs / f"{tag}-{index}.log")
        return seconds, rss, None

    return run


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def cold_runs(
    base: Path,
    tuned: Path,
    deltas: dict[int, Path],
    work: Path,
    limits: Sequence[int],
    repeat: int,
    logs: Path,
) -> dict[str, list[float]]:
    """apply (both formats), make (format 2) and make's I/O floor from a cold page cache, reads from disk
    throttled to each of ``limits`` bytes/s (a cgroup v1 blkio limit on the disk holding ``base``),
    interleaved: where reading, not the CPU, bounds the job.

    Needs root, cgroup v1 blkio and a writable /proc/sys/vm/drop_caches; returns nothing where they are not.
    """
    if not limits or not BLKIO.is_dir() or not drop_caches():
        return {}
    device = os.stat(base).st_dev
    group = BLKIO / f"deltakit-bench-{os.getpid()}"
    group.mkdir(exist_ok=True)
    out, made, floor = work / "rebuilt", work / "made-cold", work / "floor.bin"
    inputs = [*safetensors_files(base), *safetensors_files(tuned)]
    payload = total_size(safetensors_files(deltas[2]))
    runs: dict[str, list[float]] = {}

    def cold(args: Sequence[str], log: Path, leftover: Path) -> float:
        """Run ``deltakit ARGS`` (or, with ``--io-floor``, this script's floor) from an empty page cache."""
        if leftover.is_dir():
            shutil.rmtree(leftover)
        leftover.unlink(missing_ok=True)
        drop_caches()
        if args[0] == "--io-floor":  # the floor times itself, without its process's start-up
            run_process([sys.executable, str(SCRIPT), *args], log, group)
            return float(log.read_text().split()[0])
        seconds, _ = run_cli(args, log, group)
        return seconds

    try:
        for limit in limits:
            (group / "blkio.throttle.read_bps_device").write_text(f"{os.major(device)}:{os.minor(device)} {limit}\n")
            rate = f"{limit / 1e6:.0f} MB/s"
            for index in range(repeat):
                for f, delta in deltas.items():
                    args = ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet"]
                    seconds = cold(args, logs / f"cold-{limit}-{f}-{index}.log", out)
                    runs.setdefault(f"{rate}, format {f}", []).append(seconds)
                args = ["make", "--base", str(base), "--target", str(tuned), "--out", str(made), "--quiet"]
                seconds = cold(args, logs / f"cold-{limit}-make-{index}.log", made)
                runs.setdefault(f"{rate}, make format 2", []).append(seconds)
                args = ["--io-floor", str(floor), str(payload), *map(str, inputs)]
                seconds = cold(args, logs / f"cold-{limit}-floor-{index}.log", floor)
                runs.setdefault(f"{rate}, make I/O floor", []).append(seconds)
    finally:
        for leftover in (out, made):
            if leftover.exists():
                shutil.rmtree(leftover)
        floor.unlink(missing_ok=True)
        group.rmdir()
    return runs


def shape_of(args: argparse.Namespace) -> LlamaShape:
    return LlamaShape(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads
    )


def generate_pair(args: argparse.Namespace, work: Path, noise: float) -> tuple[Path, Path, float]:
    """Write the base and fine-tune under ``work/models``; returns their folders and the seconds it took."""
    start = time.perf_counter()
    base, tuned = write_llama_pair(
        work / "models",
        shape=shape_of(args),
        extra_vocab=args.extra_vocab,
        dtype=torch.float16,
        shard_size=args.input_shard_size,
        noise=noise,
    )
    return base, tuned, time.perf_counter() - start


def benchmark(args: argparse.Namespace, work: Path, noise: float) -> Results:
    shape = shape_of(args)
    check_disk(work, model_bytes(shape, args.extra_vocab, torch.float16))
    logs = work / "logs"
    logs.mkdir()
    base, tuned, generate_s = generate_pair(args, work, noise)
    base_files, tuned_files = safetensors_files(base), safetensors_files(tuned)
    inputs = [*base_files, *tuned_files]

    settle()
    wall, rss = run_cli(["--version"], logs / "version.log")
    startup = Step("start-up (`deltakit --version`)", wall, rss)

    # make: both formats, the format 2 delta kept for apply; the floor writes as much as format 2's payload
    deltas = {f: work / f"delta-{f}" for f in (1, 2)}
    make_args = {f: ["make", "--base", str(base), "--target", str(tuned), "--format", str(f)] for f in (1, 2)}
    first = {f: cli_job(make_args[f], deltas[f], logs, f"make-{f}")(0) for f in (1, 2)}  # untimed: the outputs
    payload = {f: total_size(safetensors_files(deltas[f])) for f in (1, 2)}
    make_runs = interleaved(
        {
            "make I/O floor": (inputs, floor_job(inputs, payload[2], work / "floor.bin")),
            **{MAKE[f]: (inputs, cli_job(make_args[f], work / f"made-{f}", logs, f"make-{f}")) for f in (1, 2)},
        },
        args.make_repeat,
    )
    for f in (1, 2):
        make_runs[MAKE[f]].append(first[f])
        shutil.rmtree(work / f"made-{f}", ignore_errors=True)
    read = total_size(inputs)
    make_steps = [best("make I/O floor", make_runs["make I/O floor"], payload[2])] + [
        best(MAKE[f], make_runs[MAKE[f]], payload[f]) for f in (1, 2)
    ]
    for step in make_steps:
        step.read_bytes = read

    # apply: the floor reads the base and the raw (format 1) payload, as the apply it is the floor of
    plan = {f: plan_apply(base, deltas[f]) for f in (1, 2)}
    out = work / "rebuilt"
    floor_sources = [*base_files, *safetensors_files(deltas[1])]
    apply_runs = interleaved(
        {
            "apply I/O floor": (floor_sources, floor_job(floor_sources, plan[1].write_bytes, work / "floor.bin")),
            **{
                APPLY[f]: (
                    [*base_files, *safetensors_files(deltas[f])],
                    cli_job(["apply", "--base", str(base), "--delta", str(deltas[f])], out, logs, f"apply-{f}"),
                )
                for f in (1, 2)
            },
        },
        args.repeat,
    )
    apply_steps = [best("apply I/O floor", apply_runs["apply I/O floor"], plan[1].write_bytes)]
    for f in (1, 2):
        step = best(APPLY[f], apply_runs[APPLY[f]], plan[f].write_bytes)
        step.read_bytes = plan[f].read_bytes + sum(plan[f].base.tensors[n].nbytes for n in plan[f].sample)
        apply_steps.append(step)

    settle(safetensors_files(out))
    wall, rss = run_cli(["verify", str(out), "--delta", str(deltas[2]), "--quiet"], logs / "verify.log")
    verify = Step("verify (rebuilt model)", wall, rss, plan[2].write_bytes, 0)
    decode = {
        f"format {f}, {n} thread{'s' if n > 1 else ''}": decode_throughput(deltas[f], base, threads=n)
        for f in (1, 2)
        for n in (1, 2)
    }
    cold = cold_runs(base, tuned, deltas, work, args.read_limit, min(args.repeat, 2), logs)

    return Results(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["python", "benchmarks/apply.py", *sys.argv[1:]]),
        machine=machine(("deltakit",)),
        shape=asdict(shape),
        extra_vocab=args.extra_vocab,
        base_bytes=total_size(base_files),
        base_files=len(base_files),
        payload_bytes=payload,
        output_bytes=plan[2].write_bytes,
        generate_s=generate_s,
        repeat=args.repeat,
        json_path=display_path(args.json),
        steps=[startup, *make_steps, *apply_steps, verify],
        noise=noise,
        decode_gbps=decode,
        cold_apply_s=cold,
    )


def measure_memory(args: argparse.Namespace, work: Path) -> MemoryRun:
    """make and apply (format 2) once each on a pair of the given shape: wall time and peak RSS, for models
    too large to run every step of the full benchmark on this machine's disk."""
    shape = shape_of(args)
    logs = work / "logs"
    logs.mkdir(parents=True)
    base, tuned, generate_s = generate_pair(args, work, args.noise[0])
    base_files, tuned_files = safetensors_files(base), safetensors_files(tuned)
    delta, out = work / "delta", work / "rebuilt"
    settle([*base_files, *tuned_files])
    make_s, make_rss = run_cli(
        ["make", "--base", str(base), "--target", str(tuned), "--out", str(delta), "--quiet"], logs / "make.log"
    )
    payload = total_size(safetensors_files(delta))
    settle([*base_files, *safetensors_files(delta)])
    apply_s, apply_rss = run_cli(
        ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet"], logs / "apply.log"
    )
    return MemoryRun(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["python", "benchmarks/apply.py", *sys.argv[1:]]),
        machine=machine(("deltakit",)),
        shape=asdict(shape),
        extra_vocab=args.extra_vocab,
        noise=args.noise[0],
        base_bytes=total_size(base_files),
        base_files=len(base_files),
        tuned_bytes=total_size(tuned_files),
        generate_s=generate_s,
        payload_bytes=payload,
        make_s=make_s,
        make_rss_bytes=make_rss,
        apply_s=apply_s,
        apply_rss_bytes=apply_rss,
    )


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
