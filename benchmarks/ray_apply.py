"""Benchmark the Ray paths on this machine: what they cost, since on 2 cores no speed-up can show.

- One large apply: ``deltakit apply --ray ADDRESS`` (one task per output shard) against ``deltakit apply``,
  on the same LLaMA-shaped fp16 pair (about 1.9 GB) cut into the same shards, interleaved, best of N.
  The cluster is a local one (``ray start --head``, 2 CPUs) started before the timing; the figure is the
  driver's whole command, its connection to the cluster included. Also each shard task's throughput.
- Many small jobs: the HTTP service with ``DELTAKIT_EXECUTOR=ray`` against ``local``, the same number of
  small apply jobs submitted at once (2 at a time run), jobs per second from the first POST to the last end.

What an N-node cluster would give for a 70B (140 GB of fp16 output) is worked out from the measured per-task
throughput and the shared filesystem's bandwidth, which bounds it.

Usage::

    .venv/bin/python benchmarks/ray_apply.py                  # full size; writes BENCHMARKS.md and JSON
    .venv/bin/python benchmarks/ray_apply.py --layers 2 --hidden 256 --intermediate 688 --vocab 4000 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common import LLAMA_1_9GB, add_shape_arguments, machine, record, run_cli, settle, shape_from, write_pair_and_delta

from deltakit.examples import LlamaShape

ROOT = Path(__file__).resolve().parent.parent
SECTION_BEGIN = "<!-- benchmarks/ray_apply.py: begin -->"
SECTION_END = "<!-- benchmarks/ray_apply.py: end -->"


@dataclass
class Apply:
    local_s: list[float]
    ray_s: list[float]
    local_rss: int
    ray_rss: int
    shards: int
    output_bytes: int
    task_gbps: list[float]


@dataclass
class Jobs:
    executor: str
    jobs: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.jobs / self.seconds


def ray_cli(*args: str) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    subprocess.run([ray or "ray", *args], check=True, capture_output=True, text=True)


def measure_apply(work: Path, base: Path, delta: Path, shard_size: int, repeat: int, address: str) -> Apply:
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    out = work / "out"
    inputs = sorted(base.glob("*.safetensors")) + sorted(delta.glob("*.safetensors"))
    runs: dict[str, list[tuple[float, int]]] = {"local": [], "ray": []}
    for round_ in range(repeat):
        for kind in ("local", "ray"):
            shutil.rmtree(out, ignore_errors=True)
            settle(inputs)
            args = ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet"]
            args += ["--shard-size", str(shard_size)] + (["--ray", address] if kind == "ray" else [])
            runs[kind].append(run_cli(args, logs / f"{kind}-{round_}.log"))
    shards = sorted(out.glob("model-*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    shutil.rmtree(out, ignore_errors=True)
    return Apply(
        [t for t, _ in runs["local"]],
        [t for t, _ in runs["ray"]],
        max(r for _, r in runs["local"]),
        max(r for _, r in runs["ray"]),
        len(shards),
        size,
        task_throughput(base, delta, shard_size, address, work / "tasks"),
    )


def task_throughput(base: Path, delta: Path, shard_size: int, address: str, folder: Path) -> list[float]:
    """Each shard task alone on the cluster, one after another: output GB/s inside the task."""
    import ray

    from deltakit.cluster import _shard_task
    from deltakit.engine import plan_apply

    plan = plan_apply(base, delta, shard_size=shard_size)
    ray.init(address=address, log_to_driver=False)
    try:
        timed = ray.remote(_timed_shard)
        folder.mkdir(exist_ok=True)
        speeds = []
        for i, shard in enumerate(plan.shards):
            seconds = ray.get(timed.remote(_shard_task, str(base), str(delta), shard_size, i, str(folder), plan.sample))
            speeds.append(shard.layout.size / seconds / 1e9)
        return speeds
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def _timed_shard(task, *args) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    task(*args)
    return time.perf_counter() - start


def measure_jobs(work: Path, executor: str, count: int, address: str) -> Jobs:
    """``count`` small apply jobs through the service (2 workers), submitted at once."""
    import httpx
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import finetune_of, llama_like, register_for_service, write_checkpoint
    from test_service import LiveServer, wait

    from deltakit import make_delta
    from deltakit_service.settings import Settings

    home = work / f"home-{executor}"
    base = llama_like(torch.float16, vocab=256, hidden=64)
    base_dir = write_checkpoint(home / "data" / "llama", base)
    target_dir = write_checkpoint(home / "data" / "panda", finetune_of(base, extra_vocab=8), files={"a.json": "{}"})
    make_delta(base_dir, target_dir, home / "data" / "panda-delta")
    token = register_for_service(home, llama=base_dir, panda_delta=home / "data" / "panda-delta")
    settings = Settings(home=home, workers=2, executor=executor, ray_address=address)  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {token}"}
    with LiveServer(settings) as url, httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        warm = {"kind": "apply", "base": "llama", "delta": "panda-delta", "output": "warm"}
        assert wait(http, http.post("/v1/jobs", json=warm).json()["id"])["state"] == "succeeded"  # untimed
        start = time.perf_counter()
        request = {"kind": "apply", "base": "llama", "delta": "panda-delta"}
        ids = [http.post("/v1/jobs", json=request | {"output": f"m{i}"}).json()["id"] for i in range(count)]
        for job_id in ids:
            assert wait(http, job_id)["state"] == "succeeded"
        seconds = time.perf_counter() - start
    return Jobs(executor, count, seconds)


def projection(task_gbps: float, nodes: Sequence[int], fs_gbps: Sequence[float]) -> list[str]:
    """A 70B (140 GB of fp16 output): tasks in parallel on N nodes, one per node at the measured per-task
    rate, bounded by the shared filesystem, which carries base + payload in and the output out."""
    output = 140e9
    traffic = output * 2.5  # reads: base and a compressed payload (~0.25-1x); writes: the output
    lines = []
    for fs in fs_gbps:
        cells = []
        for n in nodes:
            seconds = max(output / (n * task_gbps * 1e9), traffic / (fs * 1e9))
            cells.append(f"{n} node{'s' if n > 1 else ''} {seconds / 60:.1f} min")
        lines.append(f"- shared filesystem at {fs:g} GB/s: " + ", ".join(cells) + ".")
    return lines


def markdown(result: Apply, jobs: list[Jobs], info: dict[str, object], shape: LlamaShape) -> str:
    m = info["machine"]
    assert isinstance(m, dict)
    local, ray = min(result.local_s), min(result.ray_s)
    task = sum(result.task_gbps) / len(result.task_gbps)
    by = {j.executor: j for j in jobs}
    lines = [
        SECTION_BEGIN,
        "## Ray: what the cluster paths cost on one machine",
        "",
        f"Measured {info['date']} with `{info['command']}`.",
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM; Python {m['python']}, "
        f"torch {m['torch']}, deltakit {m['deltakit']} ({m['deltakit_source']}), Ray {info['ray']}. A local Ray "
        "cluster (`ray start --head --num-cpus 2`), started before the timing.",
        f"- Pair: hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, vocab "
        f"{shape.vocab} (+256 rows), fp16, fine-tune-like; output {result.output_bytes / 1e9:.2f} GB in "
        f"{result.shards} shards of at most {info['shard_size'] / 1e9:g} GB (the same for both).",
        "",
        "| step | best wall s | all runs, s | peak RSS of the command MiB |",
        "|---|---:|---|---:|",
        f"| `deltakit apply` | {local:.2f} | {', '.join(f'{t:.2f}' for t in result.local_s)} | "
        f"{result.local_rss / (1 << 20):.0f} |",
        f"| `deltakit apply --ray ADDRESS` (one task per shard) | {ray:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in result.ray_s)} | {result.ray_rss / (1 << 20):.0f} (driver only) |",
        "",
        f"- Overhead of the Ray path on one 2-CPU machine: **{ray / local:.2f}x** the local apply's time "
        "(connecting to the cluster, scheduling, each task planning again and opening its inputs; two tasks "
        "share the two CPUs the local apply uses alone).",
        f"- Per shard task, alone on the cluster: {', '.join(f'{g:.2f}' for g in result.task_gbps)} GB/s of "
        f"output (mean {task:.2f} GB/s).",
        f"- Many small jobs through the service (2 job workers), {by['local'].jobs} apply jobs of a tiny model "
        f"submitted at once: local {by['local'].per_second:.1f} jobs/s, Ray {by['ray'].per_second:.1f} jobs/s "
        f"({by['ray'].per_second / by['local'].per_second:.2f}x): each Ray job is a task plus a progress actor.",
        "",
        f"What an N-node cluster should give for a 70B (140 GB of fp16 output), one task per node at the "
        f"{task:.2f} GB/s measured here, shards of 5 GB (28 of them, so up to 28 nodes work at once); every "
        "byte crosses the shared filesystem: the base (140 GB) and the payload in, the output out, about 2.5x "
        "the output in all, which bounds it:",
        "",
        *projection(task, (1, 4, 16), (1.0, 5.0, 20.0)),
        "",
        "The local figures are best of the interleaved runs; before each, `sync` and a read of the inputs "
        "(a warm page cache). The driver's RSS is the command's `ru_maxrss`; each task's own memory is "
        "bounded as a local apply's is. The machine was shared with other work; every figure comes from "
        "this one run. Raw figures: `benchmarks/results/ray_apply.json`.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(p, LLAMA_1_9GB)
    p.add_argument("--shard-size", type=int, default=500_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "ray")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ray_apply.json")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    import ray as ray_package

    shape = shape_from(args)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    # a throwaway cluster on this machine, for this run's processes alone: no token to agree on (a token
    # file left by another local Ray instance would otherwise keep the commands from joining it)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = 6391
    ray_cli(
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(port),
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
    )
    address = f"127.0.0.1:{port}"
    try:
        pair = write_pair_and_delta(args.work, shape)
        base, delta = pair.base, pair.delta
        applied = measure_apply(args.work, base, delta, args.shard_size, args.repeat, address)
        shutil.rmtree(args.work / "pair", ignore_errors=True)
        import ray

        ray.init(address=address, log_to_driver=False)
        try:
            jobs = [measure_jobs(args.work, kind, args.jobs, address) for kind in ("local", "ray")]
        finally:
            ray.shutdown()
    finally:
        ray_cli("stop", "--force")
        shutil.rmtree(args.work, ignore_errors=True)
    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/ray_apply.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(("deltakit", "service")),
        "ray": ray_package.__version__,
        "shard_size": args.shard_size,
        "shape": asdict(shape),
    }
    text = markdown(applied, jobs, info, shape)
    print(text)
    if not args.no_record:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw = info | {"apply": asdict(applied), "jobs": [asdict(j) | {"per_second": j.per_second} for j in jobs]}
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
        record(args.markdown, text, SECTION_BEGIN, SECTION_END)
        print(f"recorded in {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
