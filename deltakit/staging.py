"""Build an output folder under a temporary name and rename it into place only when complete.

Whatever fails, the final path is either absent or holds the complete result: never a half. Every
caller passes its own ``out`` here, so the errors name it as ``argument="out"``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from types import TracebackType

from .errors import NoSpaceError, OutputExistsError
from .files import describe_mode
from .units import human_bytes

__all__ = [
    "StagedFile",
    "StagedFolder",
    "check_free_space",
    "check_output_file_free",
    "check_output_free",
    "fsync_path",
    "remove_abandoned",
]

log = logging.getLogger(__name__)


def fsync_path(path: str | Path) -> None:
    """Flush a file or folder to disk (a folder: so the names created in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_free(out: Path, *, replace: bool = False) -> None:
    """Refuse an output path that holds anything; an empty folder is fine, and with ``replace`` a folder
    that holds something too (it is replaced when the new output is complete)."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        what = "a symbolic link" if out.is_symlink() else describe_mode(out.stat().st_mode)
        raise OutputExistsError(f"{out} exists and is {what}, not a folder", path=out, argument="out")
    if out.is_dir() and not replace and any(out.iterdir()):
        raise OutputExistsError(
            f"{out} exists and is not empty, and deltakit never overwrites it", path=out, argument="out"
        )


def check_output_file_free(out: Path, *, replace: bool = False) -> None:
    """Refuse an output file's path where anything is, or with ``replace`` anything but a file."""
    out = Path(out)
    if out.exists() and not out.is_symlink() and not out.is_file():
        what = describe_mode(out.stat().st_mode)
        raise OutputExistsError(f"{out} exists and is {what}, not a file", path=out, argument="out")
    if out.is_symlink() or (out.exists() and not replace):
        raise OutputExistsError(f"{out} exists, and deltakit never overwrites it", path=out, argument="out")


def check_free_space(out: Path, need: int) -> None:
    """Refuse to start an output of ``need`` bytes where the disk it goes to has less free."""
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise NoSpaceError(
            f"{out} needs {human_bytes(need)} and {existing} has {human_bytes(free)} free: free some space",
            path=out,
            expected=need,
            actual=free,
            argument="out",
        )


class StagedFolder:
    """A temporary sibling folder of ``final`` that becomes ``final`` on :meth:`commit`.

    Use as a context manager: leaving the block without :meth:`commit` (an exception, say) removes
    the temporary folder and everything in it.

    Example:
        >>> with StagedFolder(Path("out")) as staged:   # doctest: +SKIP
        ...     (staged.path / "model.safetensors").write_bytes(data)
        ...     staged.commit()
    """

    def __init__(self, final: Path, *, replace: bool = False) -> None:
        self.final = Path(final)
        self.replace = replace
        self._check_final()
        self.path = self.final.parent / f".{self.final.name}.deltakit-{_MACHINE}-{uuid.uuid4().hex[:12]}.tmp"
        self._created_parents: list[Path] = []
        self._lock_fd = -1
        self._committed = False

    def _check_final(self) -> None:
        check_output_free(self.final, replace=self.replace)

    def __enter__(self) -> StagedFolder:
        # Created here, not in __init__: a signal between the two (SIGTERM, Ctrl-C) must not leave a
        # folder that no __exit__ will remove.
        try:
            self._created_parents = [p for p in reversed(self.final.parents) if not p.exists()]
            self.final.parent.mkdir(parents=True, exist_ok=True)
            for gone in remove_abandoned(self.final.parent):
                log.warning("removed %s, the temporary folder of an earlier run that was killed", gone)
            # Locked while this process builds the folder; the kernel drops the lock if the process dies,
            # which is how remove_abandoned() tells a crashed build from a live one. The folder is locked
            # under a name remove_abandoned() does not match, then renamed: no moment is it unlocked.
            pending = self.path.with_suffix(".init")
            pending.mkdir()
            self._lock_fd = os.open(pending, os.O_RDONLY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            os.rename(pending, self.path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            shutil.rmtree(self.path.with_suffix(".init"), ignore_errors=True)  # interrupted before its rename
            for parent in reversed(self._created_parents):  # deepest first; only if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break
        self._unlock()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, NoSpaceError):
            # a write's own error names no file: say which output filled the disk, now that it is removed
            raise NoSpaceError(
                f"{self.final}: the disk filled up while writing it ({exc.strerror or exc}); what was written is "
                "removed: free some space",
                path=self.final,
                argument="out",
            ) from exc

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def commit(self) -> Path:
        """fsync every file, then rename the folder into place (an empty ``final`` is replaced; with
        ``replace``, a full one too: it stays whole until the new folder takes its name)."""
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(root)
        self._check_final()
        if self.replace and self.final.is_dir() and any(self.final.iterdir()):
            self._swap_into_place()
        else:
            os.rename(self.path, self.final)  # rename(2) replaces an empty folder atomically
        fsync_path(self.final.parent)
        self._committed = True
        self._unlock()
        return self.final

    def _swap_into_place(self) -> None:
        """Put the new folder under the final name and remove the old one. Where the kernel can swap two
        names in one step (Linux's renameat2), the old folder takes the staging name, so a crash before
        its removal leaves it for :func:`remove_abandoned`; elsewhere it is renamed aside first, and
        renamed back if the new folder cannot take its place."""
        if _exchange(self.path, self.final):
            shutil.rmtree(self.path, ignore_errors=True)
            return
        aside = self.final.parent / f".{self.final.name}.deltakit-replaced-{uuid.uuid4().hex[:12]}"
        os.rename(self.final, aside)
        try:
            os.rename(self.path, self.final)
        except BaseException:
            os.rename(aside, self.final)
            raise
        shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _machine_id() -> str:
    """This machine, as a staging folder's name records it: its host name and boot, hashed."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{boot}".encode()).hexdigest()[:8]


_MACHINE = _machine_id()
_STAGING_NAME = re.compile(r"\.deltakit-(?:([0-9a-f]{8})-)?[0-9a-f]{12}\.tmp$")


def remove_abandoned(folder: Path) -> list[Path]:
    """Remove the staging folders under ``folder`` whose builder died; live builds are left alone.

    Only this machine's: a lock (``flock``) shows whether a build is alive only to processes of the
    machine that holds it (on NFS, other machines never see it), so a staging folder made on another
    machine of a cluster, whose name says so, is left for that machine to remove.

    Returns what was removed.
    """
    removed: list[Path] = []
    for candidate in sorted(folder.glob(".*.deltakit-*.tmp")) if folder.is_dir() else ():
        match = _STAGING_NAME.search(candidate.name)
        if not candidate.is_dir() or candidate.is_symlink() or match is None:
            continue
        if match[1] is not None and match[1] != _MACHINE:
            continue  # another machine's build: alive or not, only it can tell
        fd = os.open(candidate, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process holds it
        finally:
            os.close(fd)
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


class StagedFile(StagedFolder):
    """One output file, written inside a temporary sibling folder (which may hold scratch files too)
    and linked into place on :meth:`commit`, never over a file that exists by then.

    Leaving the block without :meth:`commit` removes the folder and everything in it, as
    :class:`StagedFolder` does.
    """

    def _check_final(self) -> None:
        check_output_file_free(self.final, replace=self.replace)

    def __enter__(self) -> StagedFile:
        super().__enter__()
        return self

    @property
    def file(self) -> Path:
        """Where to write the output while it is being made."""
        return self.path / self.final.name

    def commit(self) -> Path:
        """fsync the file, link it to its final name (refused if that name exists, unless ``replace``:
        then renamed over it in one step), drop the folder."""
        fsync_path(self.file)
        if self.replace:
            os.replace(self.file, self.final)
            self._committed = True
            fsync_path(self.final.parent)
            shutil.rmtree(self.path, ignore_errors=True)
            self._unlock()
            return self.final
        try:
            os.link(self.file, self.final)
        except FileExistsError as e:
            raise OutputExistsError(
                f"{self.final} appeared while it was being made; deltakit never overwrites it",
                path=self.final,
                argument="out",
            ) from e
        except OSError as e:  # a filesystem without hard links (vfat, some FUSE): check, then rename
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if self.final.exists() or self.final.is_symlink():
                raise OutputExistsError(
                    f"{self.final} appeared while it was being made; deltakit never overwrites it",
                    path=self.final,
                    argument="out",
                ) from e
            os.rename(self.file, self.final)
        self._committed = True  # the whole file is under its name from here on, whatever follows
        fsync_path(self.final.parent)
        shutil.rmtree(self.path, ignore_errors=True)
        self._unlock()
        return self.final
