"""Compiled one-pass kernels for format 2's frames: byte streams split or joined with the lossless
transform against the base (``xor``, ``sub``) done in the same pass.

numpy needs a pass over memory per operation: joining two byte streams and undoing ``sub`` took 8,
and they cost as much as zstd itself (BENCHMARKS.md). These kernels do it in one, compiled by numba,
without the GIL, so both reading threads run them at once. The numpy codecs in
:mod:`deltakit.codecs` stay the reference: the tests check these kernels against them bit for bit.
numba is imported on first use (it costs a few tenths of a second), and compiled kernels are cached
on disk, so only the first run on a machine compiles them.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import Bytes

__all__ = [
    "TRANSFORMS",
    "join_streams",
    "split_streams",
    "transform_words",
    "untransform_words",
    "warm_up",
]

log = logging.getLogger(__name__)

# Codes the kernels take for a transform: none (the payload is the target), or a lossless codec.
TRANSFORMS = {None: 0, "xor": 1, "sub": 2}
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


_module: Any = None
_import_lock = threading.Lock()


def _compiled() -> Any:
    """The compiled kernels' module, imported (numba with it) on first use."""
    global _module
    if _module is None:
        with _import_lock:
            if _module is None:
                _choose_numba_cache()
                enabled = gc.isenabled()
                gc.disable()  # numba's import makes ~10^5 objects: collecting on the way costs a third of it
                try:
                    from . import _jit
                finally:
                    if enabled:
                        gc.enable()
                gc.freeze()  # and later collections need not walk them again
                _module = _jit
    return _module


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _choose_numba_cache() -> None:
    """Give numba a cache folder it can write when neither of its own choices is writable.

    numba caches compiled kernels beside their source, else under the user's cache folder, and with
    neither writable (a read-only install run by a user without a writable home: ``docker run --user``)
    the first kernel call raises "cannot cache function ... no locator available". Then the cache goes
    to a folder of this user's own under the temporary folder; a folder there that is not this user's
    (anyone may create the name first) is never used, and a fresh one is made instead.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"
    if _writable(Path(__file__).parent / "__pycache__") or _writable(user_cache):
        return
    folder = Path(tempfile.gettempdir()) / f"deltakit-numba-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        mine = folder.lstat().st_uid == os.getuid() and folder.is_dir() and not folder.is_symlink()
    except OSError:
        mine = False
    if not (mine and _writable(folder)):
        folder = Path(tempfile.mkdtemp(prefix="deltakit-numba-"))
    log.info("numba cannot write its usual cache folders; caching compiled kernels in %s", folder)
    os.environ["NUMBA_CACHE_DIR"] = str(folder)


_warming: threading.Thread | None = None
_warming_lock = threading.Lock()


def warm_up() -> None:
    """Load the kernels on a background thread, once per process, and return at once.

    Importing numba and starting its compiler costs about 0.4 s of one core even when every kernel
    is in the on-disk cache; started when a job begins, that overlaps with reading headers and
    checking the base instead of holding up the first frame.
    """
    global _warming
    with _warming_lock:
        if _warming is None:
            _warming = threading.Thread(target=_load, name="deltakit-kernels", daemon=True)
            _warming.start()


def _load() -> None:
    try:
        words = np.zeros(16, dtype=np.uint8)
        out = np.empty_like(words)
        for transform in TRANSFORMS:
            split_streams(words, 2, out, base=words, transform=transform)
            join_streams(out, 2, words, base=words, transform=transform)
    except Exception:  # the job's own first call raises it again, where it can be reported
        log.debug("loading the compiled kernels failed", exc_info=True)


def _code(transform: str | None) -> int:
    try:
        return TRANSFORMS[transform]
    except KeyError:
        raise ValueError(f"unknown transform {transform!r}") from None


def join_streams(
    planes: Bytes, itemsize: int, out: Bytes, *, base: Bytes | None = None, transform: str | None = None
) -> None:
    """Interleave byte streams back into elements and undo ``transform`` against ``base``, into ``out``.

    Args:
        planes: ``itemsize`` byte streams of ``n`` bytes each, one after the other (stream ``j`` holds
            byte ``j`` of every element, least significant first); ``itemsize`` is 2, 4 or 8.
        out: ``n * itemsize`` bytes for the target's elements.
        base: the base's bytes for the same ``n`` elements, for ``transform`` ``xor`` or ``sub``.
    """
    word = _WORDS[itemsize]
    values = out.view(word)
    code = _code(transform)
    kernel = getattr(_compiled(), f"join{itemsize}")
    kernel(planes.reshape(itemsize, -1), values if base is None else base.view(word), values, code)


def split_streams(
    target: Bytes, itemsize: int, planes: Bytes, *, base: Bytes | None = None, transform: str | None = None
) -> None:
    """Apply ``transform`` against ``base`` and split the elements into byte streams, into ``planes``:
    the inverse of :func:`join_streams`."""
    word = _WORDS[itemsize]
    values = target.view(word)
    kernel = getattr(_compiled(), f"split{itemsize}")
    kernel(values, values if base is None else base.view(word), planes.reshape(itemsize, -1), _code(transform))


def transform_words(target: Bytes, base: Bytes, itemsize: int, out: Bytes, transform: str) -> None:
    """The payload elements of ``transform`` (``xor``, ``sub``), whole, into ``out``."""
    word = _WORDS[itemsize]
    kernel = _compiled().words_forward
    kernel(target.view(word), base.view(word), out.view(word), _code(transform), word(1), word(8 * itemsize - 1))


def untransform_words(payload: Bytes, base: Bytes, itemsize: int, out: Bytes, transform: str) -> None:
    """The target's elements from whole payload elements of ``transform`` (``xor``, ``sub``), into ``out``."""
    word = _WORDS[itemsize]
    kernel = _compiled().words_backward
    kernel(payload.view(word), base.view(word), out.view(word), _code(transform), word(1))
