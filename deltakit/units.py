"""Byte sizes as people write them (``5GB``, ``512MiB``) and read them (``1.9 GiB``)."""

from __future__ import annotations

import re

__all__ = ["human_bytes", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``5GB`` -> 5_000_000_000, ``512MiB`` -> 536_870_912, ``1000`` -> 1000 (decimal units, as HF writes them).

    Raises:
        ValueError: ``text`` is not a size, or not a positive one.
    """
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = 0 if unit == "B" else "KMGT".index(unit[0]) + 1
    size = int(number * (1024 if "I" in unit else 1000) ** power)
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.2 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
