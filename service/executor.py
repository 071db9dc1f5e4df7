"""Where a job's library call runs: in the service's own thread (``local``), or as a task on a Ray cluster.

With ``DELTAKIT_EXECUTOR=ray`` each job is one Ray task holding the resources it declares (CPUs, memory),
on the cluster at ``DELTAKIT_RAY_ADDRESS``. The task's progress goes to a small actor the service reads a
few times a second, so progress and cancellation reach the service as for local jobs: its bar writes the
store and raises on cancellation; the service then raises the actor's cancel flag, which the task's bar
sees on its next update and raises on, so the library removes its staging folder as it does locally. A
task that does not stop within a grace period is killed, and abandoned staging folders are removed.

A task whose worker dies is run again by Ray (``DELTAKIT_RAY_RETRIES`` times); past that, the job fails
with a ClusterError. Paths (the registered models, the service's home) must lie on a filesystem every
node mounts at the same path. The job store stays the service's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deltakit.cluster import connect
from deltakit.errors import ClusterError, DeltakitError
from deltakit.progress import ProgressFactory

_POLL_SECONDS = 0.25
_CANCEL_GRACE_SECONDS = 20.0


class JobStopped(Exception):
    """Raised inside a task on the cluster when the service asked its job to stop."""


class _Tracker:
    """A Ray actor: the job's progress as the task reports it, and the service's request to stop."""

    def __init__(self) -> None:
        self.bars = 0
        self.total = 0
        self.done = 0
        self.stage = ""
        self.stop = False

    def open(self, total: int, stage: str) -> bool:
        self.bars, self.total, self.done, self.stage = self.bars + 1, total, 0, stage
        return self.stop

    def update(self, done: int) -> bool:
        self.done = done
        return self.stop

    def state(self) -> tuple[int, int, int, str]:
        return self.bars, self.total, self.done, self.stage

    def request_stop(self) -> None:
        self.stop = True


class _RemoteBar:
    """The library's progress bar inside the task: reports to the tracker and stops when asked."""

    def __init__(self, ray: Any, tracker: Any, total: int, stage: str) -> None:
        self._ray, self._tracker, self._done, self._last = ray, tracker, 0, time.monotonic()
        if ray.get(tracker.open.remote(total, stage)):
            raise JobStopped

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= _POLL_SECONDS:
            self._last = now
            if self._ray.get(self._tracker.update.remote(self._done)):
                raise JobStopped

    def close(self) -> None:
        self._tracker.update.remote(self._done)


def _run_on_worker(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], tracker: Any) -> Any:
    import ray

    return fn(*args, progress=lambda total, stage: _RemoteBar(ray, tracker, total, stage), **kwargs)


class RayExecutor:
    """Runs a job's library call as a Ray task; see the module's docstring."""

    def __init__(self, address: str | None, num_cpus: float, memory: int, retries: int) -> None:
        self.address, self.num_cpus, self.memory, self.retries = address, num_cpus, memory, retries

    def call(self, fn: Callable[..., Any], *args: Any, progress: ProgressFactory, **kwargs: Any) -> Any:
        """``fn(*args, progress=..., **kwargs)`` on the cluster; ``progress`` is the service's bar
        factory (its bars raise when the job is cancelled or the service stops)."""
        ray = connect(self.address)
        tracker = ray.remote(_Tracker).options(num_cpus=0).remote()
        task = ray.remote(_run_on_worker).options(
            num_cpus=self.num_cpus, memory=self.memory, max_retries=self.retries, retry_exceptions=False
        )
        ref = task.remote(fn, args, kwargs, tracker)
        try:
            return self._follow(ray, ref, tracker, progress)
        except BaseException:
            self._stop(ray, ref, tracker)
            raise
        finally:
            ray.kill(tracker)

    def _follow(self, ray: Any, ref: Any, tracker: Any, progress: ProgressFactory) -> Any:
        """Mirror the task's progress into the service's bars until it ends; its result, or its error."""
        bar, seen, bars = None, 0, 0
        while True:
            ready, _ = ray.wait([ref], timeout=_POLL_SECONDS)
            opened, total, done, stage = ray.get(tracker.state.remote())
            if opened != bars:
                if bar is not None:
                    bar.close()
                bar, seen, bars = progress(total, stage), 0, opened
            if bar is not None:
                bar.update(done - seen)  # raises when the job is cancelled or the service stops
                seen = done
            if ready:
                break
        if bar is not None:
            bar.close()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, DeltakitError):
                raise e.cause from None
            raise ClusterError(f"the job's task failed on the cluster: {type(e.cause).__name__}: {e.cause}") from e
        except ray.exceptions.RayError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ClusterError(f"the job's task failed on the cluster ({type(e).__name__}): {first}") from e

    def _stop(self, ray: Any, ref: Any, tracker: Any) -> None:
        """Ask the task to stop (the library then removes its staging folder); kill it if it will not."""
        tracker.request_stop.remote()
        ready, _ = ray.wait([ref], timeout=_CANCEL_GRACE_SECONDS)
        if not ready:
            ray.cancel(ref, force=True)
            ray.wait([ref], timeout=_CANCEL_GRACE_SECONDS)
