"""The ``deltakit`` command: parse, call one library function, print its report.

Exit status: 0 on success, 1 on any deltakit failure (one line on stderr naming what failed),
2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..adapters import MergeReport, merge_adapters
from ..convert import DTYPE_NAMES, convert
from ..engine import (
    DEFAULT_SHARD_SIZE,
    ApplyReport,
    MakeReport,
    VerifyReport,
    apply_delta,
    make_delta,
    plan_apply,
    verify_delta,
    verify_model,
)
from ..errors import DeltakitError
from ..formats.peft import is_adapter
from ..hub import PublishReport, fetch_delta, fetch_model, is_repo_spec, publish_delta
from ..inspection import Inspection, inspect_path
from ..legacy import LEGACY_KINDS, LegacyReport, apply_legacy_delta, make_delta_from_legacy
from ..manifest import MANIFEST_NAME, load_manifest
from ..progress import ProgressFactory, tqdm_progress
from ..registry import Registry
from ..staging import check_output_free
from ..units import human_bytes, parse_size

__all__ = ["main"]

log = logging.getLogger("deltakit")


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


def _say(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


# -------------------------------------------------------------------------------------------------
# Reports as text


def _print_make(report: MakeReport, seconds: float) -> None:
    m = report.manifest
    _say(f"wrote delta {report.out}  ({m.target.name} from {m.base.name}) in {seconds:.1f}s")
    _say("  tensors   " + ", ".join(f"{n} {e}" for e, n in report.encodings.items()))
    ratio = report.payload_bytes / report.target_bytes if report.target_bytes else 0.0
    sizes = f"{human_bytes(report.payload_bytes)} for {human_bytes(report.target_bytes)} of target"
    _say(f"  payload   {sizes} ({ratio:.0%})")
    _say(f"  files     {report.files} carried under files/")
    _say(f"  base      fingerprint {m.base.fingerprint}")
    _say(f"  target    fingerprint {m.target.fingerprint}")
    if report.raw_tensors:
        _say(f"  raw       {len(report.raw_tensors)} tensors stored as they are (copies of fine-tuned weights):")
        for name, why in report.raw_tensors.items():
            _say(f"              {name}: {why}")
    if report.cast:
        _say(f"  cast      {len(report.cast)} base tensors cast to the target's dtype first")
    if report.dropped:
        _say(f"  dropped   {len(report.dropped)} base tensors absent from the target: " + ", ".join(report.dropped))
    if "add" in report.encodings or ("rows" in report.encodings and report.inexact_tensors):
        _say(
            f"  add       {report.inexact_elements} elements in {len(report.inexact_tensors)} tensors rebuild "
            "differently from the fine-tune; the manifest records the rebuild's digests"
        )
    if report.ignored_weight_files:
        _say("  ignored   weight files in other formats: " + ", ".join(report.ignored_weight_files))


def _print_apply(report: ApplyReport, seconds: float) -> None:
    _say(f"rebuilt {report.target_name} into {report.out} in {seconds:.1f}s: all digests match")
    _say("  tensors   " + ", ".join(f"{n} {e}" for e, n in report.encodings.items()))
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    _say(f"  target    fingerprint {report.fingerprint}")


def _print_verify(report: VerifyReport) -> None:
    if report.ok:
        _say(f"OK: {report.subject}: {report.checked} tensors and files match")
    else:
        _say(f"FAILED: {report.subject}")
    for name in report.missing[:50]:
        _say(f"  missing     {name}")
    for item in report.mismatched[:50]:
        _say(f"  mismatched  {item.name}: expected {item.expected}, found {item.actual}")
    for name in report.extra[:50]:
        _say(f"  extra       {name} (not in the manifest)")
    hidden = max(0, len(report.missing) - 50) + max(0, len(report.mismatched) - 50) + max(0, len(report.extra) - 50)
    if hidden:
        _say(f"  ... and {hidden} more")


def _print_inspect(info: Inspection, *, all_tensors: bool) -> None:
    _say(f"{info.path}: {info.description}" + (f" ({info.legacy_kind})" if info.legacy_kind else ""))
    _say(f"  apply       {info.apply}")
    if info.kind == "delta":
        _say(f"  created by  {info.created_by}")
        _say(f"  base        {info.base_name}  fingerprint {info.base_fingerprint}")
        _say(f"  target      {info.target_name}  fingerprint {info.target_fingerprint}")
        _say("  encodings   " + ", ".join(f"{n} {e}" for e, n in (info.encodings or {}).items()))
        _say(f"  payload     {human_bytes(info.payload_bytes or 0)}")
        if info.dropped:
            _say(f"  dropped     {', '.join(info.dropped)}")
    elif info.fingerprint:
        _say(f"  fingerprint {info.fingerprint}")
    by_dtype = ", ".join(f"{d} {human_bytes(b)}" for d, b in info.bytes_by_dtype.items())
    _say(f"  tensors     {len(info.tensors)}, {human_bytes(info.total_bytes)}" + (f": {by_dtype}" if by_dtype else ""))
    _say(f"  files       {', '.join(info.files) or 'none'}")
    shown = info.tensors if all_tensors else info.tensors[:20]
    for t in shown:
        encoding = f"  {t.encoding}" if t.encoding else ""
        _say(f"    {t.name}  {t.dtype} {list(t.shape)}  {human_bytes(t.nbytes)}{encoding}")
    if len(shown) < len(info.tensors):
        _say(f"    ... {len(info.tensors) - len(shown)} more (--all lists every tensor)")


# -------------------------------------------------------------------------------------------------
# Commands


def _progress(args: argparse.Namespace) -> ProgressFactory:
    return tqdm_progress(quiet=args.quiet)


def _print_legacy(report: LegacyReport, seconds: float) -> None:
    article = "an" if report.kind[0] in "aeiou" else "a"
    _say(f"rebuilt {report.out} from {article} {report.kind} delta in {seconds:.1f}s")
    _say(f"  tensors   {report.tensors}" + (f"; rows grown: {', '.join(report.grown)}" if report.grown else ""))
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    if report.kind == "oasst-xor":
        _say(
            "  checked   against the published checksums"
            if report.verified
            else "  WARNING   not verified: an XOR release rebuilds plausible weights from any base; pass "
            "--checksums with the sums from the release's model card"
        )
    _say(f"  result    fingerprint {report.fingerprint} (legacy deltas carry no digests to check it against)")


def _cmd_make(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.from_legacy is not None:
        rebuilt, made = make_delta_from_legacy(
            args.base,
            args.from_legacy,
            args.out,
            kind=None if args.legacy_kind == "auto" else args.legacy_kind,
            checksums=args.checksums,
            name=args.name,
            base_name=args.base_name,
            shard_size=args.shard_size,
            progress=_progress(args),
        )
        _say(f"read {args.from_legacy} as a delta of kind {rebuilt.kind}; re-packaged as format 1:")
        _print_make(made, time.perf_counter() - start)
        return 0
    report = make_delta(
        args.base,
        args.target,
        args.out,
        codec=args.codec,
        name=args.name,
        base_name=args.base_name,
        shard_size=args.shard_size,
        progress=_progress(args),
    )
    _print_make(report, time.perf_counter() - start)
    return 0


def _print_merge(report: MergeReport, seconds: float) -> None:
    _say(f"merged {', '.join(report.adapters)} into {report.out} in {seconds:.1f}s")
    _say(f"  tensors   {report.tensors}: {len(report.merged)} with LoRA updates, {len(report.replaced)} replaced whole")
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    if report.vocab_size is not None:
        _say(f"  config    vocab_size set to {report.vocab_size}, the merged embedding's rows")
    _say(f"  result    fingerprint {report.fingerprint} (adapters carry no digests to check it against)")


def _choose_base(args: argparse.Namespace) -> None:
    """``apply`` without ``--base``: the registered model whose fingerprint the delta's manifest names."""
    if args.base is not None:
        return
    if len(args.delta) != 1 or not (Path(args.delta[0]) / MANIFEST_NAME).is_file():
        raise _UsageError("--base may be left out only for one deltakit delta, whose manifest names its base")
    manifest = load_manifest(args.delta[0])
    entry = Registry().find_base(manifest.base.fingerprint)
    if entry is None:
        raise DeltakitError(
            f"no registered model has the fingerprint of {manifest.base.name!r} "
            f"({manifest.base.fingerprint[:16]}...): pass --base, or `deltakit registry add NAME PATH` first"
        )
    _say(f"using registered base {entry.name!r} at {entry.path} (fingerprint {entry.fingerprint[:16]}...)")
    args.base = entry.path


def _cmd_apply(args: argparse.Namespace) -> int:
    _choose_base(args)
    adapters = [d for d in args.delta if is_adapter(d)]
    if adapters:
        if len(adapters) != len(args.delta):
            raise _UsageError("several --delta are for LoRA adapters only; deltakit deltas apply one at a time")
        if args.dry_run:
            raise _UsageError("--dry-run is for deltakit deltas; adapters have no plan to print yet")
        start = time.perf_counter()
        merged = merge_adapters(args.base, adapters, args.out, shard_size=args.shard_size, progress=_progress(args))
        _print_merge(merged, time.perf_counter() - start)
        return 0
    if len(args.delta) > 1:
        raise _UsageError("several --delta are for LoRA adapters only; deltakit deltas apply one at a time")
    args.delta = args.delta[0]
    if args.legacy != "auto" or (not (Path(args.delta) / MANIFEST_NAME).exists() and Path(args.delta).is_dir()):
        if args.dry_run:
            raise _UsageError("--dry-run is for deltakit deltas; legacy deltas have no plan to print yet")
        kind = None if args.legacy == "auto" else args.legacy
        start = time.perf_counter()
        legacy = apply_legacy_delta(
            args.base,
            args.delta,
            args.out,
            kind=kind,
            checksums=args.checksums,
            shard_size=args.shard_size,
            progress=_progress(args),
        )
        _print_legacy(legacy, time.perf_counter() - start)
        if kind is None and legacy.kind != "oasst-xor":
            other = "alpaca" if legacy.kind == "fastchat" else "fastchat"
            _say(
                f"  note      {args.delta} has no deltakit.json: read as a {legacy.kind} delta "
                f"(--legacy {other} if it is not)"
            )
        return 0
    if args.dry_run:
        check_output_free(Path(args.out))
        plan = plan_apply(args.base, args.delta, shard_size=args.shard_size)
        _say(plan.describe())
        _say(f"dry run: nothing written; would write {args.out}")
        return 0
    start = time.perf_counter()
    report = apply_delta(
        args.base,
        args.delta,
        args.out,
        shard_size=args.shard_size,
        progress=_progress(args),
    )
    _print_apply(report, time.perf_counter() - start)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    report = convert(
        args.source,
        args.out,
        to=args.to,
        dtype=args.dtype,
        shard_size=args.shard_size,
        meta_shards=args.meta_shards,
        progress=_progress(args),
    )
    _say(
        f"converted {args.source} ({report.source_kind}) to {report.out} ({report.target_kind}) "
        f"in {time.perf_counter() - start:.1f}s"
    )
    _say(f"  tensors   {report.tensors}, {human_bytes(report.bytes_written)} written")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    if report.fingerprint:
        _say(f"  result    fingerprint {report.fingerprint}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.delta is not None:
        if args.base is not None:
            raise _UsageError("verify takes --base (checking a delta) or --delta (checking a model), not both")
        report = verify_model(args.path, args.delta, progress=_progress(args))
    else:
        report = verify_delta(args.path, base=args.base, progress=_progress(args))
    if args.json:
        _say(json.dumps(_report_dict(report), indent=2))
    else:
        _print_verify(report)
    return 0 if report.ok else 1


def _report_dict(report: VerifyReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "subject": report.subject,
        "checked": report.checked,
        "missing": list(report.missing),
        "extra": list(report.extra),
        "mismatched": [{"name": m.name, "expected": m.expected, "actual": m.actual} for m in report.mismatched],
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_path(args.path, with_fingerprint=args.fingerprint, progress=_progress(args))
    if args.json:
        _say(json.dumps(info.to_dict(), indent=2))
    else:
        _print_inspect(info, all_tensors=args.all)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..examples import write_llama_pair

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="deltakit-demo-"))
    if root.exists() and any(root.iterdir()):
        raise DeltakitError(f"{root} is not empty; give the demo a new or empty --dir")
    quiet = argparse.Namespace(quiet=True)
    _say(f"1. writing a tiny LLaMA-shaped base and a fine-tune with a grown vocabulary under {root}")
    base, tuned = write_llama_pair(root)
    _say(f"   base      {base}")
    _say(f"   fine-tune {tuned}")
    _say("\n2. deltakit make --base base --target finetune --out delta")
    start = time.perf_counter()
    made = make_delta(base, tuned, root / "delta", progress=_progress(quiet))
    _print_make(made, time.perf_counter() - start)
    _say("\n3. deltakit apply --base base --delta delta --out rebuilt")
    start = time.perf_counter()
    applied = apply_delta(base, root / "delta", root / "rebuilt", progress=_progress(quiet))
    _print_apply(applied, time.perf_counter() - start)
    _say("\n4. deltakit verify rebuilt --delta delta")
    report = verify_model(root / "rebuilt", root / "delta")
    _print_verify(report)
    same = all(
        (tuned / name).read_bytes() == (root / "rebuilt" / name).read_bytes()
        for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
    )
    _say(f"\nevery tensor of rebuilt/ is bit-identical to finetune/; side files identical: {same}")
    _say(f"the files are in {root}; try: deltakit inspect {root / 'delta'}")
    return 0 if report.ok and same else 1


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
    """The maintainer's one step: make, verify, publish."""
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deltakit-release-")) / "delta"
    made = make_delta(args.base, args.target, out, name=args.name, base_name=args.base_name, progress=_progress(args))
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


def _cmd_registry_add(args: argparse.Namespace) -> int:
    entry = Registry().add(args.name, args.path, progress=_progress(args))
    _say(f"registered {entry.name!r}: {entry.kind} at {entry.path}, fingerprint {entry.fingerprint}")
    return 0


def _cmd_registry_list(args: argparse.Namespace) -> int:
    registry = Registry()
    entries = registry.entries()
    if args.json:
        _say(json.dumps([asdict(e) for e in entries.values()], indent=2))
        return 0
    if not entries:
        _say(f"no names registered in {registry.path}")
    for e in entries.values():
        extra = f", for base {e.base_fingerprint[:16]}..." if e.base_fingerprint else ""
        _say(f"{e.name}  {e.kind}  {human_bytes(e.size)}  {e.path}  fingerprint {e.fingerprint[:16]}...{extra}")
    return 0


def _cmd_registry_remove(args: argparse.Namespace) -> int:
    entry = Registry().remove(args.name)
    _say(f"forgot {entry.name!r} ({entry.path} is left as it is)")
    return 0


_PATH_ARGUMENTS = ("base", "target", "path", "source", "from_legacy")


def _resolve_delta(registry: Registry, name: str) -> str:
    """A delta resolves as a registered name, then a path, then a Hub repo id (fetched and checked)."""
    if registry.get(name) is not None or Path(name).exists() or not is_repo_spec(name):
        return str(registry.resolve(name))
    fetched = fetch_delta(name)
    _say(f"fetched {fetched.repo_id} at {fetched.revision} (commit {fetched.commit[:12]}), every file checked")
    return str(fetched.path)


def _resolve_model(registry: Registry, name: str) -> str:
    """A model resolves as a registered name, then a path, then a Hub repo id (fetched into the cache)."""
    if registry.get(name) is not None or Path(name).exists() or not is_repo_spec(name):
        return str(registry.resolve(name))
    fetched = fetch_model(name)
    _say(f"fetched {fetched.repo_id} at {fetched.revision} (commit {fetched.commit[:12]})")
    return str(fetched.path)


def _resolve_names(args: argparse.Namespace) -> None:
    """Registered names become their paths; deltas may also be Hub repo ids; anything else must exist."""
    if args.run in (_cmd_registry_add, _cmd_registry_remove, _cmd_serve, _cmd_token_create):
        return
    registry = Registry()
    for attribute in _PATH_ARGUMENTS:
        value = getattr(args, attribute, None)
        if value is not None:
            if args.run is _cmd_verify and attribute == "path" and getattr(args, "delta", None) is None:
                setattr(args, attribute, _resolve_delta(registry, value))
            elif attribute in ("base", "target") or (args.run is _cmd_verify and attribute == "path"):
                setattr(args, attribute, _resolve_model(registry, value))
            else:
                setattr(args, attribute, str(registry.resolve(value)))
    if getattr(args, "delta", None) is not None:
        deltas = args.delta if isinstance(args.delta, list) else [args.delta]
        resolved = [_resolve_delta(registry, d) for d in deltas]
        args.delta = resolved if isinstance(args.delta, list) else resolved[0]


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # the service's own dependencies load only here: the library never imports them

    from service.main import create_app

    # Streams (server-sent events) end by themselves within minutes; do not wait that long to stop.
    try:
        uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=10)
    except SystemExit as e:  # uvicorn exits 3 when it cannot bind; its own log line says why
        if e.code not in (0, None):
            raise DeltakitError(f"the service could not start on {args.host}:{args.port} (see the line above)") from e
    return 0


def _cmd_token_create(args: argparse.Namespace) -> int:
    from service.settings import Settings
    from service.store import Store

    store = Store(Settings().database)
    try:
        print(store.create_token(args.scope))  # alone on stdout, shown once: only its hash is kept
    finally:
        store.close()
    return 0


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltakit",
        description="Release fine-tuned models as deltas against licensed base weights; rebuild them bit for bit.",
    )
    parser.add_argument("--version", action="version", version=f"deltakit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens, on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make", parents=[common], help="compute a delta package from a base and a fine-tune")
    p.add_argument("--base", required=True, help="base checkpoint (folder or .safetensors file)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--target", help="fine-tuned checkpoint")
    source.add_argument(
        "--from-legacy", metavar="DELTA", help="re-package a FastChat/Panda or Alpaca delta release as format 1"
    )
    p.add_argument(
        "--legacy-kind", choices=["auto", *LEGACY_KINDS], default="auto", help="what --from-legacy holds (auto)"
    )
    p.add_argument("--checksums", help="for an XOR release: md5/sha256 sums of the rebuilt files (required)")
    p.add_argument("--out", required=True, help="delta package folder to create")
    p.add_argument("--codec", choices=["xor", "add"], default="xor", help="xor: lossless (default); add: task vector")
    p.add_argument("--name", help="the target's name in the manifest (default: its folder name)")
    p.add_argument("--base-name", help="the base's name in the manifest (default: its folder name)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE, help="payload file size (5GB)")
    p.set_defaults(run=_cmd_make)

    p = sub.add_parser("apply", parents=[common], help="rebuild a fine-tune from a base and a delta")
    p.add_argument(
        "--base", help="base checkpoint, or a registered name (default: the registered model the delta names)"
    )
    p.add_argument(
        "--delta",
        required=True,
        action="append",
        help="delta package folder, or a PEFT LoRA adapter folder (repeat to stack adapters in order)",
    )
    p.add_argument("--out", required=True, help="model folder to create (must not exist, or be empty)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE, help="output file size (5GB)")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan; write nothing")
    p.add_argument(
        "--legacy",
        choices=["auto", *LEGACY_KINDS],
        default="auto",
        help="the delta is an older tool's release: a model folder of differences (auto: when it has no deltakit.json)",
    )
    p.add_argument("--checksums", help="for an XOR release: md5/sha256 sums of the rebuilt files, from its model card")
    p.set_defaults(run=_cmd_apply)

    p = sub.add_parser(
        "convert", parents=[common], help="Meta <-> HF layout, .bin -> safetensors, dtype change, resharding"
    )
    p.add_argument("source", help="a Meta folder (consolidated.NN.pth + params.json) or an HF checkpoint")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--to", choices=["hf", "meta"], default="hf", help="output layout (hf)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="cast float tensors (round to nearest even)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE, help="HF output file size (5GB)")
    p.add_argument(
        "--meta-shards", type=_positive, help="model-parallel shards for --to meta (Meta's count by default)"
    )
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check a delta package (with --base: and the base), or a rebuilt model (with --delta)",
    )
    p.add_argument("path", help="a delta package, or with --delta a rebuilt model")
    p.add_argument("--base", help="also check that this base is the one the delta was made from")
    p.add_argument("--delta", help="check PATH, a model, against this delta's target digests")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("inspect", parents=[common], help="say what a checkpoint or delta package holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--fingerprint", action="store_true", help="hash a checkpoint's tensors to fingerprint it")
    p.set_defaults(run=_cmd_inspect)

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

    p = sub.add_parser("registry", parents=[common], help="name local models and deltas")
    registry = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = registry.add_parser("add", parents=[common], help="register a checkpoint (fingerprinted now) or a delta")
    r.add_argument("name")
    r.add_argument("path")
    r.set_defaults(run=_cmd_registry_add)
    r = registry.add_parser("list", parents=[common], help="list the registered names")
    r.add_argument("--json", action="store_true", help="print as JSON")
    r.set_defaults(run=_cmd_registry_list)
    r = registry.add_parser("remove", parents=[common], help="forget a name (its files are left alone)")
    r.add_argument("name")
    r.set_defaults(run=_cmd_registry_remove)

    p = sub.add_parser("serve", parents=[common], help="run the HTTP service for a model registry")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (8000)")
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("token", parents=[common], help="bearer tokens for the HTTP service")
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    t = tokens.add_parser("create", parents=[common], help="print a new token once; only its hash is stored")
    t.add_argument("--scope", choices=["read", "write"], required=True)
    t.set_defaults(run=_cmd_token_create)

    p = sub.add_parser("demo", parents=[common], help="make, apply and verify a delta on a built-in tiny model")
    p.add_argument("--dir", help="where to write the example (default: a new temporary folder)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="deltakit: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "quiet", False):  # huggingface_hub's own bars too; it reads this when first imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        _resolve_names(args)
        return run(args)
    except _UsageError as e:
        parser.error(str(e))
    except DeltakitError as e:
        print(f"deltakit: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`deltakit inspect ... | head`): not a failure
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, permissions: no traceback, the OS's own words and the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"deltakit: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deltakit: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line, and the traceback with --verbose
        log.debug("traceback", exc_info=True)
        print(
            f"deltakit: internal error (a bug, please report it): {type(e).__name__}: {e}"
            + ("" if args.verbose else "; run with --verbose for the traceback"),
            file=sys.stderr,
        )
        return 1
    return 0  # unreachable: parser.error exits


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
