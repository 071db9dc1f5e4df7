"""The registry's figures (issue 23): bytes a model store keeps for fine-tunes of one base against full copies,
and a Hub client's downloads from the service against the same files served as plain static files.

**Storage.** Five real fine-tunes of all-MiniLM-L6-v2 (``benchmarks/finetune.py``'s recipe, five seeds and
learning rates, short runs so that they fit in minutes on two cores), each imported into a ``ModelStore`` with
their base, in fp32, fp16 and bf16; and a LLaMA-shaped set: a few synthetic fine-tunes of one base from
``deltakit.examples.write_llama_pair`` (Gaussian noise of an ulp or two, not training: said so in the output).

**Serving.** One of the LLaMA-shaped fine-tunes, stored as a delta, served by the service (``deltakit serve``'s
own ``serve``, uvicorn on 127.0.0.1, in its own process) to the real ``huggingface_hub.snapshot_download`` (in
client processes of their own): a cold download (the rebuild included), warm downloads, and the same files
served as static files by the same process (Starlette ``StaticFiles`` mounts over the rebuild cache, as it comes
and reading 1 MiB at a time, added to the app by this script only), fetched by huggingface_hub's own ``http_get``
with snapshot_download's 8 worker threads. Then 8 concurrent downloaders of the model made cold again, and the
count of rebuilds they caused; last, one cold download with the client's default 10 s timeouts.

Usage::

    .venv/bin/python benchmarks/registry.py --hidden 1024 --layers 8 --intermediate 2752 --label small
    .venv/bin/python benchmarks/registry.py --skip-minilm        # the 1.9 GB model; BENCHMARKS.md + JSON
    .venv/bin/python benchmarks/registry.py --skip-llama --label minilm   # the MiniLM storage figures only
    .venv/bin/python benchmarks/registry.py --render             # the section again from results/registry-*.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / "benchmarks" / "work" / "registry"
SECTION_BEGIN = "<!-- benchmarks/registry.py: begin -->"
SECTION_END = "<!-- benchmarks/registry.py: end -->"
WARM_TARGET = 1.25  # the bar: warm download time at most this times the static-file baseline
CONCURRENT = 8
# (seed, learning rate) of the five MiniLM fine-tunes: 40 AdamW steps each (the compression benchmark's recipe
# runs 400 at 2e-5; 40 steps at 2e-4 move the weights about as far)
MINILM_TUNES = ((1, 2e-5), (2, 5e-5), (3, 1e-4), (4, 2e-4), (5, 4e-4))
MINILM_STEPS = 40
MINILM_DTYPES = ("fp32", "fp16", "bf16")
# the LLaMA-shaped synthetic fine-tunes: noise std (1.6e-5 is apply.py's fine-tune-like pair, the one served)
LLAMA_NOISES = (1.0e-5, 1.6e-5, 2.5e-5)
SERVED = 1  # index into LLAMA_NOISES


# --------------------------------------------------------------------------------------------------
# Small helpers (no torch: the server and client processes import this module too)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def page_cache_fraction(paths: Sequence[Path]) -> float | None:
    """The share of the files' bytes in the page cache (util-linux ``fincore``), or None without it."""
    paths = [p for p in paths if p.stat().st_size > 0]
    if not paths or shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    resident = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            res, total = line.split()
            resident, size = resident + int(res), size + int(total)
    return resident / size if size else None


def drop_caches() -> str:
    """Try the kernel's global drop (root only, and only where the sandbox allows it); says what happened."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"refused ({e.strerror})"
    return "done"


def evict_files(paths: Sequence[Path]) -> None:
    """Drop the files' clean pages from the page cache (``POSIX_FADV_DONTNEED`` after a sync): no privilege
    needed, and only these files, not the other engineers' on this machine."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env |= extra
    return env


# --------------------------------------------------------------------------------------------------
# The server process: `deltakit serve`'s serve(), plus a static mount and a rebuild counter


def serve_main(home: Path, port: int, ready: Path) -> None:
    """Run the service on ``home`` as ``deltakit serve`` does, with two additions for the benchmark only:
    ``/static/<commit>/files/<path>`` (StaticFiles over the rebuild cache) and ``/bench/...`` (rebuilds counted
    by wrapping ``ModelStore._build``, and an eviction of one cache entry)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from starlette.staticfiles import StaticFiles

    from deltakit.modelstore import ModelStore
    from deltakit_service import server
    from deltakit_service.settings import Settings

    class LargeChunkFiles(StaticFiles):
        """StaticFiles whose responses read 1 MiB at a time, as /hub's do (Starlette's default is 64 KiB)."""

        def file_response(self, *args: Any, **kwargs: Any) -> Any:
            response = super().file_response(*args, **kwargs)
            response.chunk_size = 1 << 20
            return response

    rebuilds: list[dict[str, Any]] = []
    build = ModelStore._build

    def counted(self: ModelStore, revision: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        build(self, revision, *args, **kwargs)
        rebuilds.append({"repo": revision.repo_id, "commit": revision.commit, "s": time.perf_counter() - start})

    ModelStore._build = counted  # type: ignore[method-assign]
    create_app = server.create_app

    def create(settings: Settings) -> FastAPI:
        app = create_app(settings)
        (settings.home / "cache").mkdir(parents=True, exist_ok=True)
        app.mount("/static", StaticFiles(directory=settings.home / "cache"), name="static")
        app.mount("/static-1m", LargeChunkFiles(directory=settings.home / "cache"), name="static-1m")

        @app.get("/bench/rebuilds")
        def _rebuilds() -> list[dict[str, Any]]:
            return rebuilds

        @app.post("/bench/evict/{commit}")
        def _evict(commit: str) -> dict[str, bool]:
            return {"evicted": app.state.models.cache.evict(commit)}

        service_lifespan = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: FastAPI) -> Iterator[None]:  # type: ignore[misc]
            async with service_lifespan(a):
                models_by = "service"
                if getattr(a.state, "models", None) is None:  # the service does not open the store (yet)
                    a.state.models = ModelStore(settings.home)
                    models_by = "benchmark"
                tmp = ready.with_suffix(".tmp")
                tmp.write_text(json.dumps({"models_by": models_by, "pid": os.getpid()}))
                os.replace(tmp, ready)
                yield

        app.router.lifespan_context = lifespan
        return app

    server.create_app = create  # type: ignore[assignment]
    server.serve("127.0.0.1", port, Settings(home=home))


class Server:
    """The server process, started and stopped by pid."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home, self.log = home, log
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready = home / "bench-ready.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.models_by = ""

    def __enter__(self) -> Server:
        self.ready.unlink(missing_ok=True)
        command = [sys.executable, __file__, "_serve", str(self.home), str(self.port), str(self.ready)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=_child_env())
        deadline = time.monotonic() + 120
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        self.models_by = json.loads(self.ready.read_text())["models_by"]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _call(self, method: str, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(self.url + path, method=method), timeout=600) as r:
            return json.loads(r.read())

    def rebuilds(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/bench/rebuilds"))

    def evict(self, commit: str) -> bool:
        return bool(self._call("POST", f"/bench/evict/{commit}")["evicted"])


# --------------------------------------------------------------------------------------------------
# Client processes: snapshot_download from /hub, or huggingface_hub's http_get from /static


def download_main(spec: dict[str, Any]) -> None:
    """One downloader (its own process, its own HF cache): waits for ``go`` if given, downloads, prints a JSON
    line with its start, end and bytes, and the SHA-256 of every file it got (hashed after the clock stops)."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import http_get

    dest = Path(spec["dest"])
    go = spec.get("go")
    while go is not None and not Path(go).exists():
        time.sleep(0.002)
    start = time.time()
    if spec["mode"] == "hub":
        folder = Path(
            snapshot_download(spec["repo"], cache_dir=dest / "cache", endpoint=spec["endpoint"], token=spec["token"])
        )
    else:  # the same files, same parallelism (snapshot_download's 8 workers), plain GETs of static files
        folder = dest / "static"

        def fetch(item: tuple[str, int]) -> None:
            path, size = item
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".incomplete")
            with partial.open("wb") as f:
                http_get(f"{spec['static']}/{path}", f, expected_size=size)
            os.replace(partial, target)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(fetch, spec["files"]))
    end = time.time()
    files = {p.relative_to(folder).as_posix(): p.resolve() for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not k.startswith(".cache/")}
    report = {
        "start": start,
        "end": end,
        "bytes": sum(p.stat().st_size for p in files.values()),
        "sha256": {k: _sha256(p) for k, p in files.items()},
    }
    print(json.dumps(report), flush=True)


def _client_env(dest: Path, *, default_timeouts: bool) -> dict[str, str]:
    env = _child_env(HF_HOME=str(dest / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if not default_timeouts:  # a cold request waits for the rebuild before its first byte; the default is 10 s
        env |= {"HF_HUB_ETAG_TIMEOUT": "600", "HF_HUB_DOWNLOAD_TIMEOUT": "600"}
    return env


def start_clients(specs: Sequence[dict[str, Any]]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            [sys.executable, __file__, "_download", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_client_env(Path(spec["dest"]), default_timeouts=spec.get("default_timeouts", False)),
        )
        for spec in specs
    ]


def finish_clients(processes: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    reports = []
    for p in processes:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"a downloader failed ({p.returncode}):\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


# --------------------------------------------------------------------------------------------------
# Storage


def _store_bytes(home: Path) -> int:
    """Bytes of every object the store holds (content-addressed: a shared file counted once)."""
    return _tree_bytes(home / "store")


def store_set(home: Path, base: Path, tunes: dict[str, Path], base_repo: str) -> dict[str, Any]:
    """Import ``base`` whole and each fine-tune against it into a fresh store at ``home``; what each costs."""
    from deltakit.modelstore import ModelStore

    if home.exists():
        shutil.rmtree(home)
    store = ModelStore(home)
    try:
        start = time.perf_counter()
        report = store.import_model(base_repo, base)
        rows = [_import_row(report, time.perf_counter() - start, "whole")]
        for repo, folder in tunes.items():
            start = time.perf_counter()
            report = store.import_model(repo, folder, base=base_repo)
            rows.append(_import_row(report, time.perf_counter() - start, "delta"))
    finally:
        store.close()
    full = sum(r["full_bytes"] for r in rows)
    stored = _store_bytes(home)
    return {"models": rows, "full_bytes": full, "store_bytes": stored, "ratio": stored / full}


def _import_row(report: Any, seconds: float, storage: str) -> dict[str, Any]:
    if report.storage != storage:
        raise RuntimeError(f"{report.repo_id} was stored {report.storage}, not {storage}: {report.note}")
    return {
        "repo": report.repo_id,
        "storage": report.storage,
        "stored_bytes": report.stored_bytes,
        "full_bytes": report.full_bytes,
        "import_s": seconds,
        "note": report.note,
    }


def minilm_storage(work: Path) -> dict[str, Any]:
    from finetune import build_pair

    tunes = []
    for seed, lr in MINILM_TUNES:
        folder = build_pair(work / "minilm" / f"tune{seed}", steps=MINILM_STEPS, seed=seed, lr=lr)
        tunes.append((seed, lr, folder, json.loads((folder / "recipe.json").read_text())))
    result: dict[str, Any] = {
        "steps": MINILM_STEPS,
        "tunes": [
            {"seed": s, "lr": lr, "loss_first_20": r["loss_mean_first_20"], "loss_last_20": r["loss_mean_last_20"]}
            for s, lr, _, r in tunes
        ],
        "model_package": tunes[0][3]["model_package"],
        "dtypes": {},
    }
    for dtype in MINILM_DTYPES:
        base = tunes[0][2] / dtype / "base"
        for _, _, folder, _ in tunes[1:]:  # one base: the packaged weights, cast the same way every time
            if _sha256(folder / dtype / "base" / "model.safetensors") != _sha256(base / "model.safetensors"):
                raise RuntimeError(f"{folder / dtype / 'base'} differs from {base}")
        result["dtypes"][dtype] = store_set(
            work / f"store-minilm-{dtype}",
            base,
            {f"minilm/tune{s}-lr{lr:g}": folder / dtype / "finetune" for s, lr, folder, _ in tunes},
            "minilm/all-MiniLM-L6-v2",
        )
        shutil.rmtree(work / f"store-minilm-{dtype}")
    return result


def llama_set(work: Path, shape: Any) -> tuple[Path, dict[str, Path], float]:
    """The base and the synthetic fine-tunes (one base: the generator's seed fixes it)."""
    from deltakit.examples import write_llama_pair

    start = time.perf_counter()
    base: Path | None = None
    tunes = {}
    for i, noise in enumerate(LLAMA_NOISES):
        pair_base, tuned = write_llama_pair(work / f"llama-{i}", shape=shape, extra_vocab=256, noise=noise)
        if base is None:
            base = pair_base
        else:
            for f in base.glob("*.safetensors"):
                if _sha256(f) != _sha256(pair_base / f.name):
                    raise RuntimeError(f"{pair_base / f.name} differs from {f}")
            shutil.rmtree(pair_base)
        tunes[f"llama/finetune-noise-{noise:.1e}".replace("+", "").replace("-0", "-")] = tuned
    assert base is not None
    return base, tunes, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Serving


def _server_files(home: Path, commit: str) -> list[Path]:
    return [p for p in (home / "cache" / commit / "files").rglob("*") if p.is_file()]


def _object_files(home: Path) -> list[Path]:
    return [p for p in (home / "store").rglob("*") if p.is_file()]


@contextlib.contextmanager
def _downloads(work: Path, name: str) -> Iterator[Path]:
    folder = work / "downloads" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        os.sync()  # the downloads' dirty pages written out before the next timed step


def serving(work: Path, home: Path, repo: str, *, repeat: int, concurrent: int, log: Path) -> dict[str, Any]:
    from deltakit.modelstore import ModelStore
    from deltakit_service.store import Store

    store = ModelStore(home)
    rev = store.revision(repo)
    expected = {f.path: f.sha256 for f in rev.files}
    files = [(f.path, f.size) for f in rev.files]
    full = rev.full_bytes
    store.close()
    tokens = Store(home / "jobs.sqlite3")
    token = tokens.create_token("read")
    tokens.close()
    result: dict[str, Any] = {"repo": repo, "full_bytes": full, "stored_bytes": rev.stored_bytes, "runs": []}

    def run(kind: str, server: Server, n: int = 1, default_timeouts: bool = False) -> dict[str, Any]:
        with _downloads(work, kind) as dest:
            specs = [
                {
                    "mode": "static" if kind.startswith("static") else "hub",
                    "repo": repo,
                    "endpoint": server.url + "/hub",
                    "token": token,
                    "static": f"{server.url}/{kind}/{rev.commit}/files",
                    "files": files,
                    "dest": str(dest / str(i)),
                    "go": str(dest / "go") if n > 1 else None,
                    "default_timeouts": default_timeouts,
                }
                for i in range(n)
            ]
            before = len(server.rebuilds())
            server_cached = (
                page_cache_fraction(_server_files(home, rev.commit)) if not kind.startswith("cold") else None
            )
            objects_cached = page_cache_fraction(_object_files(home))
            processes = start_clients(specs)
            if n > 1:
                time.sleep(3.0)  # every client imported and waiting
                go = time.time()
                (dest / "go").write_bytes(b"")
            reports = finish_clients(processes)
            if n == 1:
                go = reports[0]["start"]
            for r in reports:
                if r["sha256"] != expected:
                    bad = sorted(k for k in expected if r["sha256"].get(k) != expected[k])
                    raise RuntimeError(f"{kind}: downloaded files differ from the imported ones: {bad}")
            rebuilt = server.rebuilds()[before:]
            row = {
                "kind": kind,
                "clients": n,
                "s": max(r["end"] for r in reports) - go,
                "client_s": [r["end"] - r["start"] for r in reports],
                "bytes": sum(r["bytes"] for r in reports),
                "rebuilds": len(rebuilt),
                "rebuild_s": [b["s"] for b in rebuilt],
                "served_files_in_page_cache": server_cached,
                "store_objects_in_page_cache": objects_cached,
                "sha256_equal": True,
            }
            result["runs"].append(row)
            print(f"  {kind} x{n}: {row['s']:.2f} s, {row['bytes'] / row['s'] / 1e6:.0f} MB/s, rebuilds {len(rebuilt)}")
            return row

    def make_cold(server: Server) -> None:
        if not server.evict(rev.commit):
            raise RuntimeError(f"the cache entry of {rev.commit} is held; cannot make it cold")
        if "drop_caches" not in result:  # once: it empties the page cache of everyone on this machine
            result["drop_caches"] = drop_caches()
        evict_files(_object_files(home))

    with Server(home, log) as server:
        result["models_by"] = server.models_by
        for _ in range(2):
            make_cold(server)
            run("cold", server)
        for _ in range(repeat):  # interleaved, so that the machine's load falls on both alike
            run("warm", server)
            run("static", server)
            run("static-1m", server)
        make_cold(server)
        run("cold", server, concurrent)
        # once more cold, with the client's default timeouts (10 s to a HEAD's answer): does it wait?
        make_cold(server)
        try:
            row = run("cold-default-timeouts", server, default_timeouts=True)
            result["default_timeouts"] = f"succeeded in {row['s']:.2f} s"
        except RuntimeError as e:
            result["default_timeouts"] = "failed: " + str(e).strip().splitlines()[-1][:300]
    return result


# --------------------------------------------------------------------------------------------------
# The report


def _best(runs: Sequence[dict[str, Any]], kind: str, clients: int = 1) -> list[float]:
    return sorted(r["s"] for r in runs if r["kind"] == kind and r["clients"] == clients)


STATICS = {
    "static": "the same cache files, a Starlette `StaticFiles` mount (64 KiB reads)",
    "static-1m": "the same, `StaticFiles` reading 1 MiB at a time (as `/hub` does)",
}


def summarize(serve: dict[str, Any]) -> dict[str, Any]:
    """Best and median of each kind of run, and the ratios the verdicts are made of."""
    runs = serve["runs"]
    full = serve["full_bytes"]
    times = {kind: _best(runs, kind) for kind in ("warm", "cold", *STATICS)}
    times = {kind: t for kind, t in times.items() if t}
    best = {kind: t[0] for kind, t in times.items()}
    median = {
        kind: t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2 for kind, t in times.items()
    }
    baseline = min((k for k in STATICS if k in best), key=lambda k: best[k])  # the faster static: the stricter bar
    together = next(r for r in runs if r["clients"] > 1)
    return {
        "best_s": best,
        "median_s": median,
        "mb_s": {kind: full / t / 1e6 for kind, t in best.items()},
        "baseline": baseline,
        "warm_to_static": best["warm"] / best[baseline],
        "warm_to_static_median": median["warm"] / median[baseline],
        "warm_to_each_static": {k: best["warm"] / best[k] for k in STATICS if k in best},
        "cold_to_warm": best["cold"] / best["warm"],
        "rebuild_s": sum(
            min((r for r in runs if r["kind"] == "cold" and r["clients"] == 1), key=lambda r: r["s"])["rebuild_s"]
        ),
        "concurrent_clients": together["clients"],
        "concurrent_s": together["s"],
        "concurrent_rebuilds": together["rebuilds"],
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _storage_table(title: str, sets: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"| {title} | models | full copies | store holds | % of full copies | fine-tunes' deltas, % of their size "
        "| stored: base + fine-tunes, each |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, s in sets.items():
        deltas = [m for m in s["models"] if m["storage"] == "delta"]
        tuned = sum(m["stored_bytes"] for m in deltas) / sum(m["full_bytes"] for m in deltas)
        each = ", ".join(
            f"{_mb(m['stored_bytes'])} ({100 * m['stored_bytes'] / m['full_bytes']:.0f}%)" for m in s["models"]
        )
        lines.append(
            f"| {label} | {len(s['models'])} | {_mb(s['full_bytes'])} | {_mb(s['store_bytes'])} | "
            f"{100 * s['ratio']:.1f}% | {100 * tuned:.1f}% | {each} |"
        )
    return lines


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """The section, from the JSON of each run (a smaller model first, then the 1.9 GB one)."""
    lines = [
        SECTION_BEGIN,
        "## registry: fine-tunes stored as deltas, served to huggingface_hub",
        "",
        "`benchmarks/registry.py`. Each run's figures were measured in that one run; runs below in the order made.",
    ]
    minilm = next((r["minilm"] for r in reversed(results) if r.get("minilm")), None)
    for r in results:
        m = r["machine"]
        lines += [
            "",
            f"- Run `{r['label']}`: {r['date']}, `{r['command']}`; {m['cpus']} CPUs ({m['cpu_model']}), "
            f"{m['ram_gib']} GiB RAM, shared with other work (load average {r['load_average']}); Python "
            f"{m['python']}, huggingface_hub {r['huggingface_hub']}, uvicorn {r['uvicorn']}, starlette "
            f"{r['starlette']}; deltakit {m['deltakit']} ({m['deltakit_source']}).",
        ]
    if minilm is not None:
        tunes = "; ".join(
            f"seed {t['seed']} lr {t['lr']:g}, mean loss {t['loss_first_20']:.2f} over the first 20 steps and "
            f"{t['loss_last_20']:.2f} over the last 20"
            for t in minilm["tunes"]
        )
        reference = ""
        with contextlib.suppress(OSError, ValueError, KeyError):
            held = json.loads((RESULTS / "compression.json").read_text())["results"]
            reference = "; its payload was " + ", ".join(
                f"{100 * c['payload_bytes'] / c['baselines']['target_bytes']:.1f}% of the target in {c['dtype']}"
                for c in held
            )
        lines += [
            "",
            "### Storage: five real fine-tunes of one base",
            "",
            f"{minilm['model_package']} (all-MiniLM-L6-v2) fine-tuned five times with `benchmarks/finetune.py`'s "
            f"recipe (AdamW on every weight, contrastive sentence objective), {minilm['steps']} steps each "
            f"({tunes}): short runs, so that five fit in minutes on this machine (the compression section's "
            f"fine-tune runs 400 steps at 2e-5{reference}). Each dtype is its own store: "
            "the base imported whole, the five fine-tunes imported with `--base`, stored as format 2 deltas "
            "(each import checks that its delta rebuilds every original file byte for byte). 'store holds' is "
            "every object in the store (content-addressed, so a file shared by several revisions counts once); "
            "'full copies' is the base plus five fine-tunes as imported.",
            "",
            *_storage_table("MiniLM dtype", minilm["dtypes"]),
        ]
    for r in results:
        if "llama" not in r:
            continue
        llama = r["llama"]
        shape = llama["shape"]
        lines += [
            "",
            f"### Run `{r['label']}`: LLaMA-shaped, hidden {shape['hidden']}, {shape['layers']} layers, "
            f"fp16, {_mb(llama['storage']['models'][0]['full_bytes'])} base",
            "",
            "**Synthetic fine-tunes, not real ones**: `write_llama_pair` with noise "
            f"{', '.join(f'{n:g}' for n in llama['noises'])} "
            "(Gaussian noise on every weight, an ulp or two in fp16, 256 more vocabulary rows), one base.",
            "",
            *_storage_table("set", {"LLaMA-shaped": llama["storage"]}),
        ]
        serve = r["serving"]
        s = summarize(serve)
        labels = {
            "cold": "cold: rebuild (apply the delta, re-lay the files, SHA-256) and transfer",
            "warm": "warm: from the rebuild cache through `/hub`",
            **STATICS,
        }
        rows = [
            f"| {label} | {s['best_s'][k]:.2f} | {s['median_s'][k]:.2f} | {s['mb_s'][k]:.0f} |"
            for k, label in labels.items()
            if k in s["best_s"]
        ]
        together_mb_s = s["concurrent_clients"] * serve["full_bytes"] / s["concurrent_s"] / 1e6
        opened = "the service did not set app.state.models yet" if serve["models_by"] == "benchmark" else "its own"
        met = "met" if s["warm_to_static"] <= WARM_TARGET else "not met"
        one = s["concurrent_rebuilds"] == 1
        runs = "; ".join(
            f"{x['kind']}{'' if x['clients'] == 1 else ' x' + str(x['clients'])} {x['s']:.2f}" for x in serve["runs"]
        )
        default_rebuild = [t for x in serve["runs"] if x["kind"] == "cold-default-timeouts" for t in x["rebuild_s"]]
        warm_cache = [
            x["served_files_in_page_cache"] for x in serve["runs"] if x["kind"] == "warm" or x["kind"] in STATICS
        ]
        cold_objects = [x["store_objects_in_page_cache"] for x in serve["runs"] if x["kind"].startswith("cold")]
        lines += [
            "",
            f"Serving `{serve['repo']}` ({_mb(serve['full_bytes'])} of files, stored in {_mb(serve['stored_bytes'])}) "
            "with `snapshot_download` into an empty HF cache, one client process per downloader:",
            "",
            "| download | best wall s | median s | MB/s (best) |",
            "|---|---:|---:|---:|",
            *rows,
            f"| {s['concurrent_clients']} concurrent cold downloaders (until the last finished) | "
            f"{s['concurrent_s']:.2f} | - | {together_mb_s:.0f} |",
            "",
            f"- Warm download within {WARM_TARGET}x of the static files: **{met}** ({s['warm_to_static']:.2f}x best "
            f"against the faster static's best; medians {s['warm_to_static_median']:.2f}x; against each: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in s["warm_to_each_static"].items())
            + ").",
            f"- Cold download {s['best_s']['cold']:.2f} s, {s['cold_to_warm']:.1f}x the warm one; of it, the rebuild "
            f"{s['rebuild_s']:.2f} s (timed inside the service, in that same run).",
            "- Every run but one raised the client's `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT` to 600 s, "
            "since a cold request gets its first byte only once the rebuild is done. The last cold download kept "
            f"the defaults (10 s): {serve.get('default_timeouts', 'not tried')}"
            + (f", with a rebuild of {default_rebuild[0]:.2f} s behind it" if default_rebuild else "")
            + ".",
            f"- {s['concurrent_clients']} concurrent downloaders of one cold model caused "
            f"**{s['concurrent_rebuilds']} rebuild{'s' if s['concurrent_rebuilds'] != 1 else ''}** "
            f"({'met' if one else 'not met'}); every downloader's files had the originals' SHA-256, as in every run.",
            f"- Page cache: served files resident before warm/static runs: "
            f"{', '.join(f'{100 * c:.0f}%' for c in warm_cache if c is not None)}; before each cold run the store's "
            "objects (base and delta) were dropped with `posix_fadvise(DONTNEED)` and measured resident at "
            f"{', '.join(f'{100 * c:.0f}%' for c in cold_objects if c is not None)} (`fincore`); the global "
            f"`echo 3 > /proc/sys/vm/drop_caches`, tried once before the first cold run: "
            f"{serve.get('drop_caches', 'not tried')} (once only: it empties other work's page cache too; that "
            "first cold run had everything cold, Python's and the service's own code included). "
            "The disk is a virtual one: the host may "
            "still cache what the guest dropped. Warm and static runs read the same files from memory; "
            "downloads land in the client's page cache (no fsync), alike for both.",
            f"- The model store was opened by the {serve['models_by']} ({opened}).",
            f"- All runs, wall seconds, in order: {runs}.",
        ]
    lines += [
        "",
        "The static baseline is served by the same uvicorn process, through the same HTTP stack, from the same "
        "files (the service's rebuild cache), so the ratio is what `/hub` adds: the listing and per-file "
        "requests snapshot_download makes (model info, tree, HEAD per file), token checks, and its own file "
        "streaming, against Starlette's `FileResponse`. The client for the baseline is huggingface_hub's "
        "`http_get`, the loop snapshot_download itself downloads with, over the same 8 worker threads.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("huggingface_hub", "uvicorn", "starlette")}


def llama_runs(llama: Path, shape: Any, repeat: int, result: dict[str, Any]) -> None:
    """The LLaMA-shaped set's storage, then the serving figures of one of its fine-tunes; ``llama`` is removed."""
    shutil.rmtree(llama, ignore_errors=True)
    llama.mkdir()
    try:
        print("LLaMA-shaped set ...", flush=True)
        base, tunes, generate_s = llama_set(llama, shape)
        home = llama / "home"
        storage = store_set(home, base, tunes, "llama/base")
        result["llama"] = {
            "shape": {k: getattr(shape, k) for k in ("vocab", "hidden", "layers", "intermediate", "heads")},
            "noises": list(LLAMA_NOISES),
            "generate_s": generate_s,
            "storage": storage,
        }
        for folder in [*tunes.values(), base]:  # the originals are not needed for serving: free the disk
            shutil.rmtree(folder.parent, ignore_errors=True)
        print("serving ...", flush=True)
        served = list(tunes)[SERVED]
        result["serving"] = serving(llama, home, served, repeat=repeat, concurrent=CONCURRENT, log=llama / "server.log")
        result["summary"] = summarize(result["serving"])
    finally:
        shutil.rmtree(llama, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_serve":
        serve_main(Path(argv[1]), int(argv[2]), Path(argv[3]))
        return 0
    if argv and argv[0] == "_download":
        download_main(json.loads(argv[1]))
        return 0

    from common import LLAMA_1_9GB, add_shape_arguments, machine, record, shape_from

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder (default: %(default)s)")
    p.add_argument("--label", default="1.9GB", help="the run's name in the JSON file and the section")
    p.add_argument("--repeat", type=int, default=3, help="warm and static downloads of each kind (cold: 2)")
    p.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM storage figures")
    p.add_argument("--skip-llama", action="store_true", help="only the MiniLM storage figures")
    p.add_argument("--no-record", action="store_true", help="print, write neither JSON nor BENCHMARKS.md")
    p.add_argument(
        "--render", action="store_true", help="only rewrite the section from benchmarks/results/registry-*.json"
    )
    add_shape_arguments(p, LLAMA_1_9GB)
    args = p.parse_args(argv)
    if args.render:
        render(record)
        return 0
    shape = shape_from(args)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    result: dict[str, Any] = {
        "label": args.label,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/registry.py " + " ".join(argv),
        "machine": machine(("deltakit", "service", "benchmarks/registry.py")),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        **_versions(),
    }
    if not args.skip_minilm:
        print("MiniLM fine-tunes and their stores ...", flush=True)
        result["minilm"] = minilm_storage(work)
    if not args.skip_llama:
        llama_runs(work / "llama", shape, args.repeat, result)
    result["load_average_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(json.dumps(result.get("summary"), indent=2))
    if args.no_record:
        (work / f"registry-{args.label}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"registry-{args.label}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    render(record)
    return 0


def render(record: Any) -> None:
    """BENCHMARKS.md's section from every ``registry-*.json``, oldest run first (by the date each records)."""
    runs = [json.loads(p.read_text()) for p in RESULTS.glob("registry-*.json")]
    runs.sort(key=lambda r: r["date"])
    record(ROOT / "BENCHMARKS.md", markdown(runs), SECTION_BEGIN, SECTION_END)


if __name__ == "__main__":
    sys.exit(main())
