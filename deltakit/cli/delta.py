"""The delta commands, make, apply, verify, inspect and demo: their handlers and parsers.

Each handler calls one library function and prints its report with reports.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import merge_adapters
from ..engine import (
    DEFAULT_SHARD_SIZE,
    ApplyReport,
    apply_delta,
    make_delta,
    plan_apply,
    verify_delta,
    verify_model,
)
from ..engine.make import DEFAULT_LEVEL
from ..errors import DeltakitError
from ..formats.peft import is_adapter
from ..gguf import KQUANTS, QUANTS, apply_to_gguf, check_gguf
from ..inspection import inspect_path
from ..legacy import LEGACY_KINDS, apply_legacy_delta, make_delta_from_legacy
from ..manifest import FORMAT_VERSION, MANIFEST_NAME, READABLE_FORMATS, load_manifest
from ..registry import Registry
from ..signing import Signer, SigningKey, check_package, load_signing_key, sign_package, trusted_keys
from ..staging import check_output_file_free, check_output_free
from ._common import _add_force, _emit, _jsonable, _progress, _say, _size, _UsageError, _zstd_level
from ._names import DELTA, DELTA_OR_MODEL, LOCAL, MODEL, SUBJECT
from .reports import (
    _make_dict,
    _print_apply,
    _print_gguf,
    _print_gguf_check,
    _print_inspect,
    _print_legacy,
    _print_make,
    _print_merge,
    _print_plan,
    _print_verify,
    _report_dict,
)

if TYPE_CHECKING:
    from ._common import _Subparsers


def add_trust_argument(p: argparse.ArgumentParser) -> None:
    """``--trust PUB``, shared by apply, verify, inspect and download."""
    p.add_argument(
        "--trust",
        action="append",
        metavar="PUB",
        help="refuse a delta unless this EC public key (PEM), or a signer certified by this CA certificate (.crt), "
        "signed it; a folder of *.pub and *.crt; may repeat. $DELTAKIT_HOME/trusted_keys/ is trusted too",
    )


def checked_signer(delta: str | Path, args: argparse.Namespace) -> Signer | None:
    """Check a deltakit delta's signature before any tensor is read, against the trusted keys (``--trust``
    and DELTAKIT_HOME's) when there are any; say who signed it."""
    keys = trusted_keys(args.trust or ())
    signer = check_package(delta, keys)
    if signer is not None:
        _say(f"signed by {signer}{' (a trusted key)' if keys else ''}; signature checked")
    return signer


def _cmd_make(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.sign is not None and args.codec == "add":
        raise _UsageError("--sign signs the model apply rebuilds at make time, which --codec add does not know yet")
    key = load_signing_key(args.sign) if args.sign is not None else None  # a bad key fails before any work
    options: dict[str, Any] = {  # what a legacy re-packaging and a plain make share
        "name": args.name,
        "base_name": args.base_name,
        "shard_size": args.shard_size,
        "format": args.format,
        "level": args.level,
        "smallest": args.max,
        "replace": args.force,
        "progress": _progress(args),
    }
    if args.from_legacy is not None:
        kind = None if args.legacy_kind == "auto" else args.legacy_kind
        rebuilt, made = make_delta_from_legacy(
            args.base, args.from_legacy, args.out, kind=kind, checksums=args.checksums, **options
        )
        _say(f"read {args.from_legacy} as a delta of kind {rebuilt.kind}; re-packaged as format {args.format}:")
        signer = _signed(args, key, None)
        _print_make(made, time.perf_counter() - start)
        if args.json:
            _emit({"command": "make", **_make_dict(made), "legacy": rebuilt, "signer": _jsonable(signer)})
        return 0
    report = make_delta(args.base, args.target, args.out, codec=args.codec, allow_raw=args.allow_raw, **options)
    signer = _signed(args, key, args.target)
    _print_make(report, time.perf_counter() - start)
    if args.json:
        _emit({"command": "make", **_make_dict(report), "signer": _jsonable(signer)})
    return 0


def _signed(args: argparse.Namespace, key: SigningKey | None, target: str | None) -> Signer | None:
    """Sign the package just made (and, given its target, the model apply will rebuild from it)."""
    if key is None:
        return None
    signer = sign_package(args.out, key, target=target)
    what = "the package and the model it rebuilds (model.sig)" if target is not None else "the package"
    _say(f"signed {what} with {signer}")
    return signer


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
    """Find the base if none was named, pick the mode the deltas and flags ask for, run it."""
    _choose_base(args)
    return _apply_mode(args)(args)


def _apply_mode(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function for what ``--delta`` holds and the flags ask: LoRA adapters, a legacy delta, or a
    deltakit delta into GGUF, as a dry run, on Ray, or plainly. Refuses flags the mode cannot honour.

    For every mode but LoRA, ``args.delta`` becomes the one delta's path.
    """
    if args.quant is not None and args.to != "gguf":
        raise _UsageError("--quant is for --to gguf")
    adapters = [d for d in args.delta if is_adapter(d)]
    if args.to == "gguf" and (adapters or len(args.delta) > 1 or args.legacy != "auto"):
        raise _UsageError("--to gguf takes one deltakit delta; rebuild others to a folder, then deltakit convert it")
    if len(args.delta) > 1 and len(adapters) != len(args.delta):  # a mix, or several deltakit deltas
        raise _UsageError("several --delta are for LoRA adapters only; deltakit deltas apply one at a time")
    on_ray = "--ray rebuilds a deltakit delta into a model folder; the rest runs on one machine"
    if adapters:
        if args.trust:
            raise _UsageError("--trust is for deltakit deltas, which are signed; LoRA adapters are not")
        if args.dry_run:
            raise _UsageError("--dry-run is for deltakit deltas; adapters have no plan to print yet")
        if args.ray is not None:
            raise _UsageError(on_ray)
        return _apply_lora
    args.delta = args.delta[0]
    if (Path(args.delta) / MANIFEST_NAME).is_file():
        checked_signer(args.delta, args)  # before any tensor is read
    elif args.trust:
        raise _UsageError("--trust is for deltakit deltas, which are signed; this delta has no deltakit.json")
    if args.legacy != "auto" or (not (Path(args.delta) / MANIFEST_NAME).exists() and Path(args.delta).is_dir()):
        if args.dry_run:
            raise _UsageError("--dry-run is for deltakit deltas; legacy deltas have no plan to print yet")
        if args.ray is not None:
            raise _UsageError(on_ray)
        return _apply_legacy
    if args.ray is not None and args.to == "gguf":
        raise _UsageError(on_ray)
    if args.to == "gguf":
        return _apply_gguf_dry_run if args.dry_run else _apply_gguf
    if args.dry_run:
        return _apply_dry_run
    return _apply_on_ray if args.ray is not None else _apply_plain


def _apply_lora(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    merged = merge_adapters(
        args.base, args.delta, args.out, shard_size=args.shard_size, replace=args.force, progress=_progress(args)
    )
    _print_merge(merged, time.perf_counter() - start)
    if args.json:
        _emit({"command": "apply", "kind": "lora", **_jsonable(merged)})
    return 0


def _apply_legacy(args: argparse.Namespace) -> int:
    kind = None if args.legacy == "auto" else args.legacy
    start = time.perf_counter()
    legacy = apply_legacy_delta(
        args.base,
        args.delta,
        args.out,
        kind=kind,
        checksums=args.checksums,
        shard_size=args.shard_size,
        replace=args.force,
        progress=_progress(args),
    )
    _print_legacy(legacy, time.perf_counter() - start)
    if kind is None and legacy.kind != "oasst-xor":
        other = "alpaca" if legacy.kind == "fastchat" else "fastchat"
        _say(
            f"  note      {args.delta} has no deltakit.json: read as a {legacy.kind} delta "
            f"(--legacy {other} if it is not)"
        )
    if args.json:
        _emit({"command": "apply", **_jsonable(legacy)})
    return 0


def _apply_gguf(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    gguf = apply_to_gguf(
        args.base, args.delta, args.out, quant=args.quant or "f16", replace=args.force, progress=_progress(args)
    )
    _print_gguf(gguf, f"rebuilt {args.delta} onto {args.base} as", time.perf_counter() - start)
    if args.json:
        _emit({"command": "apply", "kind": "deltakit", "dry_run": False, **_jsonable(gguf), "verified": True})
    return 0


def _apply_gguf_dry_run(args: argparse.Namespace) -> int:
    """What the real run checks before writing; nothing written."""
    check_output_file_free(Path(args.out), replace=args.force)
    checked = check_gguf(args.base, delta=args.delta, quant=args.quant or "f16", sample=True)
    _print_gguf_check(checked)
    _say(f"dry run: nothing written; would write {args.out}")
    if args.json:
        _emit({"command": "apply", "kind": "deltakit", "dry_run": True, "out": args.out, "checks": "ok",
               **_jsonable(checked)})  # fmt: skip
    return 0


def _apply_dry_run(args: argparse.Namespace) -> int:
    """The plan, after the cheap checks a real apply starts with (a wrong base fails here too); nothing written."""
    check_output_free(Path(args.out), replace=args.force)
    plan = plan_apply(args.base, args.delta, shard_size=args.shard_size)
    plan.check_sample()
    _print_plan(plan)
    _say(f"dry run: nothing written; would write {args.out}")
    if args.json:
        _emit({"command": "apply", "kind": "deltakit", "dry_run": True, "out": args.out, "checks": "ok"})
    return 0


def _apply_on_ray(args: argparse.Namespace) -> int:
    from ..cluster import apply_delta_on_ray

    start = time.perf_counter()
    report = apply_delta_on_ray(
        args.base,
        args.delta,
        args.out,
        address=args.ray or None,
        shard_size=args.shard_size,
        replace=args.force,
        progress=_progress(args),
    )
    return _applied(args, report, start)


def _apply_plain(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    report = apply_delta(
        args.base, args.delta, args.out, shard_size=args.shard_size, replace=args.force, progress=_progress(args)
    )
    return _applied(args, report, start)


def _applied(args: argparse.Namespace, report: ApplyReport, start: float) -> int:
    _print_apply(report, time.perf_counter() - start)
    if args.json:
        _emit({"command": "apply", "kind": "deltakit", "dry_run": False, **_jsonable(report), "verified": True})
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.delta is not None:
        if args.base is not None:
            raise _UsageError("verify takes --base (checking a delta) or --delta (checking a model), not both")
        checked_signer(args.delta, args)
        report = verify_model(args.path, args.delta, progress=_progress(args))
    else:
        checked_signer(args.path, args)
        report = verify_delta(args.path, base=args.base, progress=_progress(args))
    if args.json:
        _emit(_report_dict(report))
    else:
        _print_verify(report, details=args.verbose)
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    trusted = trusted_keys(args.trust or ())
    info = inspect_path(args.path, with_fingerprint=args.fingerprint, trusted=trusted, progress=_progress(args))
    if args.json:
        _emit(info.to_dict())
    else:
        _print_inspect(info, all_tensors=args.all)
        if info.kind == "delta":
            trust = " (a trusted key)" if trusted and info.signer else ""
            _say(f"  signed by   {info.signer + trust if info.signer else 'nobody (unsigned)'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from ..examples import write_llama_pair

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="deltakit-demo-"))
    if root.exists() and any(root.iterdir()):
        raise DeltakitError(f"{root} is not empty; give the demo a new or empty --dir")
    quiet = argparse.Namespace(quiet=True)
    _say(f"1. writing a tiny LLaMA-shaped base and a fine-tune with a grown vocabulary, in bf16, under {root}")
    # weights moved as little as a real fine-tune moves them; a SentencePiece vocabulary, for GGUF
    base, tuned = write_llama_pair(root, noise=1.6e-5, dtype=torch.bfloat16, tokenizer=True)
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
        for name in (
            "config.json",
            "generation_config.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "added_tokens.json",
        )
    )
    _say(f"\nevery tensor of rebuilt/ is bit-identical to finetune/; side files identical: {same}")
    _say("\n5. deltakit apply --base base --delta delta --to gguf --out finetune.gguf")
    start = time.perf_counter()
    gguf = apply_to_gguf(base, root / "delta", root / "finetune.gguf", progress=_progress(quiet))
    _print_gguf(gguf, "rebuilt delta onto base as", time.perf_counter() - start)
    _say(f"\nthe files are in {root}; try: deltakit inspect {root / 'delta'}")
    return 0 if report.ok and same else 1


# -------------------------------------------------------------------------------------------------
# Parsers, one function each: the top-level parser interleaves them with other groups' commands


def add_make_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit make``."""
    p = sub.add_parser("make", parents=[common], help="compute a delta package from a base and a fine-tune")
    p.add_argument("--base", required=True, help="base checkpoint (folder or .safetensors file)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--target", help="fine-tuned checkpoint")
    source.add_argument(
        "--from-legacy", metavar="DELTA", help="re-package a FastChat/Panda or Alpaca delta release as a deltakit delta"
    )
    p.add_argument(
        "--legacy",
        "--legacy-kind",  # the spelling of 0.1, still accepted
        dest="legacy_kind",
        choices=["auto", *LEGACY_KINDS],
        default="auto",
        help="what --from-legacy holds (auto), as apply's --legacy",
    )
    p.add_argument("--checksums", help="for an XOR release: md5/sha256 sums of the rebuilt files (required)")
    p.add_argument("--out", required=True, help="delta package folder to create")
    _add_force(p, "package")
    p.add_argument("--codec", choices=["xor", "add"], default="xor", help="xor: lossless (default); add: task vector")
    p.add_argument("--name", help="the target's name in the manifest (default: its folder name)")
    p.add_argument("--base-name", help="the base's name in the manifest (default: its folder name)")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE, help="payload file size before coding (5GB)")
    p.add_argument(
        "--format",
        type=int,
        choices=READABLE_FORMATS,
        default=FORMAT_VERSION,
        help=f"package format: 2 compresses the payload losslessly, 1 is raw for older readers ({FORMAT_VERSION})",
    )
    level = p.add_mutually_exclusive_group()
    level.add_argument(
        "--level",
        type=_zstd_level,
        default=DEFAULT_LEVEL,
        help=f"zstd level, 1-22 (format 2; {DEFAULT_LEVEL}: fast, its match finder narrowed for fine-tune payloads)",
    )
    level.add_argument(
        "--max", action="store_true", help="the smallest payload, whatever make takes (format 2: zstd 19, more tried)"
    )
    p.add_argument(
        "--allow-raw",
        action="store_true",
        help="store tensors without a counterpart in the base raw even where that is most of the target, or where "
        "the target has fewer rows than the base (refused otherwise: it publishes whole weights)",
    )
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the package and the model it rebuilds with this EC private key (PEM), with OpenSSF Model Signing",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")
    p.set_defaults(run=_cmd_make, resolve={"base": MODEL, "target": MODEL, "from_legacy": LOCAL})


def add_apply_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit apply``."""
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
    _add_force(p, "model")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE, help="output file size (5GB)")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan; write nothing")
    p.add_argument(
        "--legacy",
        choices=["auto", *LEGACY_KINDS],
        default="auto",
        help="the delta is an older tool's release: a model folder of differences (auto: when it has no deltakit.json)",
    )
    p.add_argument("--checksums", help="for an XOR release: md5/sha256 sums of the rebuilt files, from its model card")
    p.add_argument(
        "--to",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: a model folder; gguf: one GGUF file for llama.cpp, with no folder between (--out model.gguf)",
    )
    p.add_argument("--quant", choices=[*QUANTS, *KQUANTS], help="with --to gguf: the GGUF's type (f16)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="one task per output shard on a Ray cluster (ADDRESS, or RAY_ADDRESS; paths on a filesystem every node "
        "mounts); needs the ray extra",
    )
    add_trust_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")
    p.set_defaults(run=_cmd_apply, resolve={"base": MODEL, "delta": DELTA})


def add_verify_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit verify``."""
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="check a delta package (with --base: and the base), or a rebuilt model (with --delta)",
    )
    p.add_argument("path", help="a delta package, or with --delta a rebuilt model")
    p.add_argument("--base", help="also check that this base is the one the delta was made from")
    p.add_argument("--delta", help="check PATH, a model, against this delta's target digests")
    add_trust_argument(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_cmd_verify, resolve={"base": MODEL, "path": SUBJECT, "delta": DELTA})


def add_inspect_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit inspect``."""
    p = sub.add_parser("inspect", parents=[common], help="say what a checkpoint or delta package holds")
    p.add_argument("path", help="a checkpoint, delta package, adapter or legacy delta: path, name or Hub repo id")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--fingerprint", action="store_true", help="hash a checkpoint's tensors to fingerprint it")
    add_trust_argument(p)
    p.set_defaults(run=_cmd_inspect, resolve={"path": DELTA_OR_MODEL})


def add_demo_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit demo``."""
    p = sub.add_parser("demo", parents=[common], help="make, apply and verify a delta on a built-in tiny model")
    p.add_argument("--dir", help="where to write the example (default: a new temporary folder)")
    p.set_defaults(run=_cmd_demo)
