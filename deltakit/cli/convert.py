"""The convert command: Meta <-> HF layout, .bin -> safetensors, a dtype change, resharding, GGUF.

One library call, :func:`deltakit.convert.convert`, and a few lines on what it wrote.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ..convert import DTYPE_NAMES, convert
from ..engine import DEFAULT_SHARD_SIZE
from ..families import llama3
from ..gguf import KQUANTS, QUANTS, convert_to_gguf
from ..units import human_bytes
from ._common import _add_force, _emit, _jsonable, _positive, _progress, _say, _size, _UsageError
from ._names import LOCAL
from .reports import _print_gguf

if TYPE_CHECKING:
    from ._common import _Subparsers


def _cmd_convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.to == "gguf":
        if args.dtype is not None or args.meta_shards is not None:
            raise _UsageError("--to gguf takes --quant for the tensors' type, not --dtype or --meta-shards")
        if args.llama_version is not None or args.instruct is not None:
            raise _UsageError("--llama-version and --instruct are for a Meta checkpoint's conversion to hf")
        gguf = convert_to_gguf(
            args.source, args.out, quant=args.quant or "f16", replace=args.force, progress=_progress(args)
        )
        _print_gguf(gguf, f"converted {args.source} ({gguf.source_kind}) to", time.perf_counter() - start)
        if args.json:
            _emit({"command": "convert", **_jsonable(gguf)})
        return 0
    if args.quant is not None:
        raise _UsageError("--quant is for --to gguf; --dtype casts the tensors of an hf or meta output")
    report = convert(
        args.source,
        args.out,
        to=args.to,
        dtype=args.dtype,
        shard_size=args.shard_size,
        meta_shards=args.meta_shards,
        llama_version=args.llama_version,
        instruct=args.instruct,
        replace=args.force,
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
    if args.json:
        _emit({"command": "convert", **_jsonable(report)})
    return 0


def add_convert_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit convert``."""
    p = sub.add_parser(
        "convert", parents=[common], help="Meta <-> HF layout, .bin -> safetensors, dtype, resharding, GGUF"
    )
    p.add_argument("source", help="a Meta folder (consolidated.NN.pth + params.json) or an HF checkpoint")
    p.add_argument("--out", required=True, help="folder to create (a file, model.gguf, for --to gguf)")
    _add_force(p, "output")
    p.add_argument(
        "--to", choices=["hf", "meta", "gguf"], default="hf", help="output layout (hf); gguf: one file for llama.cpp"
    )
    p.add_argument("--quant", choices=[*QUANTS, *KQUANTS], help="with --to gguf: the GGUF's type (f16)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), help="cast float tensors (round to nearest even)")
    p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE, help="HF output file size (5GB)")
    p.add_argument(
        "--meta-shards", type=_positive, help="model-parallel shards for --to meta (Meta's count by default)"
    )
    p.add_argument(
        "--llama-version",
        choices=list(llama3.VERSIONS),
        help="a Meta Llama 3 checkpoint's release, which params.json does not say (3.2: rope factor 32, tied head)",
    )
    p.add_argument(
        "--instruct",
        action=argparse.BooleanOptionalAction,
        help="a Meta Llama 3 checkpoint is (--instruct) or is not (--no-instruct) an instruct model",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")
    p.set_defaults(run=_cmd_convert, resolve={"source": LOCAL})
