"""Run jobs on a bounded pool of worker threads, recording progress in the store.

A job runs one library call. Its progress callback writes to the store a few times a second and is
where cancellation lands: it raises, the library's staging folder removes the half-built output,
and the job ends ``cancelled``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from deltakit import apply_delta, make_delta, verify_delta, verify_model
from deltakit.cluster import ClusterOptions, apply_delta_on_ray, ray_module
from deltakit.errors import DeltakitError, InputNotFoundError, IntegrityError, UnsupportedInputError
from deltakit.gguf import GGUFReport, apply_to_gguf, convert_to_gguf
from deltakit.hashing import file_sha256
from deltakit.modelstore import ModelStore, RepoRevision
from deltakit.progress import ProgressBar
from deltakit.registry import Entry, Registry
from deltakit.signing import trusted_keys
from deltakit.staging import remove_abandoned

from .executor import RayExecutor
from .problems import problem_fields
from .settings import Settings
from .store import ACTIVE, Job, Store

log = logging.getLogger(__name__)

_FLUSH_SECONDS = 0.25
_REBUILD_WORKERS = 2
# an absolute path inside a message: a slash after a space, quote or bracket, up to the next one
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"()\[\]:,]+")


def _replace_prefix(text: str, prefix: str, name: str) -> str:
    """``prefix`` (a whole path, or the start of one) replaced by ``name``, or removed when ``name`` is
    empty, so that what follows it reads relative."""

    def replacement(match: re.Match[str]) -> str:
        if name:
            return name + match[1]
        return "" if match[1] == "/" else "."

    return re.sub(re.escape(prefix) + r"(/|(?![\w.-]))", replacement, text)


_INTERRUPTED = {"type": "Interrupted", "detail": "the service stopped while this job ran; run it again"}


class JobCancelled(Exception):
    """Raised inside a running job when it is cancelled."""


class JobInterrupted(Exception):
    """Raised inside a running job when the service stops."""


class NameOutsideRoots(DeltakitError, PermissionError):
    """A registered name points outside the folders the service may read."""


class _JobBar:
    """The library's progress bar, as the service sees it: bytes into the store, cancellation out.

    A job may hold bars inside one another (a rebuild's bar around the apply's): each writes its own stage,
    total and count, so the job shows the bar that moved last, never one bar's count against another's total."""

    def __init__(self, runner: Runner, job_id: str, total: int, stage: str) -> None:
        self._runner, self._job_id, self._done = runner, job_id, 0
        self._total, self._stage = total, stage
        self._last = 0.0
        runner.store.update(job_id, bytes_total=total, bytes_done=0, stage=stage)

    def update(self, n: int) -> None:
        self._done += n
        self._runner.check(self._job_id)
        now = time.monotonic()
        if now - self._last >= _FLUSH_SECONDS:
            self._last = now
            self._flush()

    def _flush(self) -> None:
        self._runner.store.update(self._job_id, bytes_done=self._done, bytes_total=self._total, stage=self._stage)

    def close(self) -> None:
        self._flush()


class Runner:
    """Owns the worker pool; the store owns the state."""

    def __init__(self, settings: Settings, store: Store, registry: Registry, models: ModelStore | None = None) -> None:
        self.settings, self.store, self.registry = settings, store, registry
        self.models = models
        self._rebuild_lock = threading.Lock()
        self._rebuilds: dict[str, str] = {}  # commit -> the rebuild job that is queued or running for it
        self.executor: RayExecutor | None = None
        if settings.executor == "ray":
            ray_module()  # refused at start, naming the extra, when Ray is not installed
            self.executor = RayExecutor(
                settings.ray_address, settings.ray_job_cpus, settings.ray_job_memory, settings.ray_retries
            )
        self._pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="deltakit-job")
        # Rebuilds have threads of their own: a download waits on its rebuild, never behind a long apply.
        self._rebuild_pool = ThreadPoolExecutor(max_workers=_REBUILD_WORKERS, thread_name_prefix="deltakit-rebuild")
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stop_began: float | None = None
        self._shut = False
        self._futures: dict[str, Future[None]] = {}
        self.abandoned: list[str] = []  # jobs that did not stop within the grace; their threads live on

    # lifecycle -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """After a restart: jobs that were running failed, their temporary output is removed, and
        queued jobs run again."""
        for job in self.store.recent(limit=1_000_000):
            if job.state == "running":
                self._recover_output(job)  # ends the job itself when its output was complete
                self.store.finish(job.id, "failed", error=_INTERRUPTED)
        for folder in (self.settings.models_dir, self.settings.deltas_dir):
            for leftover in remove_abandoned(folder):  # a live build (the CLI's, say) holds its lock
                log.info("removed the temporary output %s of an interrupted job", leftover)
        waiting = {
            str(job.params["upload"]) for job in self.store.queued() if job.kind == "import" and "upload" in job.params
        }
        for folder in sorted(self.uploads_dir.iterdir()) if self.uploads_dir.is_dir() else ():
            if folder.name not in waiting:  # an upload cut off, or whose import job ended with the service
                log.info("removed the upload %s, which no queued import job holds", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
        for job in self.store.queued():
            self.submit(job.id, kind=job.kind)

    @property
    def uploads_dir(self) -> Path:
        """Where uploaded models wait for their import job (one folder per upload)."""
        return self.settings.home / "uploads"

    def begin_stop(self) -> None:
        """Tell running jobs to stop (they do at their next progress update); the grace starts now."""
        if self._stop_began is None:
            self._stop_began = time.monotonic()
        self._stopping.set()

    def _output_path(self, job: Job) -> Path | None:
        """Where a job writes its output (see :meth:`_execute`), or None when it writes none."""
        p = job.params
        if "output" not in p:
            return None
        if job.kind == "convert" or (job.kind == "apply" and p.get("to") == "gguf"):
            return self.settings.models_dir / f"{p['output']}.gguf"
        return (self.settings.deltas_dir if job.kind == "make" else self.settings.models_dir) / str(p["output"])

    def _recover_output(self, job: Job) -> None:
        """A job killed between committing its output and registering it (or recording its end) left
        ``models/NAME`` with no name, which every rerun would refuse as existing. Its output is checked
        against its digests and registered, and the job ends succeeded; one that does not check (or a
        GGUF file, which has no digest to check) is moved aside to ``NAME.unregistered-JOB`` and the
        job fails saying so."""
        out = self._output_path(job)
        if out is None or not (out.exists() or out.is_symlink()):
            return
        name = str(job.params["output"])
        recovered = "the service stopped before this job's end was recorded; its output was checked at the next start"
        entry = self.registry.get(name)
        if entry is not None:
            if Path(entry.path).resolve() == out.resolve():  # registered, only the job's end was lost
                log.warning("job %s: its output %r was registered before the service stopped", job.id, name)
                self.store.finish(job.id, "succeeded", report={"output": name, "recovered": recovered})
            return
        try:
            report = self._check_output(job, out)
        except Exception as e:  # anything that does not check is moved aside, never registered
            aside = out.with_name(f"{out.name}.unregistered-{job.id[:12]}")
            os.rename(out, aside)
            log.warning(
                "job %s: its unregistered output %s did not check (%s); moved aside to %s", job.id, out, e, aside
            )
            detail = (
                f"the service stopped after this job wrote {name!r} and before it registered it; the output did "
                f"not check ({self.public(str(e))}) and was moved aside to {aside.name}; run the job again"
            )
            self.store.finish(job.id, "failed", error={"type": "Interrupted", "detail": detail})
            return
        log.warning("job %s: its output %r was complete but unregistered when the service stopped; checked and "
                    "registered now", job.id, name)  # fmt: skip
        self.store.finish(job.id, "succeeded", report={"output": name, **report, "recovered": recovered})

    def _check_output(self, job: Job, out: Path) -> dict[str, Any]:
        """Check a complete, unregistered output against the digests it must have and register it.

        Raises:
            IntegrityError: it does not match them (and anything that keeps it from being read).
        """
        p = job.params
        if out.suffix == ".gguf" or not out.is_dir():
            raise UnsupportedInputError("a GGUF file has no recorded digest to check it against")
        if job.kind == "make":
            report = verify_delta(out)
        else:
            delta = self.resolve(str(p["delta"]), kind="delta")
            report = verify_model(out, delta.path)
        if not report.ok:
            first = report.mismatched[0].name if report.mismatched else (report.missing or report.extra or ("?",))[0]
            raise IntegrityError(f"{len(report.mismatched) + len(report.missing) + len(report.extra)} of its "
                                 f"tensors or files do not match, {first!r} first")  # fmt: skip
        if job.kind == "make":
            entry = self.registry.add(str(p["output"]), out)
        else:
            size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            entry = self.registry.add_known(str(p["output"]), out, "model", delta.fingerprint, size)
        return {"fingerprint": entry.fingerprint, "verified": True}

    def shutdown(self) -> None:
        """Stop: running jobs end as interrupted (their staging folders removed), queued ones wait for
        the next start. A job still running ``shutdown_grace`` seconds after :meth:`begin_stop` (one
        that never updates its progress) is marked failed and listed in :attr:`abandoned`: its thread
        cannot be stopped, so the process must exit without it, and the next start removes its
        temporary output."""
        if self._shut:
            return
        self._shut = True
        self.begin_stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._rebuild_pool.shutdown(wait=False, cancel_futures=True)
        assert self._stop_began is not None
        grace = self.settings.shutdown_grace
        with self._lock:
            running = dict(self._futures)
        wait_for(running.values(), timeout=max(0.0, self._stop_began + grace - time.monotonic()))
        with self._lock:
            self.abandoned = [job_id for job_id, future in running.items() if not future.done()]
        for job_id in self.abandoned:
            log.error(
                "job %s did not stop within %g s of the service stopping (DELTAKIT_SHUTDOWN_GRACE); it is "
                "marked failed and its temporary output is removed at the next start",
                job_id,
                grace,
            )
            detail = f"the service stopped and this job did not stop within {grace:g} s; run it again"
            self.store.finish(job_id, "failed", error={"type": "Interrupted", "detail": detail})

    # jobs ------------------------------------------------------------------------------------------

    def submit(self, job_id: str, *, kind: str | None = None) -> None:
        """Run the job (of ``kind``: a ``rebuild`` runs on the rebuild threads) when a thread is free."""
        pool = self._rebuild_pool if kind == "rebuild" else self._pool
        future = pool.submit(self._run, job_id)
        with self._lock:
            self._futures[job_id] = future
        future.add_done_callback(lambda _: self._forget(job_id))

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._futures.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)
        if self.store.finish(job_id, "cancelled", only_if="queued"):
            job = self.store.get(job_id)
            if job is not None and job.kind == "import" and "upload" in job.params:  # it will never run
                shutil.rmtree(self.uploads_dir / str(job.params["upload"]), ignore_errors=True)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def check(self, job_id: str) -> None:
        """Called from inside a running job: stop it if it was cancelled or the service is stopping."""
        if self._stopping.is_set():
            raise JobInterrupted
        if self.is_cancelled(job_id):
            raise JobCancelled

    def _progress(self, job_id: str) -> Any:
        def factory(total: int, stage: str) -> ProgressBar:
            return _JobBar(self, job_id, total, stage)

        return factory

    def _call(self, job_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The job's library call, here or on the cluster, with the job's progress bar."""
        progress = self._progress(job_id)
        if self.executor is None:
            return fn(*args, progress=progress, **kwargs)
        try:
            return self.executor.call(fn, *args, progress=progress, check=lambda: self.check(job_id), **kwargs)
        except BaseException:
            for folder in (self.settings.models_dir, self.settings.deltas_dir):
                try:  # a task killed on this machine cannot remove its own staging folder (another's: see staging)
                    remove_abandoned(folder)
                except OSError as e:
                    log.warning("could not clean %s after job %s: %s", folder, job_id, e)
            raise

    def _run(self, job_id: str) -> None:
        try:
            self._run_job(job_id)
        except DeltakitError as e:  # the store could not record the job's start or end (a full disk)
            log.error("job %s: the job store could not record it: %s", job_id, e)

    def _run_job(self, job_id: str) -> None:
        if self._stopping.is_set() or self.is_cancelled(job_id) or not self.store.start(job_id):
            return
        job = self.store.get(job_id)
        assert job is not None
        try:
            report = self._execute(job)
        except JobCancelled:
            self.store.finish(job_id, "cancelled")
        except JobInterrupted:
            self.store.finish(job_id, "failed", error=_INTERRUPTED)
        except DeltakitError as e:
            log.warning("job %s failed: %s", job_id, e)  # the operator's log keeps the server's paths
            error = {"type": type(e).__name__, **problem_fields(e, self.public(str(e)))}
            self.store.finish(job_id, "failed", error=error)
        except Exception as e:  # a bug: recorded on the job, never a crashed worker
            log.exception("job %s failed unexpectedly", job_id)
            self.store.finish(job_id, "failed", error={"type": "InternalError", "detail": self.public(str(e))})
        else:
            self.store.finish(job_id, "succeeded", report=report)

    def public(self, detail: str) -> str:
        """An error message as any token holder may read it: the server's paths become registered
        names, or paths relative to the service's roots, and any other absolute path its last part."""
        prefixes = {}
        for root in (*self.settings.allowed_roots, *self.settings.roots, self.settings.home):
            prefixes[str(root)] = ""
        for name, entry in self.registry.entries().items():
            prefixes[str(Path(entry.path))] = prefixes[str(Path(entry.path).resolve())] = name
        for prefix in sorted(prefixes, key=len, reverse=True):  # the most specific first
            if prefix != "/":
                detail = _replace_prefix(detail, prefix, prefixes[prefix])
        return _ABSOLUTE_PATH.sub(lambda m: ".../" + m[0].rstrip("/").rsplit("/", 1)[-1], detail)

    # name resolution -------------------------------------------------------------------------------

    def resolve(self, name: str, *, kind: str | None = None) -> Entry:
        """A registered name whose real path lies inside the configured roots."""
        entry = self.registry.get(name)
        if entry is None or (kind is not None and entry.kind != kind):
            raise InputNotFoundError(f"no registered {kind or 'model or delta'} is named {name!r}")
        real = Path(entry.path).resolve()
        inside = self._inside_roots
        if not inside(real) or (real.is_dir() and not all(inside(f.resolve()) for f in real.rglob("*"))):
            allowed = ", ".join(map(str, self.settings.allowed_roots))
            raise NameOutsideRoots(
                f"{name!r} resolves outside the folders this service may read ({allowed}: DELTAKIT_HOME and "
                "DELTAKIT_ROOTS); add the folder it lies in to DELTAKIT_ROOTS and restart the service"
            )
        return replace(entry, path=str(real))

    def _inside_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.settings.allowed_roots)

    def resolve_source(self, source: str) -> Path:
        """The model folder an import names over HTTP: a registered model (as :meth:`resolve` finds it), else a
        folder given relative to one of ``DELTAKIT_ROOTS``, whose files all lie inside the roots.

        Raises:
            InputNotFoundError: neither exists (``argument`` ``source``).
            UnsupportedInputError: ``source`` is no relative path of plain parts.
            NameOutsideRoots: the name or folder leads outside the roots.
        """
        if self.registry.get(source) is not None:
            return Path(self.resolve(source, kind="model").path)
        parts = source.split("/")
        if source.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in source or "\0" in source:
            raise UnsupportedInputError(
                f"{source!r} is neither a registered model nor a folder relative to one of the service's roots "
                "(no leading '/', no '..')",
                argument="folder",
            )
        for root in self.settings.roots:
            candidate = root / source
            if not candidate.is_dir():
                continue
            real = candidate.resolve()
            inside = self._inside_roots
            if not inside(real) or not all(inside(f.resolve()) for f in real.rglob("*")):
                raise NameOutsideRoots(
                    f"{source!r} leads outside the folders this service may read (DELTAKIT_HOME and DELTAKIT_ROOTS)",
                    argument="folder",
                )
            return real
        raise InputNotFoundError(
            f"no registered model is named {source!r} and no folder of that name lies inside DELTAKIT_ROOTS",
            argument="folder",
        )

    # the model store ---------------------------------------------------------------------------------

    def model_store(self) -> ModelStore:
        if self.models is None:
            raise UnsupportedInputError("this service has no model store")
        return self.models

    def rebuild_job(self, revision: RepoRevision) -> str | None:
        """The id of the job that rebuilds ``revision`` into the store's cache (the queued or running one,
        else a new one), or None when the revision can be served as it is.

        One job per revision however many ask: the table of running rebuilds, the look at the cache and the
        job's creation happen under one lock, and a rebuild leaves the table only after the cache entry is
        published, so a request that finds no job there finds the entry."""
        models = self.model_store()
        with self._rebuild_lock:
            known = self._rebuilds.get(revision.commit)
            if known is not None:
                job = self.store.get(known)
                if job is not None and job.state in ACTIVE:
                    return known
                del self._rebuilds[revision.commit]  # cancelled while queued: it never ran to forget itself
            if models.is_cached(revision):
                return None
            params = {"repo_id": revision.repo_id, "commit": revision.commit}
            job, created = self.store.create_job("rebuild", params, None)
            self._rebuilds[revision.commit] = job.id
        if created:
            self.submit(job.id, kind="rebuild")
        return job.id

    def _rebuild(self, job: Job) -> dict[str, Any]:
        p = job.params
        try:
            models = self.model_store()
            revision = models.revision(str(p["repo_id"]), str(p["commit"]))
            built = models.ensure_cached(revision, progress=self._progress(job.id))
        finally:
            with self._rebuild_lock:
                if self._rebuilds.get(str(p["commit"])) == job.id:
                    del self._rebuilds[str(p["commit"])]
        return {
            "repo_id": revision.repo_id,
            "commit": revision.commit,
            "storage": revision.storage,
            "rebuilt": built,
            "bytes": revision.full_bytes,
        }

    def _import(self, job: Job) -> dict[str, Any]:
        p = job.params
        upload = self.uploads_dir / str(p["upload"]) if "upload" in p else None
        try:
            folder = upload if upload is not None else self.resolve_source(str(p["source"]))
            report = self.model_store().import_model(
                str(p["repo_id"]),
                folder,
                base=p.get("base"),
                relation=p.get("relation"),
                trusted=trusted_keys(self.settings.trust, home=self.settings.home),
                progress=self._progress(job.id),
            )
        finally:
            if upload is not None:  # imported or not, an upload is used once
                shutil.rmtree(upload, ignore_errors=True)
        return asdict(report)

    def _register(self, out: Path, register: Callable[[], Entry]) -> None:
        """An output that cannot be registered is removed: no unlisted folder or file blocks a retry."""
        try:
            if self.abandoned:  # the job was given up on and marked failed: it must not register now
                raise JobInterrupted
            register()
        except BaseException:
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
            raise

    def _gguf_done(self, name: str, report: GGUFReport) -> dict[str, Any]:
        """Register a GGUF file a job wrote (kind ``gguf``, by its SHA-256) and say what it holds."""
        summed: list[str] = []

        def register() -> Entry:
            sha256, size = file_sha256(report.out)  # inside: a file that cannot be hashed is removed too
            summed.append(sha256)
            return self.registry.add_known(name, report.out, "gguf", sha256, size)

        self._register(report.out, register)
        return {
            "output": name,
            "quant": report.quant,
            "tensors": report.tensors,
            "types": report.types,
            "bytes_written": report.bytes_written,
            "sha256": summed[0],
        }

    def _output(self, folder: Path, file: str, *, name: str | None = None) -> Path:
        """Where an output registered as ``name`` (by default ``file``) goes."""
        if self.registry.get(name or file) is not None:
            raise DeltakitError(f"{name or file!r} is already a registered name; choose another output name")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / file

    def _execute(self, job: Job) -> dict[str, Any]:
        if job.kind == "rebuild":  # the model store's jobs run here, beside the store, whatever the executor
            return self._rebuild(job)
        if job.kind == "import":
            return self._import(job)
        p, call = job.params, functools.partial(self._call, job.id)
        if job.kind == "convert":
            model = self.resolve(p["model"], kind="model")
            out = self._output(self.settings.models_dir, f"{p['output']}.gguf", name=p["output"])
            converted = call(convert_to_gguf, model.path, out, quant=p.get("quant", "f16"))
            return self._gguf_done(p["output"], converted)
        if job.kind == "apply" and p.get("to") == "gguf":
            base = self.resolve(p["base"], kind="model")
            delta = self.resolve(p["delta"], kind="delta")
            out = self._output(self.settings.models_dir, f"{p['output']}.gguf", name=p["output"])
            rebuilt = call(apply_to_gguf, base.path, delta.path, out, quant=p.get("quant", "f16"))
            return self._gguf_done(p["output"], rebuilt) | {"verified": True}
        if job.kind == "apply":
            base = self.resolve(p["base"], kind="model")
            delta = self.resolve(p["delta"], kind="delta")
            out = self._output(self.settings.models_dir, p["output"])
            if p.get("fanout"):  # this thread drives; one task per output shard runs on the cluster
                if self.executor is None:
                    raise UnsupportedInputError(
                        "fanout runs on a Ray cluster: start the service with DELTAKIT_EXECUTOR=ray"
                    )
                st = self.settings
                options = ClusterOptions(num_cpus=st.ray_job_cpus, memory=st.ray_job_memory, retries=st.ray_retries)
                progress = self._progress(job.id)
                applied = apply_delta_on_ray(
                    base.path, delta.path, out, address=st.ray_address, options=options, progress=progress
                )
            else:
                applied = call(apply_delta, base.path, delta.path, out)
            self._register(
                out,
                lambda: self.registry.add_known(p["output"], out, "model", applied.fingerprint, applied.bytes_written),
            )
            return {
                "output": p["output"],
                "fingerprint": applied.fingerprint,
                "tensors": applied.tensors,
                "encodings": applied.encodings,
                "bytes_written": applied.bytes_written,
                "verified": True,
            }
        if job.kind == "make":
            base = self.resolve(p["base"], kind="model")
            target = self.resolve(p["target"], kind="model")
            out = self._output(self.settings.deltas_dir, p["output"])
            coding = {key: p[key] for key in ("format", "level") if key in p}  # else the library's defaults
            made = call(make_delta, base.path, target.path, out, **coding)
            self._register(out, lambda: self.registry.add(p["output"], out))
            return {
                "output": p["output"],
                "encodings": made.encodings,
                "format": made.manifest.format,
                "payload_bytes": made.payload_bytes,
                "target_bytes": made.target_bytes,
                "raw_tensors": list(made.raw_tensors),
                "dropped": list(made.dropped),
            }
        # verify
        delta = self.resolve(p["delta"], kind="delta")
        if p.get("model"):
            report = call(verify_model, self.resolve(p["model"], kind="model").path, delta.path)
        else:
            base_path = self.resolve(p["base"], kind="model").path if p.get("base") else None
            report = call(verify_delta, delta.path, base=base_path)
        return {
            "ok": report.ok,
            "checked": report.checked,
            "missing": list(report.missing),
            "extra": list(report.extra),
            "mismatched": [{"name": m.name, "expected": m.expected, "actual": m.actual} for m in report.mismatched],
        }
