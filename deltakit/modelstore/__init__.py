"""The model store behind ``deltakit registry import`` and the service's registry: fine-tunes kept as
deltas against their bases, everything else whole, every original file's SHA-256 recorded."""

from .catalog import Catalog, check_store_repo_id
from .objects import LocalObjects, Objects
from .store import ImportReport, ModelStore, blob_key, git_blob_oid, list_model_files
from .views import GIT_OID_MAX_BYTES, Relation, RepoRevision, Repositories, RepoSummary, Storage, StoredFile

__all__ = [
    "GIT_OID_MAX_BYTES",
    "Catalog",
    "ImportReport",
    "LocalObjects",
    "ModelStore",
    "Objects",
    "Relation",
    "RepoRevision",
    "RepoSummary",
    "Repositories",
    "Storage",
    "StoredFile",
    "blob_key",
    "check_store_repo_id",
    "git_blob_oid",
    "list_model_files",
]
