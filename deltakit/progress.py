"""Progress reporting: the engine asks a factory for a bar and feeds it bytes; the caller picks the bar.

The library never prints: by default it reports nothing, the CLI passes tqdm bars on stderr, and the
service passes callbacks that record progress on its jobs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

__all__ = ["ProgressBar", "ProgressFactory", "no_progress", "tqdm_progress"]


class ProgressBar(Protocol):
    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], ProgressBar]
"""``factory(total_bytes, description) -> bar``; the engine calls ``bar.update(nbytes)``, then ``close()``."""


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, description: str) -> ProgressBar:
    """A bar that shows nothing."""
    return _NullBar()


def tqdm_progress(*, quiet: bool = False) -> ProgressFactory:
    """tqdm bars in bytes on stderr; ``quiet`` silences them."""
    from tqdm import tqdm

    def factory(total: int, description: str) -> ProgressBar:
        bar: ProgressBar = tqdm(
            total=total,
            desc=description,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=quiet,
            leave=False,
            dynamic_ncols=True,
        )
        return bar

    return factory
