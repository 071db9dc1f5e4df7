"""How a failed Hub request reads in a message, shared by publishing and fetching."""

from __future__ import annotations

__all__ = ["http_reason", "is_transport_error"]


def http_reason(error: Exception) -> str:
    """``HTTP 403: <first line>`` for a refused request, else the error's first line."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"HTTP {status}: {text}" if status else text


def is_transport_error(error: BaseException) -> bool:
    """No connection, a timeout: huggingface_hub's HTTP client (httpx, or the httpx2 fork it ships with
    since 2.x) raises its own TransportError, which is neither an OSError nor a Hub error."""
    return any(
        cls.__name__ == "TransportError" and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(error).__mro__
    )
