"""What general-purpose and float-aware compressors, and order-0 entropy, make of a real fine-tune: the
baselines a delta codec has to beat, measured on the raw 16-bit patterns of a base/fine-tune pair.

Every figure covers the same bytes: all 16-bit tensors of the fine-tune, in name order, as one stream.

Usage::

    .venv/bin/python benchmarks/compression_baselines.py                  # builds the pair first if needed
    .venv/bin/python benchmarks/compression_baselines.py --out benchmarks/work/minilm --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors import safe_open

ZSTD_LEVEL = 3
DTYPE_LABELS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ZIPNN_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Columns of the table, in order, with what each one measures.
METHODS = {
    "zstd3_target": "zstd -3 on the target bytes alone",
    "zipnn_target": "zipnn on the target bytes alone",
    "zstd3_xor": "zstd -3 on target XOR base, one stream",
    "zipnn_xor": "zipnn on target XOR base",
    "zstd3_xor_split": "zstd -3 on the XOR's high and low byte streams, each on its own",
    "zstd3_zigzag_split": "zstd -3 on the zigzag difference's high and low byte streams",
    "entropy0_target_split": "order-0 entropy of the target's high + low byte streams",
    "entropy0_xor_split": "order-0 entropy of the XOR's high + low byte streams",
    "entropy0_zigzag_split": "order-0 entropy of the zigzag difference's high + low byte streams",
}


@dataclass(frozen=True)
class Baselines:
    """Compressed sizes, in bytes, of one pair's target under each method of ``METHODS``."""

    dtype: str
    tensors: int
    target_bytes: int
    sizes: dict[str, int]

    def percent(self, method: str) -> float:
        """``method``'s size as a percentage of the target bytes."""
        return 100.0 * self.sizes[method] / self.target_bytes


# --------------------------------------------------------------------------------------------------
# Reading


def _bits(path: Path) -> tuple[dict[str, np.ndarray], torch.dtype | None]:
    """Every 16-bit floating tensor of a safetensors file as flat uint16 bit patterns, and their dtype."""
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(name)
            if tensor.dtype in _ZIPNN_DTYPES:
                dtypes.add(tensor.dtype)
                # numpy has no bfloat16: take the bits, never the values
                tensors[name] = tensor.contiguous().view(torch.uint16).flatten().numpy()
    if len(dtypes) > 1:
        raise ValueError(f"{path} mixes 16-bit dtypes: {sorted(map(str, dtypes))}")
    return tensors, (dtypes.pop() if dtypes else None)


def load_pair(pair_dir: Path) -> tuple[np.ndarray, np.ndarray, torch.dtype, int]:
    """The base and target bit patterns of every 16-bit tensor they share, concatenated in name order.

    Raises:
        ValueError: the two files hold different 16-bit tensors, or shapes that differ.
    """
    base, base_dtype = _bits(Path(pair_dir) / "base" / "model.safetensors")
    target, dtype = _bits(Path(pair_dir) / "finetune" / "model.safetensors")
    if base.keys() != target.keys() or base_dtype != dtype or dtype is None:
        raise ValueError(f"{pair_dir}: base and fine-tune do not hold the same 16-bit tensors")
    names = sorted(target)
    for name in names:
        if base[name].shape != target[name].shape:
            raise ValueError(f"{pair_dir}: {name} is {base[name].shape} in base, {target[name].shape} in fine-tune")
    return np.concatenate([base[n] for n in names]), np.concatenate([target[n] for n in names]), dtype, len(names)


# --------------------------------------------------------------------------------------------------
# Transforms and measures, all on uint16 bit patterns


def zigzag_difference(target: np.ndarray, base: np.ndarray) -> np.ndarray:
    """(target - base) mod 2^16, read as int16 and zigzag-mapped so that small steps either way are small."""
    d = (target - base).view(np.int16)  # uint16 arithmetic wraps: the modular difference
    return ((d << 1) ^ (d >> 15)).view(np.uint16)


def byte_streams(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and the low byte of each 16-bit word, as two streams."""
    return (words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)


def entropy0_bytes(stream: np.ndarray) -> float:
    """Order-0 (byte-wise Shannon) entropy of ``stream``, as a size in bytes."""
    counts = np.bincount(stream, minlength=256).astype(np.float64)
    p = counts[counts > 0] / len(stream)
    return float(-(p * np.log2(p)).sum() * len(stream) / 8)


def zstd_size(data: bytes | np.ndarray, level: int = ZSTD_LEVEL) -> int:
    """Size of one zstd frame of ``data`` at ``level``, single-threaded."""
    return len(zstandard.ZstdCompressor(level=level).compress(memoryview(np.ascontiguousarray(data)).cast("B")))


def zipnn_size(words: np.ndarray, dtype: torch.dtype) -> int:
    """Size of zipnn's compression of ``words`` as a ``dtype`` byte stream (byte grouping plus Huffman or zstd,
    its own per-chunk choice), checked by decompressing.

    Raises:
        ImportError: zipnn is not installed.
        RuntimeError: zipnn's output does not decompress to the input.
    """
    from zipnn import ZipNN

    codec = ZipNN(input_format="byte", bytearray_dtype=_ZIPNN_DTYPES[dtype], method="AUTO")
    # zipnn 0.5.4 reorders bfloat16 sign bits in place, in the very buffer it is given (even a ``bytes``): hand
    # it a copy of its own, and check the round trip against ``words``
    packed = codec.compress(words.tobytes())
    if bytes(codec.decompress(packed)) != words.tobytes():
        raise RuntimeError("zipnn did not round-trip")
    return len(packed)


def baselines(pair_dir: Path, *, zipnn: bool = True) -> Baselines:
    """Every size of ``METHODS`` for the pair in ``pair_dir`` (``base/`` and ``finetune/`` folders with a
    ``model.safetensors`` each); ``zipnn=False`` leaves the zipnn columns out."""
    base, target, dtype, count = load_pair(pair_dir)
    xor = target ^ base
    zigzag = zigzag_difference(target, base)
    sizes = {
        "zstd3_target": zstd_size(target),
        "zstd3_xor": zstd_size(xor),
        "zstd3_xor_split": sum(zstd_size(s) for s in byte_streams(xor)),
        "zstd3_zigzag_split": sum(zstd_size(s) for s in byte_streams(zigzag)),
        "entropy0_target_split": round(sum(entropy0_bytes(s) for s in byte_streams(target))),
        "entropy0_xor_split": round(sum(entropy0_bytes(s) for s in byte_streams(xor))),
        "entropy0_zigzag_split": round(sum(entropy0_bytes(s) for s in byte_streams(zigzag))),
    }
    if zipnn:
        sizes["zipnn_target"] = zipnn_size(target, dtype)
        sizes["zipnn_xor"] = zipnn_size(xor, dtype)
    label = next(k for k, v in DTYPE_LABELS.items() if v == dtype)
    return Baselines(dtype=label, tensors=count, target_bytes=target.nbytes, sizes=sizes)


def table(results: Sequence[Baselines]) -> str:
    """A markdown table: one row per method, size, % of target and ratio per dtype."""
    head = "| method | " + " | ".join(f"{r.dtype} bytes | {r.dtype} % | {r.dtype} ratio" for r in results) + " |"
    rows = [head, "|---|" + "---:|" * 3 * len(results)]
    rows.append("| target (raw) | " + " | ".join(f"{r.target_bytes:,} | 100.0 | 1.00x" for r in results) + " |")
    for method in METHODS:
        if not all(method in r.sizes for r in results):
            continue
        cells = (
            f"{r.sizes[method]:,} | {r.percent(method):.1f} | {r.target_bytes / r.sizes[method]:.2f}x" for r in results
        )
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from finetune import DEFAULT_OUT, build_pair

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pair folder from finetune.py (default: %(default)s)")
    p.add_argument("--no-zipnn", action="store_true", help="leave the zipnn columns out")
    p.add_argument("--json", type=Path, help="also write the sizes here")
    args = p.parse_args(argv)
    if not (args.out / "recipe.json").exists():
        build_pair(args.out)
    start = time.perf_counter()
    results = [baselines(args.out / label, zipnn=not args.no_zipnn) for label in DTYPE_LABELS]
    print(table(results))
    print(f"\n{results[0].tensors} tensors; {time.perf_counter() - start:.1f}s")
    for method, what in METHODS.items():
        print(f"- {method}: {what}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
