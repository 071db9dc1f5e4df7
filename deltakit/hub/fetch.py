"""Fetching from the Hub: a delta package (exactly the files its manifest lists, each checked) or a model.

Downloads go through huggingface_hub's cache, so they resume and honour ``HF_HUB_OFFLINE``; an unreachable
Hub is found with one short request before huggingface_hub's retries, and the cache is used instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import HubError, IntegrityError, ManifestError
from ..formats.delta import FILES_DIR
from ..manifest import MANIFEST_NAME, Manifest, load_manifest
from ..signing import SIGNATURE_FILES
from ._http import http_reason, is_transport_error
from .repo_ids import parse_repo_spec

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["FetchedDelta", "fetch_delta", "fetch_model"]

# How long the one request that checks the Hub can be reached may wait for an answer, unless
# HF_HUB_ETAG_TIMEOUT is set: huggingface_hub's own requests retry a dead endpoint for minutes.
_PROBE_TIMEOUT = 5.0
# As many files in flight as snapshot_download has.
_DOWNLOAD_WORKERS = 8
# Characters the Hub client reads as a pattern in a file name.
_GLOB_CHARACTERS = frozenset("*?[]")
# Paths asked about in one get_paths_info request.
_PATHS_PER_REQUEST = 500
# Weight formats a model fetch leaves on the Hub: deltakit reads safetensors and PyTorch checkpoints only.
_OTHER_WEIGHT_FORMATS = ["*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot", "*.tflite", "*.mlmodel"]


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
    from huggingface_hub.errors import EntryNotFoundError

    from ..engine import verify_delta

    repo_id, revision = parse_repo_spec(spec, argument="spec")
    url = _endpoint_url(endpoint)
    offline = _offline()
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
            for name in SIGNATURE_FILES:  # a signed package's, where the repo has them; checked by signing
                with suppress(EntryNotFoundError):
                    hf_hub_download(repo_id, name, revision=commit, force_download=force, **common)
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

    repo_id, revision = parse_repo_spec(spec, argument="spec")
    url = _endpoint_url(endpoint)
    offline = _offline()
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
        raise HubError(f"could not fetch {spec}: {http_reason(e)}") from e
    except OSError as e:
        raise HubError(f"could not fetch {spec}: {e}") from e
    except Exception as e:
        if not is_transport_error(e):
            raise
        raise HubError(f"could not fetch {spec}: the Hub cannot be reached ({type(e).__name__}: {e})") from e


def _endpoint_url(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``), read when asked so a test can switch it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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
        if not is_transport_error(e):
            raise
        if "Timeout" in type(e).__name__:
            return f"no answer within {timeout:g} s"
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


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


def _check_sizes(spec: str, api: HfApi, repo_id: str, commit: str, wanted: dict[str, int]) -> None:
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


def _is_safe_repo_name(name: str) -> bool:
    """A repo file name that stays inside the folder it is written into, read as a POSIX or a Windows path."""
    parts = name.replace("\\", "/").split("/")
    anchored = any(PureWindowsPath(p).drive or PureWindowsPath(p).root for p in parts)
    return bool(name) and not name.startswith("/") and not anchored and "\0" not in name and ".." not in parts
