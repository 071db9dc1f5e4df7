"""The model store: imports models (a fine-tune as a delta against its base, anything else whole) and
hands out their files byte-identical to the imported originals, rebuilt on demand into a cache.

Every byte goes through an :class:`~deltakit.modelstore.objects.Objects` store under content keys
(``blobs/sha256/..``), so a local folder and a bucket hold the same layout; the catalog says what
each revision's files are made of.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..dtypes import itemsize
from ..errors import DeltakitError, InputNotFoundError, IntegrityError, SignatureError, UnsupportedInputError
from ..formats.checkpoint import Checkpoint, RangeReader, open_checkpoint
from ..formats.safetensors import read_header
from ..hashing import file_sha256, fingerprint
from ..progress import ProgressFactory, no_progress
from ..registry import deltakit_home
from ..signing import MODEL_SIGNATURE, PublicKey, SignedModel, check_model
from .catalog import COMMIT, Catalog, NewRevision, RevisionFile, RevisionObject, check_store_repo_id
from .objects import LocalObjects, Objects
from .rebuild import RebuildCache, lay_out_files
from .views import GIT_OID_MAX_BYTES, Relation, RepoRevision, RepoSummary, Storage

__all__ = ["ImportReport", "ModelStore", "blob_key", "git_blob_oid", "list_model_files"]

log = logging.getLogger(__name__)

# A candidate base whose sampled tensors agree on the sign and high exponent bits of at least this share
# of elements is the import's base: a fine-tune moves weights by little; another model's differ at random.
_SIMILAR = 0.6
_SAMPLE_BYTES = 64 << 10
_SAMPLED_TENSORS = 8
RELATIONS: tuple[Relation, ...] = ("finetune", "adapter", "quantized", "merge")
_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def blob_key(sha256: str) -> str:
    """The object key of content with this SHA-256."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def git_blob_oid(path: Path, size: int) -> str | None:
    """git's id of the blob holding the file at ``path`` (SHA-1 of ``blob <size>\\0<bytes>``), for a file
    under ``GIT_OID_MAX_BYTES``; None for a larger one (an LFS file on the Hub, listed by its SHA-256)."""
    if size >= GIT_OID_MAX_BYTES:
        return None
    data = path.read_bytes()
    if len(data) != size:
        raise IntegrityError(f"{path} changed while it was imported", path=path, expected=size, actual=len(data))
    return hashlib.sha1(b"blob %d\0" % size + data, usedforsecurity=False).hexdigest()


def list_model_files(folder: Path) -> dict[str, Path]:
    """The files of a model folder by repo path: regular files only, hidden files and folders skipped, no
    link that leads outside the folder.

    Raises:
        InputNotFoundError: ``folder`` is not a folder.
        UnsupportedInputError: a link leads outside it, or something other than a file is there.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputNotFoundError(f"{folder} does not exist", path=folder, argument="folder")
    if not folder.is_dir():
        raise UnsupportedInputError(
            f"{folder} is not a folder: a model is imported as a folder", path=folder, argument="folder"
        )
    real_root = folder.resolve()
    found: dict[str, Path] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                raise UnsupportedInputError(
                    f"{path} links to {path.resolve()}, outside the model folder", path=path, argument="folder"
                )
            if not path.is_file():
                raise UnsupportedInputError(f"{path} is not a regular file", path=path, argument="folder")
            found[rel] = path
    if not found:
        raise UnsupportedInputError(f"{folder} holds no files", path=folder, argument="folder")
    return found


@dataclass(frozen=True)
class ImportReport:
    """What an import stored.

    Attributes:
        base_found: the base was found among stored models by tensor digests (not given).
        note: why a model given a base was stored whole, or what was stored whole beside a delta.
    """

    repo_id: str
    commit: str
    revision_number: int
    storage: Storage
    stored_bytes: int
    full_bytes: int
    files: int
    base_model: str | None = None
    base_commit: str | None = None
    base_found: bool = False
    relation: Relation | None = None
    note: str | None = None
    signer: str | None = None


def _hold_to_signature(new: NewRevision, signed: SignedModel, folder: Path) -> None:
    """Refuse a revision whose files are not exactly those the signature checked at the start of the
    import covers, with their SHA-256: a file changed while the import read the folder again."""
    stored = {f.path: f.sha256 for f in new.files if f.path != MODEL_SIGNATURE}
    for path in sorted(set(stored) | set(signed.sha256)):
        if stored.get(path) != signed.sha256.get(path):
            raise SignatureError(
                f"{folder / path} changed while it was imported: it is no longer what {signed.signer} signed",
                path=folder / path,
                expected=signed.sha256.get(path),
                actual=stored.get(path),
            )


def _relation_of(files: dict[str, Path]) -> Relation:
    """How a model stored whole derives from the base it was given, by what it holds, as the Hub's model
    tree says it: GGUF files are a quantization, a PEFT adapter an adapter, anything else a fine-tune."""
    if "adapter_config.json" in files:
        return "adapter"
    if any(rel.endswith(".gguf") for rel in files) and not any(rel.endswith(".safetensors") for rel in files):
        return "quantized"
    return "finetune"


@dataclass(frozen=True)
class _Layout:
    """A checkpoint a delta can rebuild exactly: its safetensors files, with header size and tensor order."""

    ckpt: Checkpoint
    safetensors: dict[str, tuple[int, tuple[str, ...]]]  # repo path -> (header bytes, tensors in data order)
    index: str | None


def _exact_layout(folder: Path, files: dict[str, Path]) -> tuple[_Layout | None, str | None]:
    """The folder's checkpoint if every weight file of it can be rebuilt byte for byte; else why not."""
    try:
        ckpt = open_checkpoint(folder)
    except DeltakitError as e:
        return None, f"its weights cannot be read as a delta's target ({e})"
    weights: dict[str, tuple[int, tuple[str, ...]]] = {}
    index = None
    for path in ckpt.weight_files:
        rel = path.relative_to(folder).as_posix()
        if rel.endswith(".index.json"):
            index = rel
            continue
        if not rel.endswith(".safetensors"):
            return None, f"{rel} is not safetensors: its exact bytes cannot be rebuilt from a delta"
        header = read_header(path)  # checked contiguous and exact to the end by the reader
        weights[rel] = (header.data_start, tuple(header.tensors))
    return _Layout(ckpt, weights, index), None


class ModelStore:
    """The model store of one ``DELTAKIT_HOME``: catalog ``store.sqlite3``, objects (by default the folder
    ``store/``), rebuild cache ``cache/``.

    Args:
        home: the home folder (default ``$DELTAKIT_HOME``).
        objects: where the bytes go (default :class:`LocalObjects` under ``home/store``).
        cache_bytes: the rebuild cache's disk budget (None: unlimited).
        cache_grace: seconds a cache entry handed out by :meth:`file_path` is safe from eviction.
    """

    def __init__(
        self,
        home: Path | None = None,
        *,
        objects: Objects | None = None,
        cache_bytes: int | None = None,
        cache_grace: float = 60.0,
    ) -> None:
        self.home = Path(home) if home is not None else deltakit_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.objects: Objects = objects if objects is not None else LocalObjects(self.home / "store")
        self.catalog = Catalog(self.home / "store.sqlite3")
        self.cache = RebuildCache(self.home / "cache", budget=cache_bytes, grace=cache_grace)
        self._tmp = self.home / "tmp"
        self._tmp.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._checked: dict[str, tuple[int, int, int, int]] = {}

    def close(self) -> None:
        self.catalog.close()

    # -- the faces' protocol (views.Repositories)

    def repositories(self) -> list[RepoSummary]:
        """Every repository, sorted by repo id, with what derives from it."""
        by_repo: dict[str, list[RepoRevision]] = {}
        for rev in self.catalog.all_revisions():
            by_repo.setdefault(rev.repo_id, []).append(rev)
        derived: dict[str, set[str]] = {}
        for repo_id, revs in by_repo.items():
            if revs[-1].base_model:
                derived.setdefault(revs[-1].base_model, set()).add(repo_id)
        return [
            RepoSummary(repo_id, tuple(revs), tuple(sorted(derived.get(repo_id, ()))))
            for repo_id, revs in sorted(by_repo.items())
        ]

    def revision(self, repo_id: str, revision: str = "main") -> RepoRevision:
        """The revision ``revision`` names: ``main`` (the latest), a commit, or a revision number.

        Raises:
            UnsupportedInputError: ``repo_id`` is not ``ORG/NAME`` (``argument`` ``repo_id``).
            InputNotFoundError: no such repository (``repo_id``) or revision (``revision``).
        """
        check_store_repo_id(repo_id)
        revs = self.catalog.repo_revisions(repo_id)
        if not revs:
            raise InputNotFoundError(f"the store has no repository {repo_id!r}", argument="repo_id")
        revision = str(revision)
        if revision == "main":
            return revs[-1]
        if COMMIT.match(revision):
            found = next((r for r in revs if r.commit == revision), None)
        elif re.fullmatch(r"[0-9]{1,9}", revision):
            found = next((r for r in revs if r.revision_number == int(revision)), None)
        else:
            found = None
        if found is None:
            raise InputNotFoundError(
                f"{repo_id} has no revision {revision!r} (main, a commit, or 1..{len(revs)})", argument="revision"
            )
        return found

    def file_path(self, revision: RepoRevision, path: str, *, progress: ProgressFactory = no_progress) -> Path:
        """A local file holding exactly the imported bytes of ``path`` in ``revision``; a delta revision (or a
        whole one in a remote store) is rebuilt into the cache first, once however many callers ask.

        The path stays valid for ``cache_grace`` seconds, or while the caller holds :meth:`hold`.

        Raises:
            InputNotFoundError: ``revision`` has no file ``path`` (``argument`` ``path``).
            IntegrityError: a whole file's object no longer has its SHA-256.
        """
        recipe = self.catalog.recipe(revision.commit)
        wanted = next((f for f in recipe if f.path == path), None)
        if wanted is None:
            raise InputNotFoundError(f"{revision.repo_id} has no file {path!r}", argument="path")
        if wanted.source == "object" and revision.storage == "whole":
            assert wanted.object_key is not None
            local = self.objects.local_path(wanted.object_key)
            if local is not None:
                self._check_object(wanted, local)
                return local
        for _ in range(3):  # an entry another process evicts between the build and the look is built again
            file = self.cache.cached_file(revision.commit, path, wanted)
            if file is not None:
                return file
            self.ensure_cached(revision, progress=progress)
        raise IntegrityError(f"{revision.repo_id}@{revision.commit}: {path} could not be kept in the cache", path=path)

    # -- rebuilds

    def is_cached(self, revision: RepoRevision) -> bool:
        """Whether every file of ``revision`` can be served without a rebuild or a fetch."""
        if revision.storage == "whole" and all(
            f.object_key is not None and self.objects.local_path(f.object_key) is not None
            for f in self.catalog.recipe(revision.commit)
        ):
            return True
        return self.cache.is_cached(revision.commit)

    def ensure_cached(self, revision: RepoRevision, *, progress: ProgressFactory = no_progress) -> bool:
        """Rebuild (or fetch) ``revision`` into the cache unless it is there; returns whether this call did.
        Concurrent callers, in this process or others, wait for one rebuild."""
        recipe = self.catalog.recipe(revision.commit)
        return self.cache.ensure(revision.commit, recipe, lambda dest: self._build(revision, recipe, dest, progress))

    @contextlib.contextmanager
    def hold(self, revision: RepoRevision) -> Iterator[None]:
        """Keep ``revision``'s cache entry from eviction while the block runs (a reader's lease)."""
        with self.cache.hold(revision.commit):
            yield

    def _build(
        self, revision: RepoRevision, recipe: Sequence[RevisionFile], dest: Path, progress: ProgressFactory
    ) -> None:
        log.info("rebuilding %s@%s (%s)", revision.repo_id, revision.commit, revision.storage)
        with self._scratch("rebuild") as scratch:
            # one bar for the files as they are laid out and checked; apply (and a base's own rebuild)
            # report theirs through the same factory
            bar = progress(sum(f.size for f in recipe), f"rebuild {revision.repo_id}")
            try:
                applied = None
                if revision.storage == "delta":
                    base = self.catalog.revision_by_commit(revision.base_commit or "")
                    package = self._package(revision.commit, scratch / "delta")
                    with self._materialized(base, progress) as base_folder:
                        self._apply(base_folder, package, scratch / "applied", progress)
                    applied = scratch / "applied"
                lay_out_files(
                    recipe,
                    dest,
                    applied=applied,
                    objects=self._object_file,
                    scratch=scratch,
                    progress=lambda _total, _description: bar,
                )
            finally:
                bar.close()

    @staticmethod
    def _apply(base: Path, package: Path, out: Path, progress: ProgressFactory) -> None:
        from ..engine import apply_delta  # the engine is heavy; listing the store needs none of it

        apply_delta(base, package, out, progress=progress)

    def _object_file(self, key: str, scratch: Path) -> Path:
        local = self.objects.local_path(key)
        if local is not None:
            return local
        dest = scratch / "objects" / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            self.objects.get_file(key, dest)
        return dest

    def _package(self, commit: str, dest: Path) -> Path:
        """The revision's delta package as a local folder: objects linked where the store is local."""
        for obj in self.catalog.objects(commit):
            if obj.role != "delta":
                continue
            target = dest / obj.name
            target.parent.mkdir(parents=True, exist_ok=True)
            local = self.objects.local_path(obj.key)
            if local is not None:
                try:
                    os.link(local, target)
                    continue
                except OSError:
                    pass
            self.objects.get_file(obj.key, target)
        return dest

    @contextlib.contextmanager
    def _materialized(self, revision: RepoRevision, progress: ProgressFactory) -> Iterator[Path]:
        """``revision``'s files as one local folder under their repo paths, for the time of the block."""
        recipe = self.catalog.recipe(revision.commit)
        locals_ = {
            f.path: self.objects.local_path(f.object_key)
            for f in recipe
            if revision.storage == "whole" and f.object_key is not None
        }
        if revision.storage == "whole" and len(locals_) == len(recipe) and all(locals_.values()):
            with self._scratch("base") as folder:
                for rel, local in locals_.items():
                    assert local is not None
                    target = folder / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(local, target)
                    except OSError:
                        target.symlink_to(local)
                yield folder
            return
        self.ensure_cached(revision, progress=progress)
        self.cache.touch(revision.commit)  # in use as a base: recently used too
        with self.cache.hold(revision.commit):
            if not self.cache.is_cached(revision.commit):  # evicted between the two: build again, held
                self.ensure_cached(revision, progress=progress)
            yield self.cache.entry(revision.commit) / "files"

    def _check_object(self, f: RevisionFile, local: Path) -> None:
        """Hash a whole file's object once per process (again whenever its stat changes)."""
        st = local.stat()
        stamp = (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if self._checked.get(f.sha256) == stamp:
            return
        sha, size = file_sha256(local)
        if (sha, size) != (f.sha256, f.size):
            raise IntegrityError(
                f"the store's object for {f.path} has sha256 {sha[:16]}..., not the imported {f.sha256[:16]}...: "
                "the store is damaged",
                path=local,
                expected=f.sha256,
                actual=sha,
            )
        self._checked[f.sha256] = stamp

    @contextlib.contextmanager
    def _scratch(self, what: str) -> Iterator[Path]:
        folder = Path(tempfile.mkdtemp(prefix=f"{what}-", dir=self._tmp))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- import

    def import_model(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        base: str | None = None,
        relation: Relation | None = None,
        trusted: Sequence[PublicKey] = (),
        progress: ProgressFactory = no_progress,
    ) -> ImportReport:
        """Store the model in ``folder`` as a new revision of ``repo_id``.

        With ``trusted`` keys, the folder must carry a ``model.sig`` by one of them over every file as it is
        (checked before anything is stored); its signer is recorded with the revision.

        With a base (``ORG/NAME[@REVISION]`` in the store), or one found among stored models by tensor
        digests, the model is stored as a compressed delta against it, checked to rebuild every file
        byte for byte first; a model whose weight files cannot be rebuilt exactly (``.bin``, unreadable
        safetensors) or without a base is stored whole. Objects are written first, the revision last:
        a failed import leaves no revision and no object of its own.

        Raises:
            UnsupportedInputError: ``repo_id`` or ``base`` is no ``ORG/NAME``; the folder holds a link out.
            InputNotFoundError: the folder or the base does not exist.
            RawWeightsError, BaseMismatchError: the base given is not this model's.
            IntegrityError: the delta does not rebuild the folder's files exactly.
            UntrustedSignerError, SignatureError: ``trusted`` is given and no trusted key signed the folder
                as it is.
        """
        check_store_repo_id(repo_id)
        if relation is not None and relation not in RELATIONS:
            raise UnsupportedInputError(
                f"unknown relation {relation!r}; choose one of {', '.join(RELATIONS)}",
                expected=RELATIONS,
                actual=relation,
                argument="relation",
            )
        folder = Path(folder)
        files = list_model_files(folder)
        signed = check_model(folder, trusted) if trusted else None
        base_rev = self.base_revision(base) if base is not None else None
        layout, why_whole = _exact_layout(folder, files)
        tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
        if layout is not None and base_rev is None:  # with a base, make's manifest records the digests
            from ..engine import checkpoint_digests

            digests = checkpoint_digests(layout.ckpt, progress)
            tensors = {n: (t.dtype, t.shape, digests[n]) for n, t in layout.ckpt.tensors.items()}
        found = False
        if base_rev is None and layout is not None:
            base_rev = self._find_base(repo_id, layout.ckpt, tensors)
            found = base_rev is not None
            if found:
                assert base_rev is not None
                log.info("%s: found its base %s@%s by tensor digests", repo_id, base_rev.repo_id, base_rev.commit)
        elif base_rev is not None and layout is None:
            log.warning("%s: stored whole although a base was given: %s", repo_id, why_whole)
        with self._scratch("import") as scratch:
            if base_rev is not None and layout is not None:
                how = relation or "finetune"
                new = self._delta_revision(repo_id, folder, files, layout, base_rev, how, scratch, progress)
            else:
                model_fp = fingerprint((n, d, s, g) for n, (d, s, g) in tensors.items()) if tensors else None
                note = f"stored whole: {why_whole}" if base_rev is not None else None
                new = self._whole_revision(repo_id, files, scratch, progress, tensors, model_fp, note)
                if base_rev is not None:  # derived, though not storable as a delta (GGUF, an adapter, .bin)
                    new = replace(
                        new,
                        base_repo=base_rev.repo_id,
                        base_commit=base_rev.commit,
                        relation=relation or _relation_of(files),
                    )
            if signed is not None:  # what was stored must be what was signed, however the folder changed since
                _hold_to_signature(new, signed, folder)
            stored = self._commit(replace(new, signer=signed.signer.short if signed else None), scratch)
        return ImportReport(
            repo_id=repo_id,
            commit=stored.commit,
            revision_number=stored.revision_number,
            storage=stored.storage,
            stored_bytes=stored.stored_bytes,
            full_bytes=stored.full_bytes,
            files=len(stored.files),
            base_model=stored.base_model,
            base_commit=stored.base_commit,
            base_found=found and stored.storage == "delta",
            relation=stored.relation,
            note=new.note,
            signer=stored.signer,
        )

    def base_revision(self, spec: str) -> RepoRevision:
        """The stored revision ``spec`` (``ORG/NAME[@REVISION]``) names, as an import's base.

        Raises:
            UnsupportedInputError, InputNotFoundError: it is no repo id, or names nothing stored (``argument``
                ``base``).
        """
        repo_id, _, rev = spec.partition("@")
        check_store_repo_id(repo_id, argument="base")
        try:
            return self.revision(repo_id, rev or "main")
        except InputNotFoundError as e:
            raise InputNotFoundError(f"base {spec!r}: {e}", argument="base") from e

    @staticmethod
    def _new_commit(repo_id: str, files: dict[str, tuple[str, int]]) -> str:
        seed = json.dumps([repo_id, time.time(), uuid.uuid4().hex, sorted(files.items())])
        return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()

    def _whole_revision(
        self,
        repo_id: str,
        files: dict[str, Path],
        scratch: Path,
        progress: ProgressFactory,
        tensors: dict[str, tuple[str, tuple[int, ...], str]],
        model_fp: str | None,
        note: str | None,
    ) -> NewRevision:
        bar = progress(sum(p.stat().st_size for p in files.values()), "copy")
        recipe, objects, hashes = [], [], {}
        for rel, path in files.items():
            copy = scratch / "whole" / rel  # the snapshot that is hashed is the one stored
            copy.parent.mkdir(parents=True, exist_ok=True)
            sha, size = file_sha256(path, copy_to=copy, on_bytes=bar.update)
            hashes[rel] = (sha, size)
            recipe.append(RevisionFile(rel, size, sha, "object", blob_key(sha), git_oid=git_blob_oid(copy, size)))
            objects.append(RevisionObject("file", rel, blob_key(sha), size))
        bar.close()
        return NewRevision(
            repo_id=repo_id,
            commit=self._new_commit(repo_id, hashes),
            created=time.time(),
            storage="whole",
            files=tuple(recipe),
            objects=tuple(objects),
            tensors=tensors,
            fingerprint=model_fp,
            note=note,
        )

    def _delta_revision(
        self,
        repo_id: str,
        folder: Path,
        files: dict[str, Path],
        layout: _Layout,
        base: RepoRevision,
        relation: Relation,
        scratch: Path,
        progress: ProgressFactory,
    ) -> NewRevision:
        from ..engine import make_delta

        with self._materialized(base, progress) as base_folder:
            made = make_delta(
                base_folder, folder, scratch / "delta", name=repo_id, base_name=base.repo_id, progress=progress
            )
            carried = made.manifest.target.files
            recipe, objects, hashes = [], [], {}
            notes = []
            for rel, path in files.items():
                if rel in layout.safetensors:
                    header_size, order = layout.safetensors[rel]
                    header = scratch / "headers" / rel
                    header.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "rb") as src:
                        header.write_bytes(src.read(header_size))
                    header_sha, _ = file_sha256(header)
                    sha, size = file_sha256(path)
                    recipe.append(
                        RevisionFile(
                            rel, size, sha, "safetensors", blob_key(header_sha), order, git_blob_oid(path, size)
                        )
                    )
                    objects.append(RevisionObject("header", rel, blob_key(header_sha), header_size))
                elif rel in carried:
                    record = carried[rel]
                    copy = scratch / "delta" / "files" / rel  # the bytes the package carries, checked below
                    oid = git_blob_oid(copy if copy.is_file() else path, record.size)
                    recipe.append(RevisionFile(rel, record.size, record.sha256, "carried", git_oid=oid))
                    sha, size = record.sha256, record.size
                else:  # the shard index, and weight files the delta does not hold: kept as they are
                    copy = scratch / "objects" / rel
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    sha, size = file_sha256(path, copy_to=copy)
                    recipe.append(
                        RevisionFile(rel, size, sha, "object", blob_key(sha), git_oid=git_blob_oid(copy, size))
                    )
                    objects.append(RevisionObject("file", rel, blob_key(sha), size))
                    if rel != layout.index:
                        notes.append(rel)
                hashes[rel] = (sha, size)
            package = scratch / "delta"
            for path in sorted(p for p in package.rglob("*") if p.is_file()):
                sha, size = file_sha256(path)
                objects.append(RevisionObject("delta", path.relative_to(package).as_posix(), blob_key(sha), size))
            # the check: the stored recipe rebuilds every original file, byte for byte
            staged = {o.key: p for o, p in self._staged_objects(objects, scratch).items()}
            self._apply(base_folder, package, scratch / "applied", progress)
        lay_out_files(
            recipe,
            None,  # hashed, not written: the check needs no second copy of the model
            applied=scratch / "applied",
            objects=lambda key, _scratch: staged[key],
            scratch=scratch / "fetched",  # not the staged objects' folder: laid files are moved out of it
            progress=progress,
        )
        shutil.rmtree(scratch / "applied", ignore_errors=True)
        note = f"stored whole beside the delta: {', '.join(notes)}" if notes else None
        if notes:
            log.warning("%s: %s", repo_id, note)
        return NewRevision(
            repo_id=repo_id,
            commit=self._new_commit(repo_id, hashes),
            created=time.time(),
            storage="delta",
            files=tuple(recipe),
            objects=tuple(objects),
            tensors={n: (t.dtype, t.shape, t.digest) for n, t in made.manifest.target.tensors.items()},
            fingerprint=made.manifest.target.fingerprint,
            base_repo=base.repo_id,
            base_commit=base.commit,
            relation=relation,
            note=note,
        )

    @staticmethod
    def _staged_objects(objects: Sequence[RevisionObject], scratch: Path) -> dict[RevisionObject, Path]:
        """Where each object of an import waits in ``scratch`` before it is stored."""
        where = {
            "file": (scratch / "whole", scratch / "objects"),
            "delta": (scratch / "delta",),
            "header": (scratch / "headers",),
        }
        out = {}
        for obj in objects:
            out[obj] = next(p / obj.name for p in where[obj.role] if (p / obj.name).is_file())
        return out

    def _commit(self, new: NewRevision, scratch: Path) -> RepoRevision:
        """Store the objects, then the revision's rows in one transaction; on failure the objects this
        import added are removed again. Imports commit one at a time (across processes too), so an
        object another import is about to claim is never removed."""
        staged = self._staged_objects(new.objects, scratch)
        with self._store_lock():
            added: list[str] = []
            try:
                for obj, path in staged.items():
                    if not self.objects.exists(obj.key):
                        self.objects.put_file(obj.key, path)
                        added.append(obj.key)
                return self.catalog.add_revision(new)
            except BaseException:
                for key in added:
                    self.objects.delete(key)
                raise

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        with self._lock, open(self.home / "store.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def set_signer(self, revision: RepoRevision, signer: str | None) -> RepoRevision:
        """Record the fingerprint of the key that signed what ``revision`` imported."""
        self.catalog.set_signer(revision.commit, signer)
        return self.catalog.revision_by_commit(revision.commit)

    def orphan_objects(self) -> list[str]:
        """Objects no revision holds (what an interrupted import may leave; nothing, normally)."""
        with self._store_lock():
            held = self.catalog.referenced_keys()
            return sorted(k for k in self.objects.keys() if k not in held)  # noqa: SIM118 - Objects.keys(), no dict

    # -- finding a base

    def _find_base(
        self, repo_id: str, ckpt: Checkpoint, tensors: dict[str, tuple[str, tuple[int, ...], str]]
    ) -> RepoRevision | None:
        """The stored revision (of another repository) this model is most likely fine-tuned from: one that
        has its tensors (same names and dtypes) with identical digests for some and, sampled, nearly the
        same sign and exponent bits for the rest."""
        stored = self.catalog.tensors()
        best: tuple[float, int, float, RepoRevision] | None = None
        for rev in self.catalog.all_revisions():
            theirs = stored.get(rev.commit) or {}
            if rev.repo_id == repo_id or not theirs:
                continue
            shared = [n for n, (d, s, _) in tensors.items() if n in theirs and _fits(theirs[n][:2], (d, s))]
            if len(shared) * 2 < len(tensors) or any(n in theirs and n not in shared for n in tensors):
                continue
            same = sum(1 for n in shared if theirs[n][2] == tensors[n][2])
            differing = [n for n in shared if theirs[n][2] != tensors[n][2] and theirs[n][1] == tensors[n][1]]
            similarity = self._similarity(rev, ckpt, differing)
            if similarity is None:  # not at hand without a rebuild: identical tensors decide
                similarity = same / len(tensors)
            if similarity < _SIMILAR:
                continue
            score = (similarity, same, rev.created, rev)
            if best is None or score[:3] > best[:3]:
                best = score
        return best[3] if best else None

    def _similarity(self, rev: RepoRevision, ckpt: Checkpoint, names: Sequence[str]) -> float | None:
        """The share of sampled elements whose top byte (sign and high exponent bits) ``rev`` and ``ckpt``
        agree on; None where ``rev``'s files are not at hand (a delta not in the cache)."""
        names = sorted((n for n in names if ckpt.tensors[n].dtype in _FLOATS), key=lambda n: -ckpt.tensors[n].nbytes)[
            :_SAMPLED_TENSORS
        ]
        if not names:
            return 1.0
        if rev.storage == "delta" and not self.cache.is_cached(rev.commit):
            return None
        agree = total = 0
        with self._materialized(rev, no_progress) as folder, RangeReader() as reader:
            theirs = open_checkpoint(folder).tensors
            for name in names:
                mine, other = ckpt.tensors[name], theirs[name]
                width = itemsize(mine.dtype)
                length = min(mine.nbytes, _SAMPLE_BYTES) // width * width
                a, b = bytearray(length), bytearray(length)
                reader.read_into(mine.path, mine.start, memoryview(a))
                reader.read_into(other.path, other.start, memoryview(b))
                top_a = np.frombuffer(a, np.uint8).reshape(-1, width)[:, -1]
                top_b = np.frombuffer(b, np.uint8).reshape(-1, width)[:, -1]
                agree += int(np.count_nonzero(top_a == top_b))
                total += top_a.size
        return agree / total if total else 1.0


def _fits(base: tuple[str, tuple[int, ...]], target: tuple[str, tuple[int, ...]]) -> bool:
    """A base tensor a target tensor can be a delta of: same dtype and shape, or more rows (vocabulary growth)."""
    (bd, bs), (td, ts) = base, target
    return bd == td and len(bs) == len(ts) and bs[1:] == ts[1:] and (bs[:1] <= ts[:1])
