"""Hub repo ids: ``ORG/NAME[@REVISION]`` as deltakit's commands take them, and the Hub's own rule for an id."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UnsupportedInputError

__all__ = ["check_repo_id", "is_repo_spec", "parse_repo_spec"]

_REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def is_repo_spec(text: str) -> bool:
    """``ORG/NAME`` or ``ORG/NAME@REVISION`` that is not an existing local path."""
    return bool(_REPO_SPEC.match(text)) and not Path(text).exists()


def parse_repo_spec(text: str, *, argument: str | None = None) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``ORG/NAME[@REVISION]``; the revision is None when none is given.

    Args:
        argument: the parameter ``text`` came in as, recorded on the error.

    Raises:
        UnsupportedInputError: ``text`` is not of that form.
    """
    match = _REPO_SPEC.match(text)
    if match is None:
        raise UnsupportedInputError(f"{text!r} is not a Hub repo id (ORG/NAME or ORG/NAME@REVISION)", argument=argument)
    return match["repo"], match["revision"]


def check_repo_id(text: str, what: str, hint: str | None = None, *, argument: str | None = None) -> None:
    """Refuse ``text`` unless it is a repo id the Hub accepts, as huggingface_hub checks one.

    Args:
        what: how the message names the value (``base_model 'x/y/z'``).
        hint: words appended to the message; kept for callers that have not moved to ``argument``.
        argument: the parameter ``text`` came in as, recorded on the error.

    Raises:
        UnsupportedInputError: the Hub would refuse the id.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # public, exported lazily

    try:
        validate_repo_id(text)
    except HFValidationError as e:
        tail = f"; {hint}" if hint else ""
        raise UnsupportedInputError(f"{what} is not a Hub repo id ({e}){tail}", argument=argument) from e
