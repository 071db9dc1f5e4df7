"""What every command module shares: output on stdout, progress bars, argument types, the usage error.

The names keep their leading underscore: they are the CLI's own, never part of deltakit's API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from ..progress import ProgressFactory, tqdm_progress
from ..units import parse_size

if TYPE_CHECKING:
    from typing import TypeAlias

    _Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _zstd_level(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 22:
        raise argparse.ArgumentTypeError(f"must be a zstd level from 1 to 22: {text!r}")
    return value


def _size(text: str) -> int:
    """A byte size (``5GB``, ``512MiB``); the library's words for a bad one become argparse's usage error."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return value


def _add_force(parser: argparse.ArgumentParser, what: str) -> None:
    """``--force``: replace an existing output, only once the new one is complete and checked."""
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing --out; the old {what} stays as it was until the new one is complete and verified",
    )


class _Output:
    """Where report lines go: stdout, or stderr when ``--json`` keeps stdout for one JSON object."""

    json = False


def _write(stream: TextIO, text: str) -> None:
    """A line on ``stream``. When its reader has gone (``deltakit release ... | head -1``), the rest of
    the output is dropped and the command carries on: the job finishes, and its exit status says how."""
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # what is still buffered, and all later output, goes nowhere
        os.close(devnull)


def _say(text: str = "") -> None:
    """A line of the human report: on stdout, or on stderr under ``--json``."""
    _write(sys.stderr if _Output.json else sys.stdout, text)


def _emit(result: Any) -> None:
    """The one JSON object a ``--json`` command prints on stdout, for scripts and CI steps."""
    _write(sys.stdout, json.dumps(_jsonable(result), indent=2))


def _jsonable(value: Any) -> Any:
    """Reports as JSON values: dataclasses as objects (without whole manifests), paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "manifest"}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _progress(args: argparse.Namespace) -> ProgressFactory:
    return tqdm_progress(quiet=args.quiet)


class _UsageError(Exception):
    pass


class _Terminated(BaseException):
    """SIGTERM (``kill``, systemd, ``docker stop``), raised in the main thread so that every ``with``
    block unwinds, staging folders included, as it does for Ctrl-C."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated
