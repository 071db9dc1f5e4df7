"""Names for local models and deltas, kept in ``$DELTAKIT_HOME/registry.json``, shared by CLI and service.

A base is registered with its fingerprint (every tensor hashed once, at ``add``), so a delta can find
the base it was made from without being told. A name resolves as a registry entry first, then as a
path; Hub repo ids are the Hub module's business.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import FormatError, InputNotFoundError, OutputExistsError, UnsupportedInputError
from .files import read_regular_text
from .formats.checkpoint import open_checkpoint
from .manifest import MANIFEST_NAME, load_manifest
from .progress import ProgressFactory, no_progress

__all__ = ["Entry", "Registry", "StaleNameError", "deltakit_home", "service_roots"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KINDS = ("model", "delta", "gguf")


def deltakit_home() -> Path:
    """``$DELTAKIT_HOME``, else ``$XDG_DATA_HOME/deltakit``, else ``~/.local/share/deltakit``."""
    if home := os.environ.get("DELTAKIT_HOME"):
        return Path(home)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "deltakit"


def service_roots(home: Path | None = None) -> list[Path]:
    """The folders a ``deltakit serve`` on ``home`` may read: the home and ``$DELTAKIT_ROOTS`` (a JSON list
    of folders), resolved. A ``DELTAKIT_ROOTS`` that is not such a list counts as none (serve refuses it)."""
    roots: list[Path] = [Path(home) if home is not None else deltakit_home()]
    try:
        listed = json.loads(os.environ.get("DELTAKIT_ROOTS") or "[]")
    except ValueError:
        listed = []
    if isinstance(listed, list):
        roots += [Path(r) for r in listed if isinstance(r, str)]
    return [r.resolve() for r in roots]


class StaleNameError(InputNotFoundError):
    """A registered ``name`` whose file or folder (``path``) no longer exists."""

    def __init__(self, message: str, *, name: str, path: str) -> None:
        super().__init__(message, path=path, argument="name")
        self.name = name


@dataclass(frozen=True)
class Entry:
    """A registered model or delta.

    Attributes:
        kind: ``model`` (a checkpoint: a base, or a built model), ``delta``, or ``gguf`` (a GGUF file a
            job wrote, for llama.cpp; never read as a base).
        fingerprint: a model's fingerprint; for a delta, its target's; for a GGUF file, its SHA-256.
        base_fingerprint: for a delta, the fingerprint of the base it applies to.
        hub_id: for a model, its repo id on the Hub (``huggyllama/llama-7b``), which model cards
            name as the ``base_model`` of deltas made from it.
    """

    name: str
    path: str
    kind: str
    fingerprint: str
    base_fingerprint: str | None = None
    size: int = 0
    added: float = 0.0
    hub_id: str | None = None


class Registry:
    """The registry file of one ``DELTAKIT_HOME``; every change is written atomically under a lock."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else deltakit_home()
        self.path = self.home / "registry.json"

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Entry]]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "registry.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            before = dict(entries)
            yield entries
            if entries != before:
                tmp = self.path.with_name(f".registry.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({n: asdict(e) for n, e in sorted(entries.items())}, indent=2) + "\n")
                os.replace(tmp, self.path)

    def _read(self) -> dict[str, Entry]:
        try:
            data = json.loads(read_regular_text(self.path))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            entries = {name: Entry(**fields) for name, fields in data.items()}
            for name, e in entries.items():
                if e.name != name or e.kind not in KINDS or not isinstance(e.path, str):
                    raise ValueError(f"entry {name!r} is malformed")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, RecursionError) as e:
            raise FormatError(f"{self.path}: the registry is unreadable ({e}); fix or remove it", path=self.path) from e

    def entries(self) -> dict[str, Entry]:
        return self._read()

    def get(self, name: str) -> Entry | None:
        return self._read().get(name)

    def add(
        self,
        name: str,
        path: str | Path,
        *,
        force: bool = False,
        hub_id: str | None = None,
        progress: ProgressFactory = no_progress,
    ) -> Entry:
        """Register a checkpoint or delta package under ``name``; a checkpoint is fingerprinted now.

        Args:
            hub_id: a model's repo id on the Hub, for the model cards of deltas made from it.

        Raises:
            OutputExistsError: ``name`` is registered to something with another fingerprint, and
                ``force`` is not set.
        """
        from .engine import checkpoint_digests  # the engine is heavy; the registry is often used without it
        from .hashing import fingerprint

        if not _NAME.match(name):
            raise UnsupportedInputError(
                f"{name!r} is not a valid name: letters, digits, '.', '_' and '-', starting with a letter or digit",
                argument="name",
            )
        path = Path(path).resolve()
        if not path.exists():
            raise InputNotFoundError(f"{path}: no such file or folder", path=path)
        if hub_id is not None:
            from .hub import check_repo_id

            try:
                check_repo_id(hub_id, f"the Hub id {hub_id!r}", "expected the model's id on the Hub, ORG/NAME")
            except UnsupportedInputError as e:
                raise UnsupportedInputError(str(e), argument="hub_id") from e
        if (path / MANIFEST_NAME).is_file():
            if hub_id is not None:
                raise UnsupportedInputError(
                    f"{path} is a delta package, which has no use for a Hub id (a Hub id names a model on the Hub)",
                    path=path,
                    argument="hub_id",
                )
            m = load_manifest(path)
            size = sum(f.size for f in m.payload.values())
            entry = Entry(name, str(path), "delta", m.target.fingerprint, m.base.fingerprint, size, time.time())
        else:
            ckpt = open_checkpoint(path)
            digests = checkpoint_digests(ckpt, progress)
            model_fingerprint = fingerprint((n, t.dtype, t.shape, digests[n]) for n, t in ckpt.tensors.items())
            entry = Entry(name, str(path), "model", model_fingerprint, None, ckpt.nbytes, time.time(), hub_id)
        with self._locked() as entries:
            earlier = entries.get(name)
            if (
                earlier is not None
                and earlier.hub_id
                and entry.hub_id is None
                and earlier.fingerprint == entry.fingerprint
            ):
                entry = replace(entry, hub_id=earlier.hub_id)  # registering the same model again keeps its id
            if earlier is not None and earlier.fingerprint != entry.fingerprint and not force:
                raise OutputExistsError(
                    f"{name!r} is already registered to another {earlier.kind}: {earlier.path}, fingerprint "
                    f"{earlier.fingerprint[:16]}...",
                    path=earlier.path,
                    expected=earlier.fingerprint,
                    actual=entry.fingerprint,
                    argument="name",
                )
            entries[name] = entry
        return entry

    def add_known(
        self, name: str, path: str | Path, kind: str, fingerprint: str, size: int, base_fingerprint: str | None = None
    ) -> Entry:
        """Register something whose fingerprint is already known (a model a job just built and checked)."""
        if not _NAME.match(name):
            raise UnsupportedInputError(f"{name!r} is not a valid name", argument="name")
        entry = Entry(name, str(Path(path).resolve()), kind, fingerprint, base_fingerprint, size, time.time())
        with self._locked() as entries:
            if name in entries:
                raise OutputExistsError(f"{name!r} is already registered", path=entries[name].path, argument="name")
            entries[name] = entry
        return entry

    def remove(self, name: str) -> Entry:
        """Forget ``name``; the files it names are left alone."""
        with self._locked() as entries:
            entry = entries.pop(name, None)
        if entry is None:
            raise InputNotFoundError(f"{name!r} is not in the registry {self.path}")
        return entry

    def resolve(self, name: str | Path) -> Path:
        """A registered name's path, else ``name`` itself when it exists on disk."""
        try:
            entry = self.get(str(name)) if _NAME.match(str(name)) else None
        except FormatError:
            if Path(name).exists():  # an unreadable registry must not block plain paths
                log.warning("ignoring the unreadable registry %s for the path %s", self.path, name)
                return Path(name)
            raise
        if entry is not None and Path(name).exists():
            log.warning(
                "%r is both a registered name and a path here; using the registered %s (./%s for the folder)",
                str(name),
                entry.path,
                name,
            )
        if entry is not None:
            if not Path(entry.path).exists():
                raise StaleNameError(
                    f"{name!r} is registered at {entry.path}, which no longer exists", name=str(name), path=entry.path
                )
            return Path(entry.path)
        if Path(name).exists():
            return Path(name)
        raise InputNotFoundError(
            f"{name}: no such file or folder, nor a name registered in {self.path}", path=str(name)
        )

    def find_base(self, base_fingerprint: str) -> Entry | None:
        """A registered model with this fingerprint: the base a delta was made from."""
        for entry in self._read().values():
            if entry.kind == "model" and entry.fingerprint == base_fingerprint and Path(entry.path).exists():
                return entry
        return None

    def hub_id_of(self, fingerprint: str) -> str | None:
        """The Hub repo id recorded for a registered model with this fingerprint, if any."""
        return next(
            (
                e.hub_id
                for e in self._read().values()
                if e.kind == "model" and e.fingerprint == fingerprint and e.hub_id
            ),
            None,
        )
