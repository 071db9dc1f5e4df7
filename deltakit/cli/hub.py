"""The Hub commands: publish and release upload a verified delta with its model card; download fetches one.

`download` fetches a delta into the Hub cache ahead of an offline apply; a Hub repo id given as a delta or
model anywhere else is fetched too (see _names.py).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine import make_delta, verify_delta
from ..errors import UnsupportedInputError
from ..hub import CardMetadata, fetch_delta, publish_delta
from ..manifest import load_manifest
from ..registry import Registry
from ..signing import load_signing_key, sign_package
from ._common import _emit, _jsonable, _progress, _say
from ._names import LOCAL, MODEL
from .delta import add_trust_argument, checked_signer
from .reports import _make_dict, _print_make, _print_publish, _print_verify, _publish_dict, _report_dict

if TYPE_CHECKING:
    from ._common import _Subparsers


def _card_metadata(args: argparse.Namespace, delta: Path) -> CardMetadata:
    """The model card's metadata from the flags; the base's Hub id from --base-model, else from how the
    base was named (a Hub id, or a registered name with one), else from the registry by fingerprint."""
    base_model = args.base_model or getattr(args, "base_hub_id", None)
    if base_model is None:
        base_model = Registry().hub_id_of(load_manifest(delta).base.fingerprint)
    if base_model is None:
        raise UnsupportedInputError(
            "the model card needs the base's Hub repo id as base_model: pass --base-model ORG/NAME, or register "
            "the base with `deltakit registry add NAME PATH --hub-id ORG/NAME`"
        )
    return CardMetadata(
        base_model=base_model,
        license=args.license,
        license_name=args.license_name,
        license_link=args.license_link,
        language=tuple(args.language or ()),
        datasets=tuple(args.dataset or ()),
    )


def _cmd_publish(args: argparse.Namespace) -> int:
    if args.sign is not None:
        signer = sign_package(args.path, load_signing_key(args.sign))
        _say(f"signed {args.path} with {signer}")
    report = publish_delta(
        args.path,
        args.repo,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        metadata=_card_metadata(args, Path(args.path)),
        tag=args.tag,
        create_pr=args.create_pr,
        dry_run=args.dry_run,
    )
    _print_publish(report)
    if args.json:
        _emit({"command": "publish", **_publish_dict(report)})
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    fetched = fetch_delta(args.spec, cache_dir=args.cache_dir)
    signer = checked_signer(fetched.path, args)
    manifest = load_manifest(fetched.path)
    _say(
        f"downloaded {fetched.repo_id}@{fetched.revision} (commit {fetched.commit}) into {fetched.path}: "
        f"{len(manifest.payload) + len(manifest.target.files) + 1} files, each checked against its manifest"
    )
    _say(f"  base      {manifest.base.name}  fingerprint {manifest.base.fingerprint}")
    _say(f"  target    {manifest.target.name}  fingerprint {manifest.target.fingerprint}")
    _say(f"  apply     deltakit apply --base BASE --delta {args.spec} --out OUT (works offline from the cache)")
    if args.json:
        _emit(
            {
                "command": "download",
                **_jsonable(fetched),
                "base": {"name": manifest.base.name, "fingerprint": manifest.base.fingerprint},
                "target": {"name": manifest.target.name, "fingerprint": manifest.target.fingerprint},
                "payload_bytes": sum(f.size for f in manifest.payload.values()),
                "signer": _jsonable(signer),
            }
        )
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    """The maintainer's one step: make, verify, publish. Without --out the package is built in a
    temporary folder that is removed once published (or once the dry run has shown what it would send)."""
    with contextlib.ExitStack() as stack:
        if args.out:
            out = Path(args.out)
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deltakit-release-"))) / "delta"
        key = load_signing_key(args.sign) if args.sign is not None else None  # checked before any work
        made = make_delta(
            args.base, args.target, out, name=args.name, base_name=args.base_name, progress=_progress(args)
        )
        _print_make(made, 0.0)
        if key is not None:
            signer = sign_package(out, key, target=args.target)
            _say(f"signed the package and the model it rebuilds (model.sig) with {signer}")
        report = verify_delta(out, base=args.base, progress=_progress(args))
        _print_verify(report)
        if not report.ok:
            if args.json:
                _emit({"command": "release", "make": _make_dict(made), "verify": _report_dict(report)})
            return 1
        published = publish_delta(
            out,
            args.repo,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            metadata=_card_metadata(args, out),
            tag=args.tag,
            create_pr=args.create_pr,
            dry_run=args.dry_run,
        )
        _print_publish(published)
        if args.json:
            _emit(
                {
                    "command": "release",
                    "make": _make_dict(made),
                    "verify": _report_dict(report),
                    "publish": _publish_dict(published),
                }
            )
    return 0


def add_hub_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit publish`` and ``deltakit release``, which share the Hub options."""
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--repo", required=True, help="Hub repo id, ORG/NAME")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--revision", help="branch to commit to (main)")
    hub.add_argument("--license", default="other", help="the model card's Hub license id (other)")
    hub.add_argument("--license-name", help="with --license other: a short id for the license (llama-license)")
    hub.add_argument("--license-link", help="with --license other: its URL, or a license file's path in the repo")
    hub.add_argument(
        "--base-model",
        help="the base's Hub repo id, the card's base_model (default: the base's Hub id, or the one registered "
        "for it with registry add --hub-id)",
    )
    hub.add_argument("--language", action="append", help="a language of the fine-tune (en, zh); may repeat")
    hub.add_argument("--dataset", action="append", help="a Hub dataset id it was trained on; may repeat")
    hub.add_argument("--commit-message", help="commit message")
    hub.add_argument("--tag", help="tag the published commit (v1.0), so that users can pin ORG/NAME@v1.0")
    hub.add_argument("--create-pr", action="store_true", help="open the commit as a pull request")
    hub.add_argument("--dry-run", action="store_true", help="show what would be uploaded; upload nothing")
    hub.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")

    p = sub.add_parser("publish", parents=[common, hub], help="verify a delta and upload it with a model card")
    p.add_argument("path", help="the delta package")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign (or re-sign) the package with this EC private key (PEM) before uploading it",
    )
    p.set_defaults(run=_cmd_publish, resolve={"path": LOCAL})

    p = sub.add_parser("release", parents=[common, hub], help="make, verify and publish in one step")
    p.add_argument("--base", required=True, help="base checkpoint, or a registered name")
    p.add_argument("--target", required=True, help="fine-tuned checkpoint, or a registered name")
    p.add_argument("--out", help="where the delta package is kept (default: a temporary folder)")
    p.add_argument("--name", help="the target's name in the manifest")
    p.add_argument("--base-name", help="the base's name in the manifest")
    p.add_argument(
        "--sign", metavar="KEY", help="sign the package and the model it rebuilds with this EC private key (PEM)"
    )
    p.set_defaults(run=_cmd_release, resolve={"base": MODEL, "target": MODEL})

    p = sub.add_parser(
        "download", parents=[common], help="fetch a delta from the Hub into the cache, every file checked"
    )
    p.add_argument("spec", metavar="ORG/NAME[@REV]", help="the delta's Hub repo id, pinned to a revision if you like")
    p.add_argument("--cache-dir", help="the Hugging Face cache to download into (default: HF_HUB_CACHE)")
    add_trust_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")
    p.set_defaults(run=_cmd_download)
