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

import threading
import time
import uuid
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
    """A Ray actor, one per service: each job's progress as its task reports it (total, done, stage, how
    many bars it opened), and the service's requests to stop, by job key."""

    def __init__(self) -> None:
        self.jobs: dict[str, list[Any]] = {}
        self.stopping: set[str] = set()
        self.ended: set[str] = set()  # keys the service no longer follows: a task still running must stop

    def open(self, key: str, total: int, stage: str) -> bool:
        bars = self.jobs.get(key, [0])[0]
        self.jobs[key] = [bars + 1, total, 0, stage]
        return key in self.stopping or key in self.ended

    def update(self, key: str, done: int) -> bool:
        if key in self.jobs:
            self.jobs[key][2] = done
        return key in self.stopping or key in self.ended

    def state(self, key: str) -> tuple[int, int, int, str]:
        bars, total, done, stage = self.jobs.get(key, [0, 0, 0, ""])
        return bars, total, done, stage

    def request_stop(self, key: str) -> None:
        self.stopping.add(key)

    def forget(self, key: str) -> None:
        self.jobs.pop(key, None)
        self.ended.add(key)


class _RemoteBar:
    """The library's progress bar inside the task: reports to the tracker and stops when asked."""

    def __init__(self, ray: Any, tracker: Any, key: str, total: int, stage: str) -> None:
        self._ray, self._tracker, self._key, self._done, self._last = ray, tracker, key, 0, time.monotonic()
        if ray.get(tracker.open.remote(key, total, stage)):
            raise JobStopped

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= _POLL_SECONDS:
            self._last = now
            if self._ray.get(self._tracker.update.remote(self._key, self._done)):
                raise JobStopped

    def close(self) -> None:
        # waited for: the task may end right after, and the service reads the tracker once it has; an
        # update still in flight then was lost (a job ended "succeeded" with its bar short of its total)
        self._ray.get(self._tracker.update.remote(self._key, self._done))


def _run_on_worker(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], tracker: Any, key: str
) -> Any:
    import ray

    return fn(*args, progress=lambda total, stage: _RemoteBar(ray, tracker, key, total, stage), **kwargs)


class RayExecutor:
    """Runs a job's library call as a Ray task; see the module's docstring."""

    def __init__(self, address: str | None, num_cpus: float, memory: int, retries: int) -> None:
        self.address, self.num_cpus, self.memory, self.retries = address, num_cpus, memory, retries
        self._tracker: Any = None
        self._lock = threading.Lock()

    def _tracker_on(self, ray: Any) -> Any:
        with self._lock:  # one actor for the service's life: an actor is a process of its own to start
            if self._tracker is None:  # restarted by Ray if its worker or node dies (its figures start over)
                options = {"num_cpus": 0, "max_concurrency": 16, "max_restarts": -1, "max_task_retries": -1}
                self._tracker = ray.remote(_Tracker).options(**options).remote()
            return self._tracker

    def call(
        self, fn: Callable[..., Any], *args: Any, progress: ProgressFactory, check: Callable[[], None], **kwargs: Any
    ) -> Any:
        """``fn(*args, progress=..., **kwargs)`` on the cluster; ``progress`` is the service's bar
        factory, ``check`` raises when the job is cancelled or the service stops (called at every poll,
        so a task still waiting for room on the cluster, or not yet reporting, can be stopped too)."""
        ray = connect(self.address)
        tracker, key = self._tracker_on(ray), uuid.uuid4().hex
        task = ray.remote(_run_on_worker).options(
            num_cpus=self.num_cpus, memory=self.memory, max_retries=self.retries, retry_exceptions=False
        )
        ref = task.remote(fn, args, kwargs, tracker, key)
        try:
            return self._follow(ray, ref, tracker, key, progress, check)
        except (KeyboardInterrupt, SystemExit):
            self._stop(ray, ref, tracker, key)
            raise
        except Exception:
            finished = self._stop(ray, ref, tracker, key)
            if finished is not None:
                return finished  # the task had done its work when the stop reached it, as a local job can have
            raise
        finally:
            tracker.forget.remote(key)

    def _follow(
        self, ray: Any, ref: Any, tracker: Any, key: str, progress: ProgressFactory, check: Callable[[], None]
    ) -> Any:
        """Mirror the task's progress into the service's bars until it ends; its result, or its error."""
        bar, seen, bars = None, 0, 0
        while True:
            ready, _ = ray.wait([ref], timeout=_POLL_SECONDS)
            check()
            opened, total, done, stage = ray.get(tracker.state.remote(key))
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

    def _stop(self, ray: Any, ref: Any, tracker: Any, key: str) -> Any:
        """Ask the task to stop (the library then removes its staging folder); kill it if it will not.
        Returns the task's result if it finished its work all the same, else None."""
        tracker.request_stop.remote(key)
        ready, _ = ray.wait([ref], timeout=_CANCEL_GRACE_SECONDS)
        if not ready:
            ray.cancel(ref, force=True)
            ray.wait([ref], timeout=_CANCEL_GRACE_SECONDS)
            return None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError:
            return None
