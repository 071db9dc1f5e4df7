"""Benchmark the HTTP service's request latency while idle and while an apply job runs.

Starts the real service (``deltakit serve``, its own process, on 127.0.0.1 and an ephemeral port) on a
fresh data root, registers a LLaMA-shaped fp16 base (about 1.9 GB by default) and a delta of a fine-tune,
then times ``GET /healthz``, ``GET /v1/jobs/{id}`` and ``GET /v1/models`` from one httpx client sending
one request at a time: while an apply job runs, and while the service is idle. Only requests made while
the job's state was ``running`` count as busy.

Usage::

    .venv/bin/python benchmarks/service_latency.py            # full size; writes BENCHMARKS.md and JSON
    .venv/bin/python benchmarks/service_latency.py --smoke    # a tiny model and short phases; records nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
from common import machine, record

from deltakit import make_delta
from deltakit.examples import LlamaShape, write_llama_pair
from deltakit.registry import Registry
from deltakit_service.store import Store

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
SECTION_BEGIN = "<!-- benchmarks/service_latency.py: begin -->"
SECTION_END = "<!-- benchmarks/service_latency.py: end -->"
ENDPOINTS = ("GET /healthz", "GET /v1/jobs/{id}", "GET /v1/models")
TERMINAL = ("succeeded", "failed", "cancelled")
START_SECONDS = 60.0
STOP_SECONDS = 60.0
REQUEST_SECONDS = 30.0
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class BenchmarkFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# The service, as its own process


class Service:
    """``python -m deltakit.cli serve`` on 127.0.0.1, port 0, with ``DELTAKIT_HOME`` set to ``home``.

    It runs as shipped (uvicorn, log level info, so one access-log line per request), from ``cwd`` so no
    stray ``.env`` is read, with every other ``DELTAKIT_*`` variable removed; its output goes to ``log``.
    """

    def __init__(self, home: Path, cwd: Path, log: Path) -> None:
        self.home, self.cwd, self.log = home, cwd, log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> Service:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAKIT_")}
        env |= {"DELTAKIT_HOME": str(self.home), "DELTAKIT_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "deltakit.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while True:
            if match := _LISTENING.search(self.log.read_text(errors="replace")):
                self.url = f"http://127.0.0.1:{match.group(1)}"
                return self
            if self.process.poll() is not None:
                raise BenchmarkFailed(f"the service exited {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise BenchmarkFailed(f"the service did not start in {START_SECONDS:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown; the runner waits for its jobs
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_SECONDS)

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the service process so far, all its threads."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Phase:
    """The request latencies (seconds) of one phase, by endpoint."""

    name: str
    wall_s: float = 0.0
    rounds: int = 0
    service_cpu_s: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})


@dataclass
class JobRun:
    """One apply job: ``sampled`` when the request rounds ran against it, else a reference job polled every
    0.5 s. ``watched_s`` runs from the POST to the end seen; ``service_cpu_s`` is the service's CPU time then."""

    id: str
    output: str
    sampled: bool
    duration_s: float
    bytes_written: int
    observed_running_s: float
    watched_s: float
    rounds: int
    service_cpu_s: float


def timed_get(http: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = http.get(path)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise BenchmarkFailed(f"GET {path}: {response.status_code} {response.text[:300]}")
    return seconds, response


def idle_phase(http: httpx.Client, job_id: str, phase: Phase, seconds: float, max_rounds: int) -> None:
    """Round after round of the three requests, with no job running, for ``seconds`` or ``max_rounds``."""
    paths = ("/healthz", f"/v1/jobs/{job_id}", "/v1/models")
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and time.perf_counter() - start < seconds:
        for endpoint, path in zip(ENDPOINTS, paths, strict=True):
            latency, response = timed_get(http, path)
            if endpoint == ENDPOINTS[1] and response.json()["state"] not in TERMINAL:
                raise BenchmarkFailed(f"job {job_id} is {response.json()['state']} in an idle phase")
            phase.samples[endpoint].append(latency)
        rounds += 1
    phase.rounds += rounds
    phase.wall_s += time.perf_counter() - start


def busy_phase(
    http: httpx.Client, job_id: str, phase: Phase, timeout: float, max_rounds: int
) -> tuple[dict[str, object], int, float]:
    """Rounds of the three requests until the job ends; returns its last state, rounds counted, running time seen.

    Each round starts with ``GET /v1/jobs/{id}``, whose answer says whether the job was running when the
    service handled it; that request counts when it was. ``/healthz`` and ``/v1/models`` count when the job
    requests just before and just after them both saw it running: a job only goes queued, running, ended,
    so it ran the whole time between. After ``max_rounds`` counted rounds the job is only watched, every
    0.2 s; after ``timeout`` seconds it is cancelled.
    """
    start = time.perf_counter()
    pending: list[tuple[str, float]] = []
    was_running = False
    rounds = 0
    first_running = last_running = 0.0
    while True:
        if time.perf_counter() - start > timeout:
            http.delete(f"/v1/jobs/{job_id}")
            raise BenchmarkFailed(f"job {job_id} ran longer than {timeout:g} s; it was cancelled")
        latency, response = timed_get(http, f"/v1/jobs/{job_id}")
        job = response.json()
        running = job["state"] == "running"
        if running:
            last_running = time.perf_counter()
            first_running = first_running or last_running
        sampling = rounds < max_rounds
        if running and sampling:
            phase.samples[ENDPOINTS[1]].append(latency)
            if was_running:
                for endpoint, seconds in pending:
                    phase.samples[endpoint].append(seconds)
                rounds += 1
        pending = []
        was_running = running
        if job["state"] in TERMINAL:
            phase.rounds += rounds
            phase.wall_s += (last_running - first_running) if first_running else 0.0
            return job, rounds, (last_running - first_running) if first_running else 0.0
        if not sampling:
            time.sleep(0.2)
            continue
        for endpoint, path in ((ENDPOINTS[0], "/healthz"), (ENDPOINTS[2], "/v1/models")):
            pending.append((endpoint, timed_get(http, path)[0]))


def warm_up(http: httpx.Client, rounds: int) -> None:
    for _ in range(rounds):
        timed_get(http, "/healthz")
        timed_get(http, "/v1/models")


def submit(http: httpx.Client, output: str) -> str:
    """Queue an apply job of the registered base and delta; returns its id."""
    created = http.post("/v1/jobs", json={"kind": "apply", "base": "base", "delta": "delta", "output": output})
    if created.status_code != 202:
        raise BenchmarkFailed(f"POST /v1/jobs: {created.status_code} {created.text[:300]}")
    return str(created.json()["id"])


def watch(http: httpx.Client, job_id: str, timeout: float) -> dict[str, object]:
    """Poll a job every 0.5 s, as a patient client would, until it ends; nothing is counted."""
    start = time.perf_counter()
    while True:
        job: dict[str, object] = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in TERMINAL:
            return job
        if time.perf_counter() - start > timeout:
            http.delete(f"/v1/jobs/{job_id}")
            raise BenchmarkFailed(f"job {job_id} ran longer than {timeout:g} s; it was cancelled")
        time.sleep(0.5)


def job_run(
    job: dict[str, object],
    output: str,
    sampled: bool,
    seen: float,
    watched: float,
    rounds: int,
    cpu: float,
    service: Service,
) -> JobRun:
    if job["state"] != "succeeded":
        raise BenchmarkFailed(f"job {job['id']} {job['state']}: {job['error']}\n{service.log_tail()}")
    report = job["report"]
    assert isinstance(report, dict)
    duration = job["duration"]
    assert isinstance(duration, float)
    return JobRun(str(job["id"]), output, sampled, duration, int(report["bytes_written"]), seen, watched, rounds, cpu)


# --------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``p`` percent of values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {
        "count": len(values),
        "p50_ms": percentile(values, 50) * 1e3,
        "p95_ms": percentile(values, 95) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": max(values) * 1e3,
        "mean_ms": sum(values) / len(values) * 1e3,
    }


def ratio(busy: float | int | None, idle: float | int | None) -> float | None:
    return None if busy is None or not idle else busy / idle


# --------------------------------------------------------------------------------------------------
# Inputs and the machine


def model_bytes(shape: LlamaShape, extra_vocab: int) -> int:
    h, i, v = shape.hidden, shape.intermediate, shape.vocab + extra_vocab
    return (shape.layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h) * 2


def check_disk(work: Path, model: int) -> None:
    """Base, fine-tune, delta and one output at a time (each is removed after its job), plus room."""
    need = 5 * model
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / GIB:.1f} GiB free, this run needs about {need / GIB:.1f} GiB")


def prepare(args: argparse.Namespace, home: Path) -> tuple[int, int, float]:
    """Write the base and a fine-tune, make the delta, register both, and add a read and a write token.

    Returns the base's and the delta's bytes, and the seconds this took.
    """
    start = time.perf_counter()
    shape = LlamaShape(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, heads=args.heads
    )
    data = home / "data"
    base, tuned = write_llama_pair(
        data, shape=shape, extra_vocab=args.extra_vocab, dtype=torch.float16, shard_size=args.input_shard_size
    )
    make_delta(base, tuned, data / "delta")
    shutil.rmtree(tuned)  # not needed again
    registry = Registry(home)
    base_entry = registry.add("base", base)
    delta_entry = registry.add("delta", data / "delta")
    return base_entry.size, delta_entry.size, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Results:
    """Everything measured in one run; written as JSON and rendered into BENCHMARKS.md."""

    date: str
    command: str
    machine: dict[str, object]
    shape: dict[str, int]
    extra_vocab: int
    base_bytes: int
    delta_bytes: int
    prepare_s: float
    settings: dict[str, object]
    jobs: list[JobRun]
    idle: dict[str, dict[str, float | int | None]]
    busy: dict[str, dict[str, float | int | None]]
    idle_wall_s: float
    busy_wall_s: float
    busy_watched_s: float
    idle_service_cpu_s: float
    busy_service_cpu_s: float
    json_path: str

    def ratios(self, endpoint: str) -> tuple[float | None, float | None]:
        b, i = self.busy[endpoint], self.idle[endpoint]
        return ratio(b["p50_ms"], i["p50_ms"]), ratio(b["p95_ms"], i["p95_ms"])

    def to_json(self) -> str:
        raw = asdict(self) | {
            "ratios": {e: dict(zip(("p50", "p95"), self.ratios(e), strict=True)) for e in ENDPOINTS},
        }
        return json.dumps(raw, indent=2) + "\n"


def benchmark(args: argparse.Namespace, work: Path) -> Results:
    check_disk(
        work,
        model_bytes(LlamaShape(args.vocab, args.hidden, args.layers, args.intermediate), args.extra_vocab),
    )
    home = work / "home"
    base_bytes, delta_bytes, prepare_s = prepare(args, home)
    store = Store(home / "jobs.sqlite3")
    read_token, write_token = store.create_token("read"), store.create_token("write")
    store.close()

    idle, busy = Phase("idle"), Phase("busy")
    runs: list[JobRun] = []
    busy_watched = 0.0
    os.sync()  # nothing of the set-up left to write back while measuring
    with Service(home, work, work / "service.log") as service:

        def client(token: str) -> httpx.Client:
            return httpx.Client(
                base_url=service.url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=REQUEST_SECONDS,
                trust_env=False,  # no proxy: loopback only
            )

        with client(read_token) as reader, client(write_token) as writer:
            warm_up(reader, args.warmup)
            for index in range(args.jobs):
                if args.reference_jobs:
                    output = f"reference-{index}"
                    cpu, posted = service.cpu_seconds(), time.perf_counter()
                    job_id = submit(writer, output)
                    job = watch(reader, job_id, args.job_timeout)
                    watched = time.perf_counter() - posted
                    runs.append(job_run(job, output, False, 0.0, watched, 0, service.cpu_seconds() - cpu, service))
                    shutil.rmtree(home / "models" / output)  # its registry entry stays, as a real one would
                    os.sync()

                output = f"sampled-{index}"
                cpu, posted = service.cpu_seconds(), time.perf_counter()
                job_id = submit(writer, output)
                job, rounds, seen = busy_phase(reader, job_id, busy, args.job_timeout, args.max_rounds)
                job_cpu, watched = service.cpu_seconds() - cpu, time.perf_counter() - posted
                busy.service_cpu_s += job_cpu
                busy_watched += watched
                runs.append(job_run(job, output, True, seen, watched, rounds, job_cpu, service))
                shutil.rmtree(home / "models" / output)
                os.sync()  # apply fsyncs its output; this flushes anything else before the idle phase

                cpu = service.cpu_seconds()
                idle_phase(reader, job_id, idle, args.idle_seconds, args.max_rounds)
                idle.service_cpu_s += service.cpu_seconds() - cpu

    return Results(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["python", "benchmarks/service_latency.py", *sys.argv[1:]]),
        machine=machine(("deltakit", "service")),
        shape={
            "vocab": args.vocab,
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "heads": args.heads,
        },
        extra_vocab=args.extra_vocab,
        base_bytes=base_bytes,
        delta_bytes=delta_bytes,
        prepare_s=prepare_s,
        settings={
            "jobs": args.jobs,
            "idle_seconds": args.idle_seconds,
            "max_rounds": args.max_rounds,
            "warmup_rounds": args.warmup,
            "reference_jobs": args.reference_jobs,
            "workers": 1,
        },
        jobs=runs,
        idle={e: summary(idle.samples[e]) for e in ENDPOINTS},
        busy={e: summary(busy.samples[e]) for e in ENDPOINTS},
        idle_wall_s=idle.wall_s,
        busy_wall_s=busy.wall_s,
        busy_watched_s=busy_watched,
        idle_service_cpu_s=idle.service_cpu_s,
        busy_service_cpu_s=busy.service_cpu_s,
        json_path=_display(args.json),
    )


# --------------------------------------------------------------------------------------------------
# Reporting


def _display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(results: Results) -> str:
    rows = [
        "| endpoint | phase | requests | p50 ms | p95 ms | p99 ms | max ms | busy/idle p50 | busy/idle p95 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for endpoint in ENDPOINTS:
        r50, r95 = results.ratios(endpoint)
        for name, stats in (("idle", results.idle[endpoint]), ("busy", results.busy[endpoint])):
            tail = f" {_x(r50)} | {_x(r95)} |" if name == "busy" else " | |"
            rows.append(
                f"| `{endpoint}` | {name} | {stats['count']} | {_ms(stats['p50_ms'])} | {_ms(stats['p95_ms'])} | "
                f"{_ms(stats['p99_ms'])} | {_ms(stats['max_ms'])} |" + tail
            )
    return "\n".join(rows)


def job_table(results: Results) -> str:
    rows = [
        "| job | the client meanwhile | duration s | written GB | GB/s | counted rounds "
        "| service CPU s, POST to end seen (cores) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for job in results.jobs:
        client = "request rounds, back to back" if job.sampled else "one poll every 0.5 s"
        rows.append(
            f"| {job.output} | {client} | {job.duration_s:.2f} | {job.bytes_written / 1e9:.3f} | "
            f"{job.bytes_written / 1e9 / job.duration_s:.2f} | {job.rounds if job.sampled else '-'} | "
            f"{job.service_cpu_s:.1f} ({job.service_cpu_s / job.watched_s:.2f}) |"
        )
    return "\n".join(rows)


def findings(results: Results) -> list[str]:
    """What the figures say, in sentences built from them."""
    lines = []
    sampled = [e for e in ENDPOINTS if results.busy[e]["count"]]
    if sampled:
        r50 = [results.ratios(e)[0] or 0.0 for e in sampled]
        r95 = [results.ratios(e)[1] or 0.0 for e in sampled]
        p95 = max(results.busy[e]["p95_ms"] or 0.0 for e in sampled)
        worst = max(results.busy[e]["max_ms"] or 0.0 for e in sampled)
        if max(r50) < 0.9:
            typical = "is faster than"
        elif max(r50) <= 1.1:
            typical = "takes about as long as"
        else:
            typical = f"takes up to {max(r50):.2f}x as long as"
        lines.append(
            f"- In short: while an apply job runs, a typical request {typical} when the service is idle (p50 "
            f"{min(r50):.2f}x to {max(r50):.2f}x of idle); the tail grows: p95 is {min(r95):.1f}x to {max(r95):.1f}x "
            f"of idle (at most {p95:.1f} ms), and the slowest request took {worst:.0f} ms."
        )
    for endpoint in ENDPOINTS:
        idle, busy = results.idle[endpoint], results.busy[endpoint]
        r50, r95 = results.ratios(endpoint)
        if not busy["count"]:
            lines.append(f"- `{endpoint}`: no request was made while a job ran; the job was too short to sample.")
            continue
        lines.append(
            f"- `{endpoint}`: median {_ms(idle['p50_ms'])} ms idle, {_ms(busy['p50_ms'])} ms while a job ran "
            f"({_x(r50)}); p95 {_ms(idle['p95_ms'])} → {_ms(busy['p95_ms'])} ms ({_x(r95)}); slowest of "
            f"{busy['count']} busy requests {_ms(busy['max_ms'])} ms (idle: {_ms(idle['max_ms'])} ms)."
        )
    durations = [job.duration_s for job in results.jobs if job.sampled]
    reference = [job.duration_s for job in results.jobs if not job.sampled]
    compared = (
        f" Reference jobs, polled every 0.5 s instead, took {min(reference):.2f} to {max(reference):.2f} s "
        f"(median {statistics.median(reference):.2f} s against {statistics.median(durations):.2f} s)."
        if reference
        else ""
    )
    busy_cores = results.busy_service_cpu_s / max(results.busy_watched_s, 1e-9)
    idle_cores = results.idle_service_cpu_s / max(results.idle_wall_s, 1e-9)
    lines.append(
        f"- The sampled apply jobs took {min(durations):.2f} to {max(durations):.2f} s.{compared} While the sampled "
        f"jobs ran, the service process used {busy_cores:.2f} CPU cores on average (in the idle phases, serving "
        f"requests only: {idle_cores:.2f})."
    )
    return lines


def markdown(results: Results) -> str:
    m, s = results.machine, results.shape
    n = sum(job.sampled for job in results.jobs)
    reference = (
        "Before each sampled job, a reference apply job runs that the client only polls every 0.5 s, to show "
        "whether the request rounds themselves slow a job. "
        if results.settings["reference_jobs"]
        else ""
    )
    lines = [
        SECTION_BEGIN,
        "## service: request latency while an apply job runs",
        "",
        f"Measured {results.date} with `{results.command}`.",
        "",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"Python {m['python']}, torch {m['torch']}, httpx {httpx.__version__}, "
        f"deltakit {m['deltakit']} ({m['deltakit_source']}).",
        f"- Model: hidden {s['hidden']}, {s['layers']} layers, intermediate {s['intermediate']}, vocab {s['vocab']} "
        f"(+{results.extra_vocab} rows in the fine-tune), fp16. Base {results.base_bytes / 1e9:.2f} GB, delta "
        f"payload {results.delta_bytes / 1e9:.2f} GB.",
        "",
        table(results),
        "",
        job_table(results),
        "",
        *findings(results),
        "",
        f"How: the service runs as shipped, `deltakit serve --host 127.0.0.1 --port 0` in its own process (uvicorn, "
        f"log level info, one worker thread for jobs), on a fresh `DELTAKIT_HOME` holding the base, the delta, and "
        f"a read and a write token. One httpx client in this script's process sends one request at a time over a "
        f"kept-alive loopback connection, in rounds of `GET /v1/jobs/{{id}}`, `GET /healthz`, `GET /v1/models`. All "
        f"three carry the read token (`/healthz` needs none); every answer was a 200. Latency is the client's wall "
        f"time per request, from `get` called to the body read. {n} sampled apply jobs run one after another; "
        f"each is followed by an idle phase of at most {results.settings['idle_seconds']} s or "
        f"{results.settings['max_rounds']} rounds that polls the job just finished. A busy request counts only when "
        f"the job was `running` throughout: a job request when its answer says so, the two others when the job "
        f"requests before and after them both do. {reference}Every job's output is deleted (its registry "
        f"entry kept) when it ends. Before the first job, {results.settings['warmup_rounds']} "
        f"uncounted rounds warm the connection; before each idle phase, `sync`. Percentiles are nearest-rank. "
        f"The client, the service's event loop, its request threads and the job share the machine's "
        f"{m['cpus']} CPUs; the machine was shared with other work. Every figure comes from this one run. Raw "
        f"figures: `{results.json_path}`.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line

SMOKE = {
    "vocab": 4000,
    "hidden": 256,
    "layers": 2,
    "intermediate": 688,
    "heads": 4,
    "extra_vocab": 16,
    "jobs": 2,
    "idle_seconds": 1.0,
    "warmup": 5,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "benchmarks" / "work" / "service_latency",
        help="scratch folder, the service's DELTAKIT_HOME inside it (must be empty)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder: models, delta, outputs, service log")
    p.add_argument("--smoke", action="store_true", help="a tiny model, short phases; implies --no-record")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--extra-vocab", type=int, default=256, help="rows the fine-tune adds to the vocabulary")
    p.add_argument("--input-shard-size", type=int, default=1_000_000_000, help="bytes per input safetensors file")
    p.add_argument("--jobs", type=int, default=3, help="apply jobs, one after another, each followed by idle")
    p.add_argument(
        "--no-reference-jobs",
        dest="reference_jobs",
        action="store_false",
        help="skip the reference job (polled every 0.5 s) run before each sampled job",
    )
    p.add_argument("--idle-seconds", type=float, default=10.0, help="the most each idle phase lasts")
    p.add_argument("--max-rounds", type=int, default=5000, help="the most counted rounds per job and per idle phase")
    p.add_argument("--warmup", type=int, default=50, help="uncounted rounds before the first job")
    p.add_argument("--job-timeout", type=float, default=600.0, help="cancel a job and stop after this many seconds")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md", help="where to record the results")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "service_latency.json")
    p.add_argument("--no-record", action="store_true", help="print only; write neither BENCHMARKS.md nor JSON")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.no_record = True
    if args.jobs < 1 or args.max_rounds < 1 or args.idle_seconds <= 0 or args.job_timeout <= 0:
        p.error("--jobs and --max-rounds must be at least 1, --idle-seconds and --job-timeout above 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work: Path = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        print(f"{work} is not empty; remove it or pass another --work", file=sys.stderr)
        return 2
    made_parent = not work.parent.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = benchmark(args, work)
    except BenchmarkFailed as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if made_parent and work.parent.is_dir() and not any(work.parent.iterdir()):
                work.parent.rmdir()  # the folder this run made, now empty
    print(table(results))
    print()
    print(job_table(results))
    print()
    print("\n".join(findings(results)))
    if not args.no_record:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(results.to_json(), encoding="utf-8")
        record(args.markdown, markdown(results), SECTION_BEGIN, SECTION_END)
        print(f"\nrecorded in {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
