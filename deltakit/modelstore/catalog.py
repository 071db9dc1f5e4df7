"""The model store's catalog: repositories, revisions, their files and the objects that hold them, in
one SQLite file that the CLI and the service may share (WAL, one short transaction per change).

The objects are written first and a revision's rows last, in one transaction: a revision the catalog
lists is always complete in the object store.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import FormatError, InputNotFoundError, UnsupportedInputError
from .views import Relation, RepoRevision, Storage, StoredFile

__all__ = ["Catalog", "FileSource", "NewRevision", "RevisionFile", "RevisionObject", "check_store_repo_id"]

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# How a served file is produced: an object as it is, a file carried in the delta package (applied
# output), or a safetensors file re-laid from its header object and the applied tensors.
FileSource = Literal["object", "carried", "safetensors"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    repo_id TEXT PRIMARY KEY,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    commit_id TEXT PRIMARY KEY,
    repo_id TEXT NOT NULL REFERENCES repos(repo_id),
    number INTEGER NOT NULL,
    created REAL NOT NULL,
    storage TEXT NOT NULL CHECK (storage IN ('whole', 'delta')),
    base_repo TEXT,
    base_commit TEXT REFERENCES revisions(commit_id),
    relation TEXT,
    signer TEXT,
    stored_bytes INTEGER NOT NULL,
    fingerprint TEXT,
    tensors TEXT NOT NULL DEFAULT '{}',
    note TEXT,
    UNIQUE (repo_id, number)
);
CREATE TABLE IF NOT EXISTS files (
    commit_id TEXT NOT NULL REFERENCES revisions(commit_id),
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('object', 'carried', 'safetensors')),
    object_key TEXT,
    tensor_order TEXT,
    git_oid TEXT,
    PRIMARY KEY (commit_id, path)
);
CREATE TABLE IF NOT EXISTS objects (
    commit_id TEXT NOT NULL REFERENCES revisions(commit_id),
    role TEXT NOT NULL CHECK (role IN ('file', 'delta', 'header')),
    name TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (commit_id, role, name)
);
CREATE INDEX IF NOT EXISTS objects_by_key ON objects(object_key);
"""


def check_store_repo_id(repo_id: str, *, argument: str = "repo_id") -> str:
    """``repo_id`` if it is ``ORG/NAME`` as the Hub accepts it; else ``UnsupportedInputError`` naming it."""
    from ..hub import check_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or ".." in repo_id:
        raise UnsupportedInputError(
            f"{repo_id!r} is not a repo id of the form ORG/NAME (one '/', no '..')", argument=argument
        )
    check_repo_id(repo_id, f"{argument} {repo_id!r}", argument=argument)
    return repo_id


@dataclass(frozen=True)
class RevisionFile:
    """How one file of a revision is produced.

    Attributes:
        object_key: for ``object``, the object holding the file; for ``safetensors``, the object holding
            its header (the 8-byte length and the JSON exactly as in the file).
        tensor_order: for ``safetensors``, the tensors in data-offset order, whose bytes follow the header.
        git_oid: the file's git blob id, for a file under ``GIT_OID_MAX_BYTES`` (see ``StoredFile``).
    """

    path: str
    size: int
    sha256: str
    source: FileSource
    object_key: str | None = None
    tensor_order: tuple[str, ...] = ()
    git_oid: str | None = None


@dataclass(frozen=True)
class RevisionObject:
    """An object a revision holds: ``role`` ``file`` (a whole file, ``name`` its path), ``delta`` (a file of
    the delta package, ``name`` its path in the package) or ``header`` (``name`` the safetensors file)."""

    role: Literal["file", "delta", "header"]
    name: str
    key: str
    size: int


@dataclass(frozen=True)
class NewRevision:
    """Everything a revision's rows hold, assembled by the import before anything is written."""

    repo_id: str
    commit: str
    created: float
    storage: Storage
    files: tuple[RevisionFile, ...]
    objects: tuple[RevisionObject, ...]
    tensors: dict[str, tuple[str, tuple[int, ...], str]]
    fingerprint: str | None
    base_repo: str | None = None
    base_commit: str | None = None
    relation: Relation | None = None
    note: str | None = None
    signer: str | None = None

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.objects)


class Catalog:
    """The SQLite catalog at ``path``; safe to share between threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        db = self._connection()
        db.executescript(_SCHEMA)  # runs in its own transaction
        if not self._has_git_oids(db):  # a catalog made before git ids were recorded: its files have none
            with self._transaction() as tx:
                if not self._has_git_oids(tx):
                    tx.execute("ALTER TABLE files ADD COLUMN git_oid TEXT")

    @staticmethod
    def _has_git_oids(db: sqlite3.Connection) -> bool:
        return "git_oid" in {row[1] for row in db.execute("PRAGMA table_info(files)")}

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=True)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA busy_timeout=60000")
            except sqlite3.DatabaseError as e:
                raise FormatError(f"{self.path}: the catalog is unreadable ({e})", path=self.path) from e
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- writing

    def add_revision(self, new: NewRevision) -> RepoRevision:
        """Insert a revision with its files and objects in one transaction; its number is the next
        one of its repository (1 for a new repository)."""
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO repos (repo_id, created) VALUES (?, ?)", (new.repo_id, new.created))
            (last,) = db.execute(
                "SELECT COALESCE(MAX(number), 0) FROM revisions WHERE repo_id = ?", (new.repo_id,)
            ).fetchone()
            tensors = {n: [d, list(s), g] for n, (d, s, g) in new.tensors.items()}
            db.execute(
                "INSERT INTO revisions (commit_id, repo_id, number, created, storage, base_repo, base_commit, "
                "relation, signer, stored_bytes, fingerprint, tensors, note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.commit,
                    new.repo_id,
                    last + 1,
                    new.created,
                    new.storage,
                    new.base_repo,
                    new.base_commit,
                    new.relation,
                    new.signer,
                    new.stored_bytes,
                    new.fingerprint,
                    json.dumps(tensors, separators=(",", ":")),
                    new.note,
                ),
            )
            db.executemany(
                "INSERT INTO files (commit_id, path, size, sha256, source, object_key, tensor_order, git_oid) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        new.commit,
                        f.path,
                        f.size,
                        f.sha256,
                        f.source,
                        f.object_key,
                        json.dumps(list(f.tensor_order)) if f.source == "safetensors" else None,
                        f.git_oid,
                    )
                    for f in new.files
                ],
            )
            db.executemany(
                "INSERT INTO objects (commit_id, role, name, object_key, size) VALUES (?,?,?,?,?)",
                [(new.commit, o.role, o.name, o.key, o.size) for o in new.objects],
            )
        return self.revision_by_commit(new.commit)

    def set_signer(self, commit: str, signer: str | None) -> None:
        """Record who signed what was imported as ``commit``."""
        with self._transaction() as db:
            db.execute("UPDATE revisions SET signer = ? WHERE commit_id = ?", (signer, commit))

    # -- reading

    def _revisions(self, where: str, args: Sequence[object]) -> list[RepoRevision]:
        db = self._connection()
        rows = db.execute(
            "SELECT commit_id, repo_id, number, created, storage, base_repo, base_commit, relation, signer, "
            f"stored_bytes, note FROM revisions WHERE {where} ORDER BY repo_id, number",
            tuple(args),
        ).fetchall()
        out = []
        for commit, repo_id, number, created, storage, base_repo, base_commit, relation, signer, stored, note in rows:
            files = tuple(
                StoredFile(p, s, h, g)
                for p, s, h, g in db.execute(
                    "SELECT path, size, sha256, git_oid FROM files WHERE commit_id = ? ORDER BY path", (commit,)
                )
            )
            out.append(
                RepoRevision(
                    repo_id=repo_id,
                    commit=commit,
                    revision_number=number,
                    created=created,
                    files=files,
                    storage=storage,
                    stored_bytes=stored,
                    base_model=base_repo,
                    base_commit=base_commit,
                    relation=relation,
                    signer=signer,
                    note=note,
                )
            )
        return out

    def all_revisions(self) -> list[RepoRevision]:
        return self._revisions("1", ())

    def repo_revisions(self, repo_id: str) -> list[RepoRevision]:
        return self._revisions("repo_id = ?", (repo_id,))

    def revision_by_commit(self, commit: str) -> RepoRevision:
        found = self._revisions("commit_id = ?", (commit,))
        if not found:
            raise InputNotFoundError(f"the store has no revision {commit}", argument="revision")
        return found[0]

    def recipe(self, commit: str) -> tuple[RevisionFile, ...]:
        rows = self._connection().execute(
            "SELECT path, size, sha256, source, object_key, tensor_order, git_oid FROM files WHERE commit_id = ? "
            "ORDER BY path",
            (commit,),
        )
        return tuple(
            RevisionFile(p, s, h, src, key, tuple(json.loads(order)) if order else (), g)
            for p, s, h, src, key, order, g in rows
        )

    def objects(self, commit: str) -> tuple[RevisionObject, ...]:
        rows = self._connection().execute(
            "SELECT role, name, object_key, size FROM objects WHERE commit_id = ? ORDER BY role, name", (commit,)
        )
        return tuple(RevisionObject(role, name, key, size) for role, name, key, size in rows)

    def note(self, commit: str) -> str | None:
        row = self._connection().execute("SELECT note FROM revisions WHERE commit_id = ?", (commit,)).fetchone()
        return row[0] if row else None

    def tensors(self) -> dict[str, dict[str, tuple[str, tuple[int, ...], str]]]:
        """Every revision's tensors (name -> dtype, shape, digest), by commit: what a base is found by."""
        rows = self._connection().execute("SELECT commit_id, tensors FROM revisions")
        return {c: {n: (d, tuple(s), g) for n, (d, s, g) in json.loads(t).items()} for c, t in rows}

    def referenced_keys(self) -> set[str]:
        """Every object key some revision holds."""
        return {k for (k,) in self._connection().execute("SELECT DISTINCT object_key FROM objects")}
