"""The Hub commands, publish and release: upload a verified delta with its model card.

Downloads have no command of their own: a Hub repo id given as a delta or model is fetched (see _names.py).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine import make_delta, verify_delta
from ..hub import PublishReport, publish_delta
from ..units import human_bytes
from ._common import _progress, _say
from .delta import _print_make, _print_verify

if TYPE_CHECKING:
    from ._common import _Subparsers


def _print_publish(report: PublishReport) -> None:
    verb = "would upload" if report.dry_run else "uploaded"
    total = sum(size for _, size in report.files)
    _say(f"{verb} {len(report.files)} files ({human_bytes(total)}) to {report.repo_id}@{report.revision}")
    for name, size in report.files:
        _say(f"  {name}  {human_bytes(size)}")
    if report.commit:
        _say(f"commit {report.commit}: {report.commit_url}")


def _cmd_publish(args: argparse.Namespace) -> int:
    report = publish_delta(
        args.path,
        args.repo,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
        base_model=args.base_model,
        dry_run=args.dry_run,
    )
    _print_publish(report)
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    """The maintainer's one step: make, verify, publish. Without --out the package is built in a
    temporary folder that is removed once published (or once the dry run has shown what it would send)."""
    with contextlib.ExitStack() as stack:
        if args.out:
            out = Path(args.out)
        else:
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deltakit-release-"))) / "delta"
        made = make_delta(
            args.base, args.target, out, name=args.name, base_name=args.base_name, progress=_progress(args)
        )
        _print_make(made, 0.0)
        report = verify_delta(out, base=args.base, progress=_progress(args))
        _print_verify(report)
        if not report.ok:
            return 1
        _print_publish(
            publish_delta(
                out,
                args.repo,
                private=args.private,
                revision=args.revision,
                license=args.license,
                base_model=args.base_model,
                dry_run=args.dry_run,
            )
        )
    return 0


def add_hub_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit publish`` and ``deltakit release``, which share the Hub options."""
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--repo", required=True, help="Hub repo id, ORG/NAME")
    hub.add_argument("--private", action="store_true", help="create the repo private")
    hub.add_argument("--revision", help="branch to commit to (main)")
    hub.add_argument("--license", default="other", help="license in the model card (other)")
    hub.add_argument("--base-model", help="base_model in the model card (default: the base's name)")
    hub.add_argument("--dry-run", action="store_true", help="show what would be uploaded; upload nothing")

    p = sub.add_parser("publish", parents=[common, hub], help="verify a delta and upload it with a model card")
    p.add_argument("path", help="the delta package")
    p.add_argument("--commit-message", help="commit message")
    p.set_defaults(run=_cmd_publish)

    p = sub.add_parser("release", parents=[common, hub], help="make, verify and publish in one step")
    p.add_argument("--base", required=True, help="base checkpoint, or a registered name")
    p.add_argument("--target", required=True, help="fine-tuned checkpoint, or a registered name")
    p.add_argument("--out", help="where the delta package is kept (default: a temporary folder)")
    p.add_argument("--name", help="the target's name in the manifest")
    p.add_argument("--base-name", help="the base's name in the manifest")
    p.set_defaults(run=_cmd_release)
