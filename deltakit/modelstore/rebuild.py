"""Rebuilding a stored revision's files byte for byte, and the cache that keeps them within a disk budget.

A delta revision is rebuilt by applying its delta to its base (deltakit's own shard layout), then laying
each original safetensors file out again: its header bytes as imported, then its tensors' bytes in data
order. Every file's SHA-256 must be the imported original's before the cache entry is published.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import IntegrityError
from ..formats.checkpoint import RangeReader, open_checkpoint
from ..hashing import file_sha256
from ..progress import ProgressBar, ProgressFactory, no_progress
from ..staging import StagedFolder, fsync_path
from ..units import human_bytes
from .catalog import RevisionFile

__all__ = ["RebuildCache", "lay_out_files"]

log = logging.getLogger(__name__)

_BLOCK = 8 << 20
ENTRY_FILES = "files"
ENTRY_RECORD = "entry.json"
ENTRY_USED = "used"

# ``key -> a local file holding the object`` (fetched into ``scratch`` where the store is remote).
ObjectSource = Callable[[str, Path], Path]


class _Discard:
    """A sink for bytes that are only hashed."""

    def write(self, data: memoryview) -> int:
        return data.nbytes

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _copy_range(
    reader: RangeReader, src: Path, start: int, end: int, out: BinaryIO | _Discard, digest: Any, bar: ProgressBar
) -> int:
    """Copy ``src[start:end]`` to ``out``, hashing it; returns the bytes copied."""
    buffer = bytearray(min(_BLOCK, max(end - start, 1)))
    for offset in range(start, end, _BLOCK):
        view = memoryview(buffer)[: min(_BLOCK, end - offset)]
        reader.read_into(src, offset, view)
        out.write(view)
        digest.update(view)
        bar.update(len(view))
    return end - start


def lay_out_files(
    recipe: Sequence[RevisionFile],
    dest: Path | None,
    *,
    applied: Path | None,
    objects: ObjectSource,
    scratch: Path,
    progress: ProgressFactory = no_progress,
) -> None:
    """Write every file of ``recipe`` under ``dest``, each checked against its SHA-256 and size.

    Args:
        dest: where the files go; None only hashes them (the import's check that its recipe holds).
        applied: the delta applied (deltakit's layout), for ``safetensors`` and ``carried`` files.
        objects: gives a local file for an object key (``scratch`` is where a remote one may be fetched).

    Raises:
        IntegrityError: a file's bytes differ from the imported original's (naming the file).
    """
    tensors = (
        open_checkpoint(applied).tensors
        if applied is not None and any(f.source == "safetensors" for f in recipe)
        else {}
    )
    bar = progress(sum(f.size for f in recipe), "lay out")
    with RangeReader() as reader:
        for f in recipe:
            target = dest / f.path if dest is not None else None
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
            if f.source == "carried":
                assert applied is not None
                if target is not None:
                    os.replace(applied / f.path, target)
                sha, size = file_sha256(target or applied / f.path)
                bar.update(size)
                _check_laid(f, sha, size)
                continue
            assert f.object_key is not None
            source = objects(f.object_key, scratch)
            if f.source == "object" and target is not None and source.is_relative_to(scratch):
                os.replace(source, target)  # fetched for this file alone: moved, not copied again
                sha, size = file_sha256(target)
                bar.update(size)
                _check_laid(f, sha, size)
                continue
            digest = hashlib.sha256()
            with open(target, "wb") if target is not None else _Discard() as out:
                size = _copy_range(reader, source, 0, source.stat().st_size, out, digest, bar)
                if f.source == "safetensors":
                    for name in f.tensor_order:
                        info = tensors[name]
                        size += _copy_range(reader, info.path, info.start, info.end, out, digest, bar)
            _check_laid(f, digest.hexdigest(), size)
    bar.close()


def _check_laid(f: RevisionFile, sha: str, size: int) -> None:
    if (sha, size) != (f.sha256, f.size):
        raise IntegrityError(
            f"{f.path}: rebuilt as {size} bytes with sha256 {sha[:16]}..., but the imported original has "
            f"{f.size} bytes with sha256 {f.sha256[:16]}...",
            path=f.path,
            expected=f.sha256,
            actual=sha,
        )


@dataclass(frozen=True)
class _Stamp:
    """What a cached file looked like when its SHA-256 was checked: any write since changes it."""

    size: int
    sha256: str
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path, sha256: str) -> _Stamp:
        st = path.stat()
        return cls(st.st_size, sha256, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def holds(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == (
            self.size,
            self.ino,
            self.mtime_ns,
            self.ctime_ns,
        )


class RebuildCache:
    """Rebuilt revisions under ``root`` (``$DELTAKIT_HOME/cache``), one folder per commit, kept within
    ``budget`` bytes by evicting the least recently used; one build per commit at a time, across threads
    and processes.

    An entry is ``<commit>/files/...`` (the revision's files under their repo paths), ``entry.json`` (each
    file's size, SHA-256 and the stat it had once checked) and ``used`` (its mtime: the last use). A file
    whose stat no longer matches is hashed again before it is served; an entry with a bad file is dropped.

    Args:
        budget: the most bytes the entries may hold together (None: no limit). A single entry larger
            than the budget is still built and served; it is the first to go.
        grace: seconds after its last use during which an entry is never evicted (a caller that was
            handed a path has that long to open it); entries held with :meth:`hold` are never evicted.
    """

    def __init__(self, root: Path, *, budget: int | None = None, grace: float = 60.0) -> None:
        self.root = Path(root)
        self.budget = budget
        self.grace = grace
        self._locks_dir = self.root / ".locks"
        self._locks_dir.mkdir(parents=True, exist_ok=True)
        self._thread_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._records: dict[str, dict[str, _Stamp]] = {}
        for trash in self.root.glob(".trash-*"):  # entries whose removal a killed process left unfinished
            shutil.rmtree(trash, ignore_errors=True)

    # -- locks

    def _thread_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._thread_locks.setdefault(name, threading.Lock())

    @contextlib.contextmanager
    def _locked(self, name: str, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
        """An fcntl lock on ``.locks/<name>.lock`` (and, exclusive, a thread lock): yields whether it was taken."""
        tlock = None if shared else self._thread_lock(name)
        if tlock is not None and not tlock.acquire(blocking=wait):
            yield False
            return
        try:
            fd = os.open(self._locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flags = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
                try:
                    fcntl.flock(fd, flags if wait else flags | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                yield True
            finally:
                os.close(fd)
        finally:
            if tlock is not None:
                tlock.release()

    @contextlib.contextmanager
    def hold(self, commit: str) -> Iterator[None]:
        """Keep ``commit``'s entry from eviction while the block runs (a shared lock; any number of holders)."""
        with self._locked(f"{commit}.hold", shared=True):
            yield

    # -- entries

    def entry(self, commit: str) -> Path:
        return self.root / commit

    def _record(self, commit: str) -> dict[str, _Stamp] | None:
        record = self._records.get(commit)
        if record is not None:
            return record
        try:
            raw = json.loads((self.entry(commit) / ENTRY_RECORD).read_text("utf-8"))
            record = {p: _Stamp(**s) for p, s in raw["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._records[commit] = record
        return record

    def cached_file(self, commit: str, path: str, expected: RevisionFile) -> Path | None:
        """The cached file if its entry is published and the file still holds its checked bytes (hashed
        again where its stat changed); None otherwise (a bad file drops its whole entry)."""
        record = self._record(commit)
        if record is None or path not in record:
            return None
        stamp = record[path]
        file = self.entry(commit) / ENTRY_FILES / path
        if stamp.sha256 != expected.sha256 or stamp.size != expected.size:
            self.evict(commit)
            return None
        if not stamp.holds(file):
            try:
                sha, size = file_sha256(file)
            except OSError:
                sha, size = "", -1
            if (sha, size) != (expected.sha256, expected.size):
                log.warning("cached %s of %s was altered (sha256 %s...); rebuilding it", path, commit, sha[:16])
                self.evict(commit)
                return None
            record[path] = _Stamp.of(file, sha)
        self.touch(commit)
        return file

    def is_cached(self, commit: str) -> bool:
        """Whether ``commit``'s entry is published with a readable record (its files are checked again as
        they are asked for); an entry whose record was lost or damaged counts as absent, to be rebuilt."""
        return self._record(commit) is not None

    def touch(self, commit: str) -> None:
        now = time.time_ns()  # the fine clock: the file system's own ticks only every few milliseconds
        with contextlib.suppress(OSError):
            os.utime(self.entry(commit) / ENTRY_USED, ns=(now, now))

    def ensure(
        self,
        commit: str,
        recipe: Sequence[RevisionFile],
        build: Callable[[Path], None],
    ) -> bool:
        """Build ``commit``'s entry unless it is published; returns whether this call built it.

        ``build(folder)`` writes the files under ``folder`` (checked against ``recipe`` by
        :func:`lay_out_files`). Concurrent callers for one commit wait for the one build.
        """
        if self.is_cached(commit):
            return False
        with self._locked(commit):
            self._records.pop(commit, None)
            if self.is_cached(commit):
                return False
            if self.entry(commit).exists() and not self.evict(commit):  # a record lost: rebuilt whole
                raise IntegrityError(
                    f"the cache entry of {commit} lost its record and is being read: try again when it is not",
                    path=self.entry(commit),
                )
            self._make_room(sum(f.size for f in recipe), keep=commit)
            with StagedFolder(self.entry(commit)) as staged:
                files = staged.path / ENTRY_FILES
                files.mkdir()
                build(files)
                self._publish(staged.path, recipe)
                staged.commit()
            self._records.pop(commit, None)
            return True

    def _publish(self, folder: Path, recipe: Sequence[RevisionFile]) -> None:
        stamps = {}
        for f in recipe:
            file = folder / ENTRY_FILES / f.path
            sha, size = file_sha256(file)  # checked once more as it will be served: what the stamp vouches for
            if (sha, size) != (f.sha256, f.size):
                raise IntegrityError(
                    f"{f.path}: rebuilt with sha256 {sha[:16]}..., not the original's {f.sha256[:16]}...",
                    path=file,
                    expected=f.sha256,
                    actual=sha,
                )
            fsync_path(file)
            stamps[f.path] = _Stamp.of(file, sha).__dict__
        record = {"files": stamps, "bytes": sum(f.size for f in recipe)}
        (folder / ENTRY_RECORD).write_text(json.dumps(record, indent=1), "utf-8")
        fsync_path(folder / ENTRY_RECORD)  # what the entry's files are vouched by survives a power loss
        (folder / ENTRY_USED).write_bytes(b"")
        now = time.time_ns()
        os.utime(folder / ENTRY_USED, ns=(now, now))

    def evict(self, commit: str) -> bool:
        """Remove ``commit``'s entry unless it is held; returns whether it went."""
        with self._locked(f"{commit}.hold", wait=False) as free:
            if not free:
                return False
            self._records.pop(commit, None)
            entry = self.entry(commit)
            if not entry.exists():
                return True
            trash = self.root / f".trash-{commit}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(entry, trash)  # gone from its name at once, however long the removal takes
            except FileNotFoundError:
                return True
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def entries(self) -> list[tuple[str, int, float]]:
        """Published entries as ``(commit, bytes, last used)``, least recently used first."""
        found = []
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                size = int(json.loads((entry / ENTRY_RECORD).read_text("utf-8"))["bytes"])
                used = (entry / ENTRY_USED).stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError):  # a damaged entry: evicted first, by its size
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                used = 0.0
            found.append((entry.name, size, used))
        return sorted(found, key=lambda e: e[2])

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _make_room(self, need: int, *, keep: str) -> None:
        if self.budget is None:
            return
        with self._locked("cache"):
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            now = time.time()
            for commit, size, used in entries:
                if total + need <= self.budget:
                    break
                if commit == keep or now - used < self.grace:
                    continue
                if self.evict(commit):
                    log.info("evicted %s (%s) from the rebuild cache", commit, human_bytes(size))
                    total -= size
            if total + need > self.budget:
                log.warning(
                    "the rebuild cache holds %s in use and needs %s more: over its budget of %s until they go",
                    human_bytes(total),
                    human_bytes(need),
                    human_bytes(self.budget),
                )
