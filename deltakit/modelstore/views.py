"""What the model store shows its faces (the Hub-compatible API, the page, the CLI): repositories,
their revisions and files, and lineage, as frozen records, behind one protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ..progress import ProgressFactory, no_progress

__all__ = ["GIT_OID_MAX_BYTES", "Relation", "RepoRevision", "RepoSummary", "Repositories", "Storage", "StoredFile"]

# Files at least this large are LFS files on the Hub whatever their name: their git blob id is never asked for.
GIT_OID_MAX_BYTES = 10 * 1024 * 1024
# The Hub's model tree: how a model derives from its base_model.
Relation = Literal["finetune", "adapter", "quantized", "merge"]
# How the store keeps a revision: whole (its files as they are) or as a delta against its base.
Storage = Literal["whole", "delta"]


@dataclass(frozen=True)
class StoredFile:
    """One file of a revision as the client will receive it: its repo path, size and SHA-256 (of the
    original bytes imported: what every served copy must hash to), and, for a file under
    ``GIT_OID_MAX_BYTES``, its git blob id (what a Hub client checks a file kept in git by; recorded at
    import, so that listing a stored fine-tune needs no rebuild; None in catalogs older than it)."""

    path: str
    size: int
    sha256: str
    git_oid: str | None = None


@dataclass(frozen=True)
class RepoRevision:
    """One revision of a repository.

    Attributes:
        repo_id: ``ORG/NAME``.
        commit: 40 hex digits, the revision's id (what the Hub calls its commit sha).
        revision_number: 1 for the first import of the name, then 2, 3...
        created: seconds since the epoch.
        files: every file, sorted by path.
        storage: ``whole`` or ``delta``.
        stored_bytes: what the store holds for this revision (the delta's files, or the whole files).
        base_model: the repo id of the base this revision derives from, if any.
        base_commit: the base's revision, if any.
        relation: the Hub's ``base_model_relation``, if there is a base.
        signer: the fingerprint of the key that signed what was imported, if it was signed.
        note: what the store says about how it keeps the revision (why a model given a base is whole).
    """

    repo_id: str
    commit: str
    revision_number: int
    created: float
    files: tuple[StoredFile, ...]
    storage: Storage
    stored_bytes: int
    base_model: str | None = None
    base_commit: str | None = None
    relation: Relation | None = None
    signer: str | None = None
    note: str | None = None

    @property
    def full_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> StoredFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class RepoSummary:
    """A repository and its revisions, newest last; ``derived`` lists the repo ids whose latest
    revision names this one as ``base_model``."""

    repo_id: str
    revisions: tuple[RepoRevision, ...]
    derived: tuple[str, ...] = ()

    @property
    def latest(self) -> RepoRevision:
        return self.revisions[-1]


@runtime_checkable
class Repositories(Protocol):
    """The store as its faces read it.

    Lookups raise ``InputNotFoundError`` (its ``argument`` is ``repo_id``, ``revision`` or ``path``) for
    what does not exist.
    """

    def repositories(self) -> Sequence[RepoSummary]:
        """Every repository, sorted by repo id."""
        ...

    def revision(self, repo_id: str, revision: str = "main") -> RepoRevision:
        """The revision ``revision`` names: ``main`` (the latest), a commit (40 hex), or a revision number."""
        ...

    def file_path(self, revision: RepoRevision, path: str, *, progress: ProgressFactory = no_progress) -> Path:
        """A local file holding exactly the bytes of ``path`` in ``revision`` (SHA-256 checked), to be
        read in place while the caller holds it; rebuilds the revision into the cache first where
        needed (one rebuild however many callers wait for it)."""
        ...
