"""The embedded job and token store: one SQLite file under the data root.

Every method opens its own short transaction under one lock, so the worker threads and the request
handlers can share it; the store holds state, the runner does the work.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakit.errors import InputNotFoundError, NoSpaceError, UnsupportedInputError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
_SQLITE_FULL = 13  # the result code of "database or disk is full"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    state TEXT NOT NULL,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    stage TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    report TEXT,
    error TEXT,
    temp_output TEXT
);
CREATE TABLE IF NOT EXISTS probe (
    filler BLOB
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    created REAL NOT NULL,
    name TEXT,
    last_used REAL
);
"""

# Columns the tokens table gained after its first release, added to a store made before them.
_TOKEN_COLUMNS = {"name": "TEXT", "last_used": "REAL"}
TOKEN_ID_LENGTH = 12  # hex digits of the token's SHA-256 that name it in lists and revocations
_TOKEN_ID = re.compile(r"^[0-9a-fA-F]{8,64}$")
_TOKEN_NAME_LENGTH = 100
_LAST_USED_EVERY = 60.0  # seconds: a token's use is written at most this often, not on every request"""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str
    bytes_done: int
    bytes_total: int
    stage: str | None
    created: float
    started: float | None
    finished: float | None
    report: dict[str, Any] | None
    error: dict[str, Any] | None
    temp_output: str | None

    @property
    def duration(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


@dataclass(frozen=True)
class TokenInfo:
    """What is known of a token, never the token itself.

    Attributes:
        id: the first 12 hex digits of its SHA-256: what ``token list`` shows and ``token revoke`` takes.
        scope: ``read`` or ``write``.
        name: the label it was created with, if any.
        created: when it was made (seconds since the epoch).
        last_used: when it last authenticated a request (to within a minute), or None if never.
    """

    id: str
    scope: str
    name: str | None
    created: float
    last_used: float | None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyReused(Exception):
    """An Idempotency-Key that already names a job made from another request."""


def request_hash(kind: str, params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([kind, params], sort_keys=True).encode()).hexdigest()


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # progress writes need not reach the disk before a request may read the store; the job rows
        # that matter (a state change) survive a crash of the process either way in WAL mode
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        with self._lock:
            present = {str(r["name"]) for r in self._db.execute("PRAGMA table_info(tokens)")}
            for column, kind in _TOKEN_COLUMNS.items():
                if column not in present:
                    self._db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite's "database or disk is full" comes out as NoSpaceError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as e:
                if getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(e):
                    raise NoSpaceError(
                        f"the job store {self.path.name} cannot be written: its disk is full ({e})", path=self.path
                    ) from e
                raise

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._locked() as db:
            return db.execute(sql, args).fetchall()

    def probe(self) -> None:
        """Write (and take back) a few pages, as a new job would: raises when the store cannot grow.

        Raises:
            NoSpaceError: its disk (or SQLite's page limit) is full.
            sqlite3.Error: it cannot be written for another reason.
        """
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO probe (filler) VALUES (zeroblob(16384))")
                db.execute("DELETE FROM probe")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # tokens ----------------------------------------------------------------------------------------

    def create_token(self, scope: str, *, name: str | None = None) -> str:
        """A new bearer token, returned once; only its hash is kept.

        Args:
            scope: ``read`` or ``write``.
            name: a label to tell it apart in ``token list`` (up to 100 printable characters).

        Raises:
            UnsupportedInputError: ``name`` is too long or holds control characters.
        """
        if scope not in ("read", "write"):
            raise UnsupportedInputError(f"{scope!r} is not a token scope (read or write)", argument="scope")
        if name is not None and (len(name) > _TOKEN_NAME_LENGTH or not name.isprintable()):
            raise UnsupportedInputError(
                f"the token name {name[:40]!r} is not a label of up to {_TOKEN_NAME_LENGTH} printable characters",
                argument="name",
            )
        token = "dk_" + secrets.token_urlsafe(32)
        self._run(
            "INSERT INTO tokens (hash, scope, created, name) VALUES (?, ?, ?, ?)",
            (_token_hash(token), scope, time.time(), name or None),
        )
        return token

    def token_scope(self, token: str) -> str | None:
        """The token's scope, or None when it is unknown (never made, or revoked); records its use."""
        digest = _token_hash(token)
        rows = self._run("SELECT scope, last_used FROM tokens WHERE hash = ?", (digest,))
        if not rows:
            return None
        now = time.time()
        last_used = rows[0]["last_used"]
        if last_used is None or now - float(last_used) >= _LAST_USED_EVERY:  # a write a minute, not a request
            self._run("UPDATE tokens SET last_used = ? WHERE hash = ?", (now, digest))
        return str(rows[0]["scope"])

    def list_tokens(self) -> list[TokenInfo]:
        """Every token, oldest first, by id: the tokens themselves were never kept."""
        return [_token_info(r) for r in self._run("SELECT * FROM tokens ORDER BY created, hash")]

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Forget the token ``token_id`` names (its id from ``list_tokens``, or a longer prefix of its hash):
        from the next request on, it is refused like any unknown token.

        Raises:
            UnsupportedInputError: ``token_id`` is not 8 to 64 hex digits, or names more than one token.
            InputNotFoundError: no token has that id.
        """
        if not _TOKEN_ID.match(token_id):
            raise UnsupportedInputError(
                f"{token_id[:80]!r} is not a token id (8 to 64 hex digits)", argument="token_id"
            )
        prefix = token_id.lower()
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                rows = db.execute("SELECT * FROM tokens WHERE substr(hash, 1, ?) = ?", (len(prefix), prefix)).fetchall()
                if len(rows) == 1:
                    db.execute("DELETE FROM tokens WHERE hash = ?", (rows[0]["hash"],))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if not rows:
            raise InputNotFoundError(f"no token has the id {token_id!r}", argument="token_id")
        if len(rows) > 1:
            raise UnsupportedInputError(
                f"the token id {token_id!r} begins {len(rows)} tokens' hashes: give more of it", argument="token_id"
            )
        return _token_info(rows[0])

    # jobs ------------------------------------------------------------------------------------------

    def create_job(self, kind: str, params: dict[str, Any], idempotency_key: str | None) -> tuple[Job, bool]:
        """Queue a job, or return the one this request already made: ``(job, created)``.

        Raises:
            KeyReused: ``idempotency_key`` names a job of another request (compared in the same
                transaction as the insert, so concurrent requests cannot both pass).
        """
        digest = request_hash(kind, params)
        with self._locked():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency_key is not None:
                    row = self._db.execute(
                        "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                    ).fetchone()
                else:
                    row = self._db.execute(
                        "SELECT * FROM jobs WHERE request_hash = ? AND state IN ('queued', 'running') "
                        "ORDER BY created LIMIT 1",
                        (digest,),
                    ).fetchone()
                created = row is None
                if created:
                    job_id = uuid.uuid4().hex
                    self._db.execute(
                        "INSERT INTO jobs (id, kind, params, request_hash, idempotency_key, state, created) "
                        "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                        (job_id, kind, json.dumps(params), digest, idempotency_key, time.time()),
                    )
                    row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    self._db.execute("ROLLBACK")
                raise
        if row["request_hash"] != digest:  # only a key can name another request's job
            raise KeyReused(f"{idempotency_key!r} names job {row['id']}, made from another request")
        return _job(row), created

    def by_key(self, idempotency_key: str) -> Job | None:
        rows = self._run("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,))
        return _job(rows[0]) if rows else None

    def get(self, job_id: str) -> Job | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def recent(self, limit: int = 100) -> list[Job]:
        return [_job(r) for r in self._run("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))]

    def queued(self) -> list[Job]:
        return [_job(r) for r in self._run("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created")]

    _UPDATABLE = frozenset({"bytes_done", "bytes_total", "stage"})

    def update(self, job_id: str, **fields: Any) -> None:
        """Progress fields only; states change through start() and finish()."""
        if not fields.keys() <= self._UPDATABLE:
            raise ValueError(f"not an updatable job field: {sorted(fields.keys() - self._UPDATABLE)}")
        encoded = {k: json.dumps(v) if k in ("report", "error") and v is not None else v for k, v in fields.items()}
        columns = ", ".join(f"{k} = ?" for k in encoded)
        self._run(f"UPDATE jobs SET {columns} WHERE id = ?", (*encoded.values(), job_id))

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        report: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        only_if: str = "running",
    ) -> bool:
        """End a job, only from the state it must be in: a cancel and a finish never overwrite each other."""
        with self._locked():
            cursor = self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, report = ?, error = ? WHERE id = ? AND state = ?",
                (
                    state,
                    time.time(),
                    json.dumps(report) if report is not None else None,
                    json.dumps(error) if error is not None else None,
                    job_id,
                    only_if,
                ),
            )
            return cursor.rowcount == 1

    def start(self, job_id: str) -> bool:
        """Mark a queued job running; False when it was cancelled meanwhile."""
        with self._locked():
            cursor = self._db.execute(
                "UPDATE jobs SET state = 'running', started = ? WHERE id = ? AND state = 'queued'",
                (time.time(), job_id),
            )
            return cursor.rowcount == 1

    def counts(self) -> dict[str, int]:
        rows = self._run("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = dict.fromkeys(STATES, 0)
        counts.update({str(r["state"]): int(r["n"]) for r in rows})
        return counts

    def totals(self) -> tuple[int, float, int]:
        """Bytes processed by finished jobs, and the sum and count of their durations."""
        rows = self._run(
            "SELECT COALESCE(SUM(bytes_done), 0) AS b, COALESCE(SUM(finished - started), 0) AS d, COUNT(*) AS n "
            "FROM jobs WHERE finished IS NOT NULL AND started IS NOT NULL"
        )
        return int(rows[0]["b"]), float(rows[0]["d"]), int(rows[0]["n"])


def token_id(token: str) -> str:
    """The id that names ``token`` in lists and revocations: the first 12 hex digits of its SHA-256."""
    return _token_hash(token)[:TOKEN_ID_LENGTH]


def _token_info(row: sqlite3.Row) -> TokenInfo:
    return TokenInfo(
        id=str(row["hash"])[:TOKEN_ID_LENGTH],
        scope=str(row["scope"]),
        name=row["name"],
        created=float(row["created"]),
        last_used=float(row["last_used"]) if row["last_used"] is not None else None,
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        params=json.loads(row["params"]),
        state=row["state"],
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        stage=row["stage"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        report=json.loads(row["report"]) if row["report"] else None,
        error=json.loads(row["error"]) if row["error"] else None,
        temp_output=row["temp_output"],
    )
