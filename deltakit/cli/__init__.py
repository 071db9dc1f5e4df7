"""The ``deltakit`` command: parse, call one library function, print its report.

Exit status: 0 on success, 1 on any deltakit failure (one line on stderr naming what failed),
2 on bad usage.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, cast

from .. import __version__
from ..errors import DeltakitError
from ._common import _Output, _terminate, _Terminated, _UsageError
from ._names import _resolve_names
from .advice import _advice, _flags
from .convert import add_convert_parser
from .delta import add_apply_parser, add_demo_parser, add_inspect_parser, add_make_parser, add_verify_parser
from .hub import add_hub_parsers
from .registry import add_registry_parsers
from .service import add_service_parsers

if TYPE_CHECKING:
    from ._common import _Subparsers

__all__ = ["main"]

log = logging.getLogger("deltakit")


class _Parser(argparse.ArgumentParser):
    """argparse, with the nearest command or choice suggested for a mistyped one (``deltakit aply``)."""

    def error(self, message: str) -> NoReturn:
        typed = re.search(r"invalid choice: '([^']*)'", message)
        if typed is not None:
            choices = [str(c) for a in self._actions if a.choices is not None for c in a.choices]
            close = difflib.get_close_matches(typed[1], choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Also records, as ``flags``, the flag of each argument of the command that ran, for advice."""
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, "flags"):  # the innermost parser, the command's own, returns first
            parsed.flags = _flags(self)
        return parsed, extras


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deltakit",
        description="Release fine-tuned models as deltas against licensed base weights; rebuild them bit for bit.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"deltakit {__version__}")
    # also before the command (deltakit -q apply ...); under their own names, since a subcommand's
    # defaults would overwrite the same names (see main)
    parser.add_argument("-q", "--quiet", dest="quiet_first", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", dest="verbose_first", action="store_true", help="log what happens")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens, on stderr")
    # subcommands parse with _Parser too (argparse makes them of the parent's class)
    sub = cast("_Subparsers", parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    # In the order `deltakit --help` lists them.
    add_make_parser(sub, common)
    add_apply_parser(sub, common)
    add_convert_parser(sub, common)
    add_verify_parser(sub, common)
    add_inspect_parser(sub, common)
    add_hub_parsers(sub, common)
    add_registry_parsers(sub, common)
    add_service_parsers(sub, common)
    add_demo_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False) or args.quiet_first
    args.verbose = getattr(args, "verbose", False) or args.verbose_first
    _Output.json = bool(getattr(args, "json", False))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="deltakit: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("huggingface_hub").propagate = False  # it prints its warnings itself: once is enough
    if getattr(args, "quiet", False):  # huggingface_hub's own bars too; it reads this when first imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    run: Callable[[argparse.Namespace], int] = args.run
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        _resolve_names(args)
        return run(args)
    except _UsageError as e:
        parser.error(str(e))
    except DeltakitError as e:
        print(f"deltakit: error: {e}{_advice(e, getattr(args, 'flags', {}))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output that must be read (a token) met a closed stdout: the command failed
        print("deltakit: error: standard output was closed before the command could write its result", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: no traceback, the OS's own words and the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"deltakit: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deltakit: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except _Terminated:
        print("deltakit: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        return 143
    except Exception as e:  # a bug: one line, and the traceback with --verbose
        if args.verbose:
            log.error("the traceback of this bug:", exc_info=True)
        print(
            f"deltakit: internal error (a bug, please report it): {type(e).__name__}: {e}"
            + ("" if args.verbose else "; run with --verbose for the traceback"),
            file=sys.stderr,
        )
        return 1
    return 0  # unreachable: parser.error exits


def entry_point() -> None:
    sys.exit(main())
