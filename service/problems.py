"""Library errors in the API's words: the request field an error is about (``DeltakitError.argument``
mapped to the JSON field) and advice in terms of it, since an HTTP client has no CLI flags."""

from __future__ import annotations

from deltakit.errors import DeltakitError, OutputExistsError

# The request field each library argument comes from, in the jobs this service runs.
_FIELDS = {
    "out": "output",
    "name": "output",  # the registry name an output is registered under
    "base": "base",
    "delta": "delta",
    "target": "target",
    "model": "model",
    "source": "model",  # convert_to_gguf and check_gguf call the model their source
    "quant": "quant",
    "level": "level",
    "format": "format",
    "repo_id": "repo_id",  # imports into the model store
    "folder": "source",  # the model folder an import reads
    "files": "files",  # an upload's parts
}

# (error type, advice); the first that matches speaks. Other errors about a field: "check the request's FIELD".
_ADVICE: tuple[tuple[type[DeltakitError], str], ...] = ((OutputExistsError, "choose another {field}"),)


def request_field(error: DeltakitError) -> str | None:
    """The request's JSON field ``error`` is about, if any."""
    return _FIELDS.get(error.argument) if error.argument is not None else None


def advice(error: DeltakitError) -> str:
    """What a client may change, as ``"; ..."`` after the error's own words, or ``""``."""
    field = request_field(error)
    if field is None:
        return ""
    text = next((a for kind, a in _ADVICE if isinstance(error, kind)), "check the request's {field}")
    return "; " + text.format(field=field)


def problem_fields(error: DeltakitError, detail: str) -> dict[str, str]:
    """``detail`` with the advice, and ``field`` where the error is about one (an RFC 9457 extension)."""
    field = request_field(error)
    return {"detail": detail + advice(error), **({"field": field} if field is not None else {})}
