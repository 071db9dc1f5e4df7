"""Publish delta packages to the Hugging Face Hub, with a model card, and fetch them back, checked.

Everything goes through huggingface_hub's own APIs: ``create_commit`` uploads only the LFS objects
the Hub lacks (so re-running an interrupted publish sends only what is missing), and
``snapshot_download`` keeps its resumable cache and honours ``HF_HUB_OFFLINE``. The token comes from
``HF_TOKEN`` or the huggingface_hub login, and is never logged.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from . import DISTRIBUTION, __version__
from .dtypes import itemsize
from .errors import HubError, IntegrityError, ManifestError, UnsupportedInputError
from .files import read_regular, read_regular_text
from .formats.delta import FILES_DIR
from .hashing import file_sha256
from .manifest import MANIFEST_NAME, Manifest, load_manifest
from .units import human_bytes

__all__ = [
    "CardMetadata",
    "FetchedDelta",
    "PublishReport",
    "check_repo_id",
    "fetch_delta",
    "fetch_model",
    "is_repo_spec",
    "model_card",
    "parse_repo_spec",
    "pipeline_tag",
    "publish_delta",
]

_REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_repo_spec(text: str) -> bool:
    """``ORG/NAME`` or ``ORG/NAME@REVISION`` that is not an existing local path."""
    return bool(_REPO_SPEC.match(text)) and not Path(text).exists()


def parse_repo_spec(text: str) -> tuple[str, str | None]:
    match = _REPO_SPEC.match(text)
    if match is None:
        raise UnsupportedInputError(f"{text!r} is not a Hub repo id (ORG/NAME or ORG/NAME@REVISION)")
    return match["repo"], match["revision"]


# The Hub's pipeline_tag for a transformers architecture, by the suffix of its class name.
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)
_LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def pipeline_tag(config: dict[str, Any] | None) -> str | None:
    """``text-generation`` for a ``*ForCausalLM`` config, and so on; None when the architecture says nothing."""
    architectures = (config or {}).get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        return None
    return next((tag for suffix, tag in _PIPELINE_TAGS if architectures[0].endswith(suffix)), None)


def check_repo_id(text: str, what: str, hint: str) -> None:
    """Refuse ``text`` unless it is a repo id the Hub accepts, as huggingface_hub checks one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import _validators

    try:
        _validators.validate_repo_id(text)
    except HFValidationError as e:
        raise UnsupportedInputError(f"{what} is not a Hub repo id ({e}); {hint}") from e


@dataclass(frozen=True)
class CardMetadata:
    """What a model card says beyond the manifest, checked as the Hub checks it.

    Attributes:
        base_model: the base's Hub repo id (``huggyllama/llama-7b``): the Hub's model tree links it.
        license: a Hub license id; ``other`` needs ``license_name`` and ``license_link``.
        language: ISO 639 codes (``en``, ``zh``).
        datasets: Hub dataset ids the fine-tune was trained on.
    """

    base_model: str
    license: str = "other"
    license_name: str | None = None
    license_link: str | None = None
    language: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_repo_id(
            self.base_model,
            f"base_model {self.base_model!r}",
            "pass the base's id on the Hub, for example --base-model huggyllama/llama-7b",
        )
        if self.license == "other" and not (self.license_name and self.license_link):
            raise UnsupportedInputError(
                "license 'other' needs --license-name (a short id, such as llama-license) and --license-link "
                "(a URL, or the path of a license file in the repo); or pass a Hub license id with --license"
            )
        if self.license_name is not None and not _LICENSE_NAME.match(self.license_name):
            raise UnsupportedInputError(
                f"license name {self.license_name!r} must be a short lowercase id: letters, digits, '.', '_', '-'"
            )
        if not re.match(r"^[a-z0-9][a-z0-9.-]*$", self.license):
            raise UnsupportedInputError(f"license {self.license!r} is not a Hub license id (apache-2.0, llama2, other)")
        for code in self.language:
            if not re.match(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$", code):
                raise UnsupportedInputError(f"language {code!r} is not an ISO 639 code such as en or zh")
        for dataset in self.datasets:
            check_repo_id(dataset, f"dataset {dataset!r}", "pass a Hub dataset id (ORG/NAME)")


def model_card(
    manifest: Manifest, repo_id: str, metadata: CardMetadata, *, config: dict[str, Any] | None = None
) -> str:
    """The ``README.md`` of a published delta: metadata for the Hub, and how to rebuild and check it.

    Args:
        config: the fine-tune's ``config.json``, from which the card's ``pipeline_tag`` comes.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=metadata.base_model,
        base_model_relation="finetune",  # else the Hub's model tree guesses (an adapter? a quantization?)
        library_name="deltakit",
        license=metadata.license,
        license_name=metadata.license_name,
        license_link=metadata.license_link,
        language=list(metadata.language) or None,
        datasets=list(metadata.datasets) or None,
        pipeline_tag=pipeline_tag(config),
        tags=["deltakit", "delta"],
    )
    counts: dict[str, tuple[int, int]] = {}
    for t in manifest.target.tensors.values():
        n, size = counts.get(t.encoding, (0, 0))
        nbytes = 0 if t.encoding == "copy" else t.coded_bytes if t.frames is not None else _nbytes(t.dtype, t.shape)
        counts[t.encoding] = (n + 1, size + nbytes)
    rows = "\n".join(f"| `{e}` | {n} | {human_bytes(size)} |" for e, (n, size) in sorted(counts.items()))
    payload = sum(f.size for f in manifest.payload.values())
    model = sum(_nbytes(t.dtype, t.shape) for t in manifest.target.tensors.values())
    coding = "losslessly compressed" if manifest.format >= 2 else "raw"
    title = repo_id.split("/")[-1]
    out = title.removesuffix("-delta") if title.endswith("-delta") and title != "-delta" else f"{title}-model"
    base = metadata.base_model
    body = f"""
# {title}

A fine-tune of [{base}](https://huggingface.co/{base}), published as a parameter delta against it rather
than as weights: rebuild the model from your own copy of the base. Every tensor of the result is
checked against the BLAKE3 digest recorded in `deltakit.json`, so the rebuild is bit for bit or it fails.

## Rebuild

```sh
pip install {DISTRIBUTION}
deltakit apply --base {base} --delta {repo_id} --out {out}
```

`--base` takes the Hub id or the folder of your local copy. The base must be exactly the one the
delta was made from, with this fingerprint ({len(manifest.base.tensors)} tensors):

```
{manifest.base.fingerprint}
```

`deltakit verify {repo_id} --base {base}` checks a base without rebuilding; a wrong base is refused in
seconds, naming the first tensor that differs. The rebuilt model's fingerprint is:

```
{manifest.target.fingerprint}
```

## Contents

| encoding | tensors | payload |
|---|---:|---:|
{rows}

Payload: {human_bytes(payload)} in {len(manifest.payload)} file(s), {payload / max(1, model):.0%} of the
model's {human_bytes(model)} (package format {manifest.format}, {coding}). Made by {manifest.created_by};
published by deltakit {__version__}.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return str(card)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = itemsize(dtype)
    for d in shape:
        n *= d
    return n


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
    return files


def _target_config(root: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The fine-tune's ``config.json`` as the package carries it, if it does and it parses."""
    if "config.json" not in manifest.target.files:
        return None
    try:
        config = json.loads(read_regular_text(root / FILES_DIR / "config.json"))
    except (OSError, ValueError, RecursionError):  # UnsupportedInputError (a FIFO, a folder) is a ValueError
        return None
    return config if isinstance(config, dict) else None


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
    from .engine import verify_delta

    root = Path(delta)
    parse_repo_spec(repo_id)
    report = verify_delta(root)
    if not report.ok:
        first = report.missing[0] if report.missing else report.mismatched[0].name
        raise IntegrityError(f"{root} does not verify ({first}); not publishing it", path=root)
    manifest = load_manifest(root)
    card = model_card(manifest, repo_id, metadata, config=_target_config(root, manifest))
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
            raise HubError(f"{repo_id} exists and is public; refusing to publish what was asked to be private")
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
        raise HubError(_refusal(e, repo_id, branch)) from e
    except (OSError, RuntimeError) as e:  # huggingface_hub wraps failed LFS uploads in a RuntimeError
        cause = e.__cause__ if isinstance(e.__cause__, HfHubHTTPError) else e
        raise HubError(
            f"publishing to {repo_id} failed: {_http_reason(cause)}; run the same command again to send what "
            "did not arrive"
        ) from e
    except Exception as e:
        if not _is_transport_error(e):
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


def _check_card(api: Any, card: str, repo_id: str, token: str | None) -> None:
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


def _remote_files(api: Any, repo_id: str, revision: str) -> dict[str, tuple[str, str]]:
    """The files at ``revision``, each as ``("lfs", sha256)`` or ``("git", blob sha1)``."""
    from huggingface_hub.hf_api import RepoFile

    found = {}
    for item in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if isinstance(item, RepoFile):
            found[item.path] = ("lfs", item.lfs.sha256) if item.lfs is not None else ("git", item.blob_id)
    return found


def _owned_by_a_package(name: str) -> bool:
    """Files a deltakit package puts in a repo, which a newer package may drop; anything else is left."""
    return name in (MANIFEST_NAME, "README.md") or name.startswith(f"{FILES_DIR}/") or bool(_PAYLOAD_NAME.match(name))


_PAYLOAD_NAME = re.compile(r"^delta(-\d{5}-of-\d{5})?\.safetensors$")


def _refusal(error: Exception, repo_id: str, revision: str) -> str:
    """A refused publish, said so that the user knows what to do."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"the Hub refused publishing to {repo_id} (HTTP {status}): log in with `hf auth login` or set HF_TOKEN "
            "to a token that may write to it"
        )
    if status == 404:
        return f"the Hub has no {repo_id} at revision {revision} (HTTP 404): check the repo id and --revision"
    return f"the Hub refused publishing to {repo_id}: {_http_reason(error)}"


def _http_reason(error: Exception) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"HTTP {status}: {text}" if status else text


@contextmanager
def _fetch_errors(spec: str, unreachable: tuple[str, str] | None = None) -> Iterator[None]:
    """huggingface_hub's download failures, as one HubError that names what was being fetched;
    ``unreachable`` is the endpoint and the reason when the Hub was found unreachable beforehand."""
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError as e:
        if unreachable is not None:
            url, reason = unreachable
            raise HubError(f"cannot reach the Hub at {url}: {reason}; {spec} is not in the local Hub cache") from e
        raise HubError(f"{spec} is not in the local Hub cache and the Hub cannot be reached: {e}") from e
    except EntryNotFoundError as e:
        raise HubError(f"{spec} holds no {MANIFEST_NAME}: it is not a deltakit delta") from e
    except HfHubHTTPError as e:
        raise HubError(f"could not fetch {spec}: {_http_reason(e)}") from e
    except OSError as e:
        raise HubError(f"could not fetch {spec}: {e}") from e
    except Exception as e:
        if not _is_transport_error(e):
            raise
        raise HubError(f"could not fetch {spec}: the Hub cannot be reached ({type(e).__name__}: {e})") from e


# How long the one request that checks the Hub can be reached may wait for an answer, unless
# HF_HUB_ETAG_TIMEOUT is set: huggingface_hub's own requests retry a dead endpoint for minutes.
_PROBE_TIMEOUT = 5.0


def _endpoint_url(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _unreachable(endpoint: str, repo_id: str) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached, or None when it answers (with any HTTP status).

    One request, no retries, a short timeout: an unreachable Hub is said once, in seconds, instead of after
    huggingface_hub's retries (five of them, up to 8 s apart, each waiting up to 10 s, then again at 60 s).
    """
    from huggingface_hub import constants, get_session

    explicit = constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT) if explicit else _PROBE_TIMEOUT
    try:
        get_session().head(f"{endpoint}/api/models/{repo_id}", timeout=timeout, follow_redirects=False)
    except Exception as e:
        if not _is_transport_error(e):
            raise
        if "Timeout" in type(e).__name__:
            return f"no answer within {timeout:g} s"
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _is_transport_error(error: BaseException) -> bool:
    """No connection, a timeout: huggingface_hub's HTTP client (httpx, or the httpx2 fork it ships with
    since 2.x) raises its own TransportError, which is neither an OSError nor a Hub error."""
    return any(
        cls.__name__ == "TransportError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(error).__mro__
    )


@dataclass(frozen=True)
class FetchedDelta:
    """A delta (checked against its manifest) or a model, downloaded into the Hub cache."""

    path: Path
    repo_id: str
    revision: str
    commit: str


def fetch_delta(
    spec: str, *, token: str | None = None, endpoint: str | None = None, cache_dir: str | Path | None = None
) -> FetchedDelta:
    """Download ``ORG/NAME[@REVISION]`` through the Hub cache, then check every file's SHA-256.

    The manifest comes first; then exactly the files it lists, each by its name, at the commit the manifest
    came from, once the Hub's metadata shows each has the size the manifest records. Nothing else in the
    repo is fetched (its model card neither). When the Hub cannot be reached, the cache is used if it holds
    the package.

    Raises:
        HubError: the repo or revision does not exist, access is denied, or the Hub is unreachable
            (with ``HF_HUB_OFFLINE=1``, when the cache does not hold it).
        ManifestError: the manifest names a file with glob characters.
        IntegrityError: a file's size on the Hub, or a downloaded file's SHA-256, differs from the manifest:
            it is not used, and a downloaded copy is removed from the cache.
    """
    from huggingface_hub import HfApi, hf_hub_download

    from .engine import verify_delta

    repo_id, revision = parse_repo_spec(spec)
    url = _endpoint_url(endpoint)
    offline = constants_offline()
    reason = None if offline else _unreachable(url, repo_id)
    local_only = reason is not None
    unreachable = (url, reason) if reason is not None else None
    common: dict[str, Any] = {
        "token": token,
        "endpoint": endpoint,
        "cache_dir": cache_dir,
        "local_files_only": local_only,
        "library_name": "deltakit",
        "library_version": __version__,
    }

    def download(force: bool) -> tuple[Path, dict[str, int]]:
        with _fetch_errors(spec, unreachable):
            manifest_path = Path(
                str(hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, force_download=force, **common))
            )
            folder, commit = manifest_path.parent, manifest_path.parent.name
            wanted = _listed_files(spec, load_manifest(folder), manifest_path)
            if not (offline or local_only):
                api = HfApi(endpoint=endpoint, token=token, library_name="deltakit", library_version=__version__)
                _check_sizes(spec, api, repo_id, commit, wanted)

            # Each listed file by its exact name, at the very commit the manifest came from: a push in
            # between changes nothing, and no name is read as a pattern.
            def one(name: str) -> None:
                hf_hub_download(repo_id, name, revision=commit, force_download=force, **common)

            with ThreadPoolExecutor(max_workers=_DOWNLOAD_WORKERS) as pool:
                for _ in pool.map(one, wanted):
                    pass
            return folder, wanted

    folder, wanted = download(force=False)
    report = verify_delta(folder)
    if not report.ok and not (offline or local_only):
        folder, wanted = download(force=True)  # the cache may hold a bad copy from an earlier download
        report = verify_delta(folder)
    if not report.ok:
        first = report.mismatched[0] if report.mismatched else None
        what = f"{first.name}: expected {first.expected}, got {first.actual}" if first else report.missing[0]
        removed = _evict(folder, [m.name for m in report.mismatched if m.name in wanted])
        kept = f"; removed from the cache: {', '.join(removed)}" if removed else ""
        raise IntegrityError(
            f"{spec} as downloaded does not match its manifest ({what}); not using it{kept}", path=folder
        )
    return FetchedDelta(folder, repo_id, revision or "main", folder.name)


# As many files in flight as snapshot_download has.
_DOWNLOAD_WORKERS = 8
_GLOB_CHARACTERS = frozenset("*?[]")


def _listed_files(spec: str, manifest: Manifest, manifest_path: Path) -> dict[str, int]:
    """The files a package's manifest lists beside itself, by name in the repo, with the size it records.

    Raises:
        ManifestError: a name holds a glob character: the Hub client would read it as a pattern.
    """
    wanted = {name: record.size for name, record in manifest.payload.items()}
    wanted.update({f"{FILES_DIR}/{rel}": record.size for rel, record in manifest.target.files.items()})
    for name in wanted:
        if _GLOB_CHARACTERS.intersection(name):
            raise ManifestError(
                f"{spec}: the manifest names a file {name!r}, and file names with glob characters (* ? [ ]) are "
                "not downloaded",
                path=manifest_path,
            )
    return wanted


def _check_sizes(spec: str, api: Any, repo_id: str, commit: str, wanted: dict[str, int]) -> None:
    """Refuse, before any transfer, a listed file the repo lacks or holds at another size than recorded."""
    from huggingface_hub.hf_api import RepoFile

    held: dict[str, int] = {}
    names = list(wanted)
    for start in range(0, len(names), _PATHS_PER_REQUEST):
        for item in api.get_paths_info(repo_id, names[start : start + _PATHS_PER_REQUEST], revision=commit):
            if isinstance(item, RepoFile):
                held[item.path] = item.lfs.size if item.lfs is not None else item.size
    for name, size in wanted.items():
        if name not in held:
            raise IntegrityError(f"{spec}: the repo holds no {name}, which its manifest lists")
        if held[name] != size:
            raise IntegrityError(
                f"{spec}: {name} is {held[name]} bytes on the Hub, but its manifest records {size}; not downloading it",
                expected=size,
                actual=held[name],
            )


_PATHS_PER_REQUEST = 500


def _evict(folder: Path, names: list[str]) -> list[str]:
    """Remove refused files from a cache snapshot: the link and the blob it points to, so that no later
    run, offline or not, meets them again. Returns the names removed."""
    removed = []
    for name in names:
        link = folder / name
        try:
            blob = link.resolve() if link.is_symlink() else None
            link.unlink()
            if blob is not None:
                blob.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(name)
    return removed


def constants_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


_OTHER_WEIGHT_FORMATS = ["*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot", "*.tflite", "*.mlmodel"]


def fetch_model(
    spec: str, *, token: str | None = None, endpoint: str | None = None, cache_dir: str | Path | None = None
) -> FetchedDelta:
    """Download a model checkpoint ``ORG/NAME[@REVISION]`` through the Hub cache: safetensors when the
    repo has them (else PyTorch ``.bin``), and its config and tokenizer files; no other weight formats.

    Nothing is checked here beyond huggingface_hub's own size checks: a base is checked tensor by
    tensor against the delta's digests when it is used.

    Raises:
        HubError: the repo cannot be fetched, the Hub cannot be reached (and the cache does not hold the
            model), or the repo holds a file whose name is absolute or climbs out of its folder.
    """
    from huggingface_hub import HfApi, snapshot_download

    repo_id, revision = parse_repo_spec(spec)
    url = _endpoint_url(endpoint)
    offline = constants_offline()
    reason = None if offline else _unreachable(url, repo_id)
    with _fetch_errors(spec, (url, reason) if reason is not None else None):
        ignore = list(_OTHER_WEIGHT_FORMATS)
        if not offline and reason is None:
            files = HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision)
            for name in files:
                if not _is_safe_repo_name(name):
                    raise HubError(
                        f"{spec} holds a file named {name!r}, which is not a safe relative file name; "
                        "nothing was downloaded from it"
                    )
            if any(f.endswith(".safetensors") for f in files):
                ignore += ["*.bin", "*.pth", "*.pt", "*.bin.index.json"]
        folder = Path(
            str(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    token=token,
                    endpoint=endpoint,
                    cache_dir=cache_dir,
                    ignore_patterns=ignore,
                    local_files_only=reason is not None,
                    library_name="deltakit",
                    library_version=__version__,
                )
            )
        )
    return FetchedDelta(folder, repo_id, revision or "main", folder.name)


def _is_safe_repo_name(name: str) -> bool:
    """A repo file name that stays inside the folder it is written into, read as a POSIX or a Windows path."""
    parts = name.replace("\\", "/").split("/")
    anchored = any(PureWindowsPath(p).drive or PureWindowsPath(p).root for p in parts)
    return bool(name) and not name.startswith("/") and not anchored and "\0" not in name and ".." not in parts
