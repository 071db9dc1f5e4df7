"""One large apply fanned out over a Ray cluster: one task per output shard, checked by the driver.

The driver plans as :func:`~deltakit.engine.apply_delta` does and refuses a wrong base (sampled digests)
before anything goes to the cluster. Each task plans again from the same paths (cheap: headers and the
manifest), rebuilds its own shard into the shared staging folder, checks each tensor as it ends, fsyncs
the file and returns the tensors' digests; the driver checks every digest against the manifest, writes
the index and the carried files, and renames the folder into place. Until then nothing is under the
output's name, and any failure removes the staging folder.

Inputs and the output must lie on a filesystem every node mounts at the same path (NFS, a parallel
filesystem): each task checks that it sees them and says so when it does not. A task whose worker dies
is retried by Ray (``retries`` times); its half-written shard is replaced by the retry.

Ray is the optional extra ``ray``: ``pip install 'deltakit-llm[ray]'``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.apply import ApplyPlan, ApplyReport, apply_shard, plan_apply
from .errors import ClusterError, DeltakitError, IntegrityError, UnsupportedInputError
from .layout import DEFAULT_SHARD_SIZE
from .progress import ProgressFactory, no_progress
from .staging import StagedFolder, check_free_space, check_output_free

__all__ = ["RAY_EXTRA", "ClusterOptions", "apply_delta_on_ray", "connect"]

RAY_EXTRA = "pip install 'deltakit-llm[ray]'"


@dataclass(frozen=True)
class ClusterOptions:
    """What each task asks of the cluster, and how often a task whose worker died is run again.

    Attributes:
        num_cpus: CPUs a task holds (apply reads and decodes on two threads).
        memory: bytes of memory a task holds (apply's peak is a few hundred MiB, whatever the model).
        retries: how many times a task is run again after its worker died.
    """

    num_cpus: float = 1
    memory: int = 1 << 30
    retries: int = 2


def ray_module() -> Any:
    """Ray, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as e:
        raise UnsupportedInputError(f"running on a Ray cluster needs Ray, which is not installed: {RAY_EXTRA}") from e
    return ray


_CONNECTING = threading.Lock()


def connect(address: str | None) -> Any:
    """Join the cluster at ``address`` (``auto``: the one this machine belongs to; ``None``: RAY_ADDRESS,
    else a local instance). Already connected: nothing to do. Safe from several threads at once."""
    ray = ray_module()
    with _CONNECTING:
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address or None, log_to_driver=False, configure_logging=False, ignore_reinit_error=True
                )
            except ConnectionError as e:
                raise ClusterError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: {e}") from e
    return ray


def _shard_task(
    base: str, delta: str, shard_size: int, index: int, folder: str, verified: Sequence[str]
) -> dict[str, Any]:
    """On a worker: rebuild one output shard; returns its digests, and where it ran."""
    for path in (base, delta, folder):
        if not os.path.exists(path):
            raise ClusterError(
                f"a worker on {socket.gethostname()} cannot see {path}: inputs and outputs must lie on a "
                "filesystem every node of the cluster mounts at the same path"
            )
    plan = plan_apply(base, delta, shard_size=shard_size)
    digests = apply_shard(plan, index, Path(folder), set(verified))
    return {"digests": digests, "node": socket.gethostname(), "pid": os.getpid()}


def apply_delta_on_ray(
    base: str | Path,
    delta: str | Path,
    out: str | Path,
    *,
    address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    options: ClusterOptions = ClusterOptions(),
    replace: bool = False,
    progress: ProgressFactory = no_progress,
) -> ApplyReport:
    """:func:`~deltakit.engine.apply_delta`, one Ray task per output shard; the same output, byte for byte.

    Raises:
        BaseMismatchError: the base is not the one the delta was made from (before any task starts).
        IntegrityError: a shard's tensors do not match the manifest.
        ClusterError: a worker cannot see the paths, or died more often than ``options.retries``.
    """
    base, delta, out = Path(base).absolute(), Path(delta).absolute(), Path(out).absolute()
    check_output_free(out, replace=replace)
    plan = plan_apply(base, delta, shard_size=shard_size)
    m = plan.manifest
    check_free_space(out, plan.write_bytes + sum(f.size for f in m.target.files.values()))
    plan.check_sample()  # a wrong base is refused here, before the fan-out
    ray = connect(address)
    task = ray.remote(_shard_task).options(
        num_cpus=options.num_cpus, memory=options.memory, max_retries=options.retries, retry_exceptions=False
    )
    with StagedFolder(out, replace=replace) as staged:
        bar = progress(plan.write_bytes, "apply")
        pending: dict[Any, int] = {}
        results: dict[int, dict[str, Any]] = {}
        try:
            for i in range(len(plan.shards)):  # inside the try: an interrupt here cancels what went out
                pending[task.remote(str(base), str(delta), shard_size, i, str(staged.path), plan.sample)] = i
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                bar.update(0)  # a caller's bar may stop the work here (a service job being cancelled)
                for ref in done:
                    index = pending.pop(ref)
                    results[index] = _result(ray, ref, plan.shards[index].name)
                    bar.update(plan.shards[index].layout.size)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            _wait_gone(ray, list(pending))
            raise
        bar.close()
        _check_digests(plan, results)
        plan.finish_folder(staged.path)
        staged.commit()
    return plan.report(out)


def _result(ray: Any, ref: Any, shard: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, DeltakitError):  # the task's own error: a corrupt payload, a path it cannot see
            raise e.cause from None
        raise ClusterError(f"the task rebuilding {shard} failed: {type(e.cause).__name__}: {e.cause}") from e
    except ray.exceptions.RayError as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"the task rebuilding {shard} failed on the cluster ({type(e).__name__}): {cause}") from e
    return result


def _wait_gone(ray: Any, refs: list[Any], timeout: float = 30.0) -> None:
    """After cancelling, wait (a while) for the tasks to stop, so none writes after the folder is removed."""
    deadline = time.monotonic() + timeout
    while refs and time.monotonic() < deadline:
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))


def _check_digests(plan: ApplyPlan, results: dict[int, dict[str, Any]]) -> None:
    """Every tensor of every shard, as the tasks hashed it, against the manifest."""
    for step in plan.steps:
        got = results[step.shard]["digests"].get(step.name)
        if got != step.target.digest:
            raise IntegrityError(
                f"rebuilt tensor {step.name!r} in {plan.shards[step.shard].name} does not match the target digest "
                f"(expected blake3 {step.target.digest[:16]}..., got {str(got)[:16]}...)",
                tensor=step.name,
                expected=step.target.digest,
                actual=got,
            )
