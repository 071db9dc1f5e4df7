"""The convert command: Meta <-> HF layout, .bin -> safetensors, a dtype change, resharding.

One library call, :func:`deltakit.convert.convert`, and a few lines on what it wrote.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ..convert import DTYPE_NAMES, convert
from ..engine import DEFAULT_SHARD_SIZE
from ..units import human_bytes, parse_size
from ._common import _emit, _jsonable, _positive, _progress, _say

if TYPE_CHECKING:
    from ._common import _Subparsers


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
    if args.json:
        _emit({"command": "convert", **_jsonable(report)})
    return 0


def add_convert_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``deltakit convert``."""
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
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the report goes to stderr)")
    p.set_defaults(run=_cmd_convert)
