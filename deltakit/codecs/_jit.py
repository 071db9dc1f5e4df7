"""The numba kernels behind :mod:`deltakit.codecs.kernels`, compiled on first call and cached on disk.

Kept apart so that importing deltakit never imports numba: only a format 2 frame does. Defined at
module level, not in a closure, so numba's on-disk cache holds them from one run to the next.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit


# Arithmetic on words narrower than 64 bits is done by numba in int64; every result is stored
# back into a word of the element's width, which keeps exactly the low bits: the modulo 2^bits
# of the spec (docs/FORMAT.md). 64-bit words use uint64 constants, so nothing mixes signedness.
@njit(inline="always")
def _forward(transform: int, t: Any, b: Any, one: Any, top: Any) -> Any:
    if transform == 1:
        return t ^ b
    if transform == 2:
        d = t - b
        return (d << one) ^ (one - one - ((d >> top) & one))  # zigzag: sign into the low bit
    return t


@njit(inline="always")
def _backward(transform: int, b: Any, z: Any, one: Any) -> Any:
    if transform == 1:
        return b ^ z
    if transform == 2:
        return b + ((z >> one) ^ (one - one - (z & one)))
    return z


# One kernel per element width, its bytes spelled out: with a loop over the byte count inside the
# element loop, LLVM does not vectorize, and the same join ran at 1.1 GB/s instead of 10 (measured).
@njit(nogil=True, cache=True, boundscheck=False)
def join2(planes: Any, base: Any, out: Any, transform: int) -> None:
    one, eight = np.uint16(1), np.uint16(8)
    for i in range(out.size):
        z = np.uint16(planes[0, i]) | (np.uint16(planes[1, i]) << eight)
        out[i] = _backward(transform, base[i], z, one)


@njit(nogil=True, cache=True, boundscheck=False)
def join4(planes: Any, base: Any, out: Any, transform: int) -> None:
    one = np.uint32(1)
    for i in range(out.size):
        z = (
            np.uint32(planes[0, i])
            | (np.uint32(planes[1, i]) << np.uint32(8))
            | (np.uint32(planes[2, i]) << np.uint32(16))
            | (np.uint32(planes[3, i]) << np.uint32(24))
        )
        out[i] = _backward(transform, base[i], z, one)


@njit(nogil=True, cache=True, boundscheck=False)
def join8(planes: Any, base: Any, out: Any, transform: int) -> None:
    one = np.uint64(1)
    for i in range(out.size):
        z = np.uint64(0)
        for k in range(8):
            z |= np.uint64(planes[k, i]) << np.uint64(8 * k)
        out[i] = _backward(transform, base[i], z, one)


@njit(nogil=True, cache=True, boundscheck=False)
def split2(target: Any, base: Any, planes: Any, transform: int) -> None:
    one, top = np.uint16(1), np.uint16(15)
    for i in range(target.size):
        z = _forward(transform, target[i], base[i], one, top)
        planes[0, i] = z & 0xFF
        planes[1, i] = (z >> 8) & 0xFF


@njit(nogil=True, cache=True, boundscheck=False)
def split4(target: Any, base: Any, planes: Any, transform: int) -> None:
    one, top = np.uint32(1), np.uint32(31)
    for i in range(target.size):
        z = _forward(transform, target[i], base[i], one, top)
        planes[0, i] = z & 0xFF
        planes[1, i] = (z >> 8) & 0xFF
        planes[2, i] = (z >> 16) & 0xFF
        planes[3, i] = (z >> 24) & 0xFF


@njit(nogil=True, cache=True, boundscheck=False)
def split8(target: Any, base: Any, planes: Any, transform: int) -> None:
    one, top = np.uint64(1), np.uint64(63)
    for i in range(target.size):
        z = np.uint64(_forward(transform, target[i], base[i], one, top))
        for k in range(8):
            planes[k, i] = (z >> np.uint64(8 * k)) & np.uint64(0xFF)


@njit(nogil=True, cache=True, boundscheck=False)
def words_forward(target: Any, base: Any, out: Any, transform: int, one: Any, top: Any) -> None:
    for i in range(out.size):
        out[i] = _forward(transform, target[i], base[i], one, top)


@njit(nogil=True, cache=True, boundscheck=False)
def words_backward(payload: Any, base: Any, out: Any, transform: int, one: Any) -> None:
    for i in range(out.size):
        out[i] = _backward(transform, base[i], payload[i], one)
