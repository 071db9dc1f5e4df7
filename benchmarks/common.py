"""What the benchmark scripts share: the machine they ran on, the commit measured, and writing
each script's own section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

import deltakit

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
