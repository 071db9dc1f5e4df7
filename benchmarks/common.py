"""What the benchmark scripts share: the machine they ran on, the commit measured, running a command
as its own measured process, and writing each script's own section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import deltakit
from deltakit.examples import LlamaShape

ROOT = Path(__file__).resolve().parent.parent


def source_commit(paths: Sequence[str] = ("deltakit",)) -> str:
    """The commit measured, and whether ``paths`` had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", *paths], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine(paths: Sequence[str] = ("deltakit",)) -> dict[str, object]:
    """CPUs, memory, kernel and versions, for the record beside the figures."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "ram_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "deltakit": deltakit.__version__,
        "deltakit_source": source_commit(paths),
    }


# Reads that warm the page cache go in chunks of this many bytes.
READ_CHUNK = 8 << 20


class StepFailed(RuntimeError):
    """A measured command exited with a non-zero status; the message holds the end of its log."""


# Linux gives an exec'd process the high-water RSS of the memory it replaced, so a child spawned from this
# (large) process would report at least our own peak. A tiny launcher, without torch, spawns and reaps each
# command instead, and prints its exit status, ru_maxrss (KiB) and wall seconds.
_LAUNCHER = """
import os, sys, time
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
io = [(os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2)]
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ, file_actions=io)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, time.perf_counter() - start)
"""


def run_cli(args: Sequence[str], log: Path, cgroup: Path | None = None) -> tuple[float, int]:
    """Run ``python -m deltakit.cli ARGS`` and return (wall seconds, peak RSS in bytes) of that process alone;
    with ``cgroup``, in that (blkio) cgroup."""
    return run_process([sys.executable, "-m", "deltakit.cli", *args], log, cgroup)


def run_process(
    command: Sequence[str], log: Path, cgroup: Path | None = None, env: dict[str, str] | None = None
) -> tuple[float, int]:
    """Run ``command`` (its output to ``log``) and return (wall seconds, peak RSS in bytes) of that process alone."""
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(log), *command]

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    done = subprocess.run(launcher, capture_output=True, text=True, check=True, preexec_fn=enter, env=env)
    code, maxrss_kib, wall = done.stdout.split()
    if int(code) != 0:
        raise StepFailed(f"{' '.join(command)} exited {code}:\n{log.read_text(errors='replace')[-3000:]}")
    return float(wall), int(maxrss_kib) * 1024


def read_all(paths: Sequence[Path]) -> int:
    """Read files start to end (to warm the page cache); returns the bytes read."""
    buffer = bytearray(READ_CHUNK)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def settle(warm: Sequence[Path] = ()) -> None:
    """Untimed, before each timed step: flush every dirty page (ours and others'), then read ``warm``."""
    os.sync()
    read_all(warm)


def record(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the section between ``begin`` and ``end`` markers in ``path``, or add it at the end;
    other sections are left as they are."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def decode_throughput(delta: Path, base: Path, *, threads: int, repeat: int = 3) -> float:
    """Output GB/s of decoding every chunk of ``delta`` against ``base``, as apply does (frames decoded,
    byte streams joined, the transform undone), with every input already in memory: the work apply adds
    per output byte, on ``threads`` threads. Best of ``repeat``.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from deltakit.engine.apply import _apply_chunks, _decode_chunk, plan_apply  # the very code apply runs
    from deltakit.formats.checkpoint import RangeReader
    from deltakit.reading import Arena

    plan = plan_apply(base, delta)
    work = []
    with RangeReader() as reader:
        for chunk in _apply_chunks(plan.steps):
            views = []
            for read in chunk.reads:
                view = memoryview(bytearray(read.length))
                reader.read_into(read.path, read.offset, view)
                views.append(view)
            work.append((chunk, views))
    local = threading.local()

    def decode(item: tuple) -> int:
        if not hasattr(local, "arena"):
            local.arena = Arena()
        chunk, views = item
        # the codecs never write to their inputs, so the same buffers serve every round
        return int(_decode_chunk(plan.steps[chunk.owner], chunk, views, local.arena).size)

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(decode, work))  # warm-up: arenas sized, code paths touched
        for _ in range(repeat):
            start = time.perf_counter()
            sum(pool.map(decode, work))
            best = min(best, time.perf_counter() - start)
    return total / best / 1e9


def add_shape_arguments(parser: argparse.ArgumentParser, default: LlamaShape) -> None:
    """``--hidden --layers --intermediate --heads --vocab``: the LLaMA shape to generate, ``default`` unless given."""
    for name in ("hidden", "layers", "intermediate", "heads", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=getattr(default, name))


def shape_from(args: argparse.Namespace) -> LlamaShape:
    return LlamaShape(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads
    )


# LLaMA-shaped defaults: the 1.9 GB model most benchmarks time, and a 7B for memory.
LLAMA_1_9GB = LlamaShape(vocab=32000, hidden=2048, layers=16, intermediate=5504, heads=16)
LLAMA_7B = LlamaShape(vocab=32000, hidden=4096, layers=32, intermediate=11008, heads=32)


@dataclass(frozen=True)
class Pair:
    """A LLaMA-shaped base, a fine-tune-like target and the delta between them, as the benchmarks use."""

    base: Path
    target: Path
    delta: Path
    generate_s: float  # writing the pair, not the delta

    @property
    def target_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.target.glob("*.safetensors"))


def write_pair_and_delta(work: Path, shape: LlamaShape, *, tokenizer: bool = False) -> Pair:
    """``write_llama_pair``'s fine-tune-like pair (256 more vocabulary rows, noise 1.6e-5) under ``work``
    and ``deltakit make``'s delta of it; ``tokenizer``: a small SentencePiece tokenizer in both folders
    (tests/tinyllama.py trains it), which GGUF output needs."""
    from deltakit.examples import write_llama_pair

    start = time.perf_counter()
    base, target = write_llama_pair(work / "pair", shape=shape, extra_vocab=256, noise=1.6e-5)
    generate_s = time.perf_counter() - start
    if tokenizer:
        sys.path.insert(0, str(ROOT / "tests"))
        from tinyllama import train_tokenizer

        model = train_tokenizer(work / "sentencepiece")
        for folder in (base, target):
            shutil.copyfile(model, folder / "tokenizer.model")
    delta = work / "delta"
    command = [sys.executable, "-m", "deltakit.cli", "make", "--base", str(base), "--target", str(target)]
    subprocess.run([*command, "--out", str(delta), "--quiet"], check=True, capture_output=True)
    return Pair(base, target, delta, generate_s)
