"""Publishing a delta package to the Hub: verify it, render its card, and send what the repo lacks in one commit.

``create_commit`` uploads only the LFS objects the Hub lacks, so re-running an interrupted publish sends
only what is missing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import HubError, IntegrityError
from ..files import read_json_object, read_regular
from ..formats.delta import FILES_DIR
from ..hashing import file_sha256
from ..manifest import MANIFEST_NAME, Manifest, load_manifest
from ..signing import SIGNATURE_FILES, signer_of
from ._http import http_reason, is_transport_error
from .card import CardMetadata, model_card
from .repo_ids import parse_repo_spec

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["PublishReport", "publish_delta"]

# The payload files of a package, which a newer package of fewer shards no longer lists.
_PAYLOAD_NAME = re.compile(r"^delta(-\d{5}-of-\d{5})?\.safetensors$")


@dataclass(frozen=True)
class PublishReport:
    """What publish uploaded, or with ``dry_run`` would upload.

    Attributes:
        files: every file of the package with its size (what a dry run would upload).
        uploaded: the files the commit changed; ``unchanged``: those the repo already held as they are.
        deleted: files of an earlier package the new one does not list (stale payload shards).
        commit: the new commit, or when nothing changed (or a dry run) None; ``head`` is then the
            revision's commit as it stands.
        tag: the tag created on the published commit, if one was asked for.
        pull_request: the pull request's URL when the commit was opened as one.
    """

    repo_id: str
    revision: str
    commit: str | None
    commit_url: str | None
    files: tuple[tuple[str, int], ...]
    dry_run: bool
    uploaded: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    head: str | None = None
    tag: str | None = None
    pull_request: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.uploaded or self.deleted)


def _package_files(root: Path, manifest: Manifest) -> list[tuple[str, Path]]:
    files = [(MANIFEST_NAME, root / MANIFEST_NAME)]
    files += [(name, root / name) for name in manifest.payload]
    files += [(f"{FILES_DIR}/{rel}", root / FILES_DIR / rel) for rel in manifest.target.files]
    files += [(name, root / name) for name in SIGNATURE_FILES if (root / name).is_file()]
    return files


def _target_config(root: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The fine-tune's ``config.json`` as the package carries it, if it does and it parses."""
    if "config.json" not in manifest.target.files:
        return None
    try:
        return read_json_object(root / FILES_DIR / "config.json")
    except (OSError, ValueError):  # InputNotFoundError is an OSError; FormatError and UnsupportedInputError ValueErrors
        return None


def publish_delta(
    delta: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    metadata: CardMetadata,
    tag: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
) -> PublishReport:
    """Verify a delta package, then upload it with a generated model card in one commit.

    Only what differs from the revision is sent, and the files of an earlier package that this one
    does not list (payload shards, carried files) are deleted in the same commit; when nothing
    differs, no commit is made.

    Args:
        metadata: what the model card says beyond the manifest: the base's Hub id, the license...
        tag: a tag to create on the published commit (``v1.0``), so users can pin ``ORG/NAME@v1.0``.
        create_pr: open the commit as a pull request instead of committing to the branch.

    Raises:
        IntegrityError: the package does not verify; nothing is uploaded.
        HubError: the Hub refused (no token, no permission...).
    """
    from ..engine import verify_delta

    root = Path(delta)
    parse_repo_spec(repo_id, argument="repo_id")
    report = verify_delta(root)
    if not report.ok:
        first = report.missing[0] if report.missing else report.mismatched[0].name
        raise IntegrityError(f"{root} does not verify ({first}); not publishing it", path=root)
    signer = signer_of(root)  # a signed package's signature must verify before it is sent
    manifest = load_manifest(root)
    card = model_card(manifest, repo_id, metadata, config=_target_config(root, manifest), signer=signer)
    files = _package_files(root, manifest)
    listing = (("README.md", len(card.encode())), *((name, path.stat().st_size) for name, path in files))
    branch = revision or "main"
    if dry_run:
        return PublishReport(repo_id, branch, None, None, listing, True)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token, library_name="deltakit", library_version=__version__)
    local = {"README.md": _Local(card.encode()), **{name: _Local(path) for name, path in files}}
    recorded = {name: record.sha256 for name, record in manifest.payload.items()}
    recorded.update({f"{FILES_DIR}/{rel}": record.sha256 for rel, record in manifest.target.files.items()})
    try:
        _check_card(api, card, repo_id, token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            raise HubError(
                f"{repo_id} exists and is public; refusing to publish what was asked to be private",
                argument="repo_id",
            )
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        remote = _remote_files(api, repo_id, branch)
        unchanged = tuple(
            n for n, f in local.items() if n in remote and remote[n] == f.oids(recorded.get(n), remote[n])
        )
        uploaded = tuple(n for n in local if n not in unchanged)
        deleted = tuple(sorted(n for n in remote if n not in local and _owned_by_a_package(n)))
        info = None
        if uploaded or deleted:
            operations: list[Any] = [
                CommitOperationAdd(path_in_repo=n, path_or_fileobj=local[n].source) for n in uploaded
            ]
            operations += [CommitOperationDelete(path_in_repo=n) for n in deleted]
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message or f"Upload {manifest.target.name} as a deltakit delta",
                revision=branch,
                create_pr=create_pr,
            )
        head = info.oid if info is not None else api.repo_info(repo_id, revision=branch).sha
        if tag is not None:
            api.create_tag(repo_id, tag=tag, revision=head)
    except HubError:
        raise
    except HfHubHTTPError as e:
        raise _refusal(e, repo_id, branch) from e
    except (OSError, RuntimeError) as e:  # huggingface_hub wraps failed LFS uploads in a RuntimeError
        cause = e.__cause__ if isinstance(e.__cause__, HfHubHTTPError) else e
        raise HubError(
            f"publishing to {repo_id} failed: {http_reason(cause)}; run the same command again to send what "
            "did not arrive"
        ) from e
    except Exception as e:
        if not is_transport_error(e):
            raise
        raise HubError(f"could not publish to {repo_id}: the Hub cannot be reached ({type(e).__name__})") from e
    return PublishReport(
        repo_id,
        branch,
        info.oid if info is not None else None,
        info.commit_url if info is not None else None,
        listing,
        False,
        uploaded=uploaded,
        unchanged=unchanged,
        deleted=deleted,
        head=head,
        tag=tag,
        pull_request=info.pr_url if info is not None else None,
    )


@dataclass(frozen=True)
class _Local:
    """A file to publish: bytes made here (the card), or a file of the package."""

    content: bytes | Path

    @property
    def source(self) -> bytes | str:
        return self.content if isinstance(self.content, bytes) else str(self.content)

    def oids(self, sha256: str | None, remote: tuple[str, str]) -> tuple[str, str]:
        """This file's id in the form the repo keeps it: ``("lfs", sha256)`` or ``("git", blob sha1)``;
        ``sha256`` is the one the manifest records, when it records one."""
        if remote[0] == "lfs":
            if sha256 is None:
                content = self.content
                sha256 = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else file_sha256(content)[0]
            return ("lfs", sha256)
        data = self.content if isinstance(self.content, bytes) else read_regular(self.content)
        return ("git", hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())


def _check_card(api: HfApi, card: str, repo_id: str, token: str | None) -> None:
    """Have the Hub check the card's metadata (its ``validate-yaml`` endpoint, the check it runs again when
    the card is pushed) before anything is created or sent, so a refused card leaves no empty repo behind."""
    from huggingface_hub import get_session, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # exported lazily

    headers = build_hf_headers(token=token, library_name="deltakit", library_version=__version__)
    response = get_session().post(
        f"{api.endpoint}/api/validate-yaml", json={"content": card, "repoType": "model"}, headers=headers
    )
    if response.status_code == 400:
        try:
            errors = [str(e.get("message")) for e in response.json().get("errors", [])]
        except (ValueError, AttributeError):
            errors = [response.text]
        raise HubError(
            f"the Hub refused the model card for {repo_id}: {'; '.join(errors) or 'invalid metadata'}; "
            "nothing was published"
        )
    hf_raise_for_status(response)


def _remote_files(api: HfApi, repo_id: str, revision: str) -> dict[str, tuple[str, str]]:
    """The files at ``revision``, each as ``("lfs", sha256)`` or ``("git", blob sha1)``."""
    from huggingface_hub.hf_api import RepoFile

    found = {}
    for item in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if isinstance(item, RepoFile):
            found[item.path] = ("lfs", item.lfs.sha256) if item.lfs is not None else ("git", item.blob_id)
    return found


def _owned_by_a_package(name: str) -> bool:
    """Files a deltakit package puts in a repo, which a newer package may drop; anything else is left."""
    return (
        name in (MANIFEST_NAME, "README.md", *SIGNATURE_FILES)
        or name.startswith(f"{FILES_DIR}/")
        or bool(_PAYLOAD_NAME.match(name))
    )


def _refusal(error: Exception, repo_id: str, revision: str) -> HubError:
    """A refused publish as a HubError that names what was refused, and the argument to change."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(
            f"the Hub refused publishing to {repo_id} (HTTP {status}): log in with `hf auth login` or set HF_TOKEN "
            "to a token that may write to it",
            argument="token",
        )
    if status == 404:
        return HubError(
            f"the Hub has no {repo_id} at revision {revision} (HTTP 404)",
            argument="revision" if revision != "main" else "repo_id",
        )
    return HubError(f"the Hub refused publishing to {repo_id}: {http_reason(error)}")
