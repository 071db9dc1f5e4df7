"""The public surface is curated: everything in __all__ exists, and nothing private leaks into it."""

from __future__ import annotations

import deltakit
import deltakit.errors


def test_all_names_exist_and_are_public():
    for name in deltakit.__all__:
        assert hasattr(deltakit, name), name
    assert sorted(deltakit.__all__) == deltakit.__all__
    assert not [n for n in deltakit.__all__ if n.startswith("_") and n != "__version__"]


def test_every_error_is_exported_and_rooted_in_deltakit_error():
    for name in deltakit.errors.__all__:
        cls = getattr(deltakit.errors, name)
        assert issubclass(cls, deltakit.DeltakitError)
        assert getattr(deltakit, name) is cls


def test_errors_inherit_the_builtin_a_caller_would_catch():
    assert issubclass(deltakit.InputNotFoundError, FileNotFoundError)
    assert issubclass(deltakit.OutputExistsError, FileExistsError)
    assert issubclass(deltakit.BaseMismatchError, ValueError)
    err = deltakit.BaseMismatchError("m", tensor="t", expected="a", actual="b", path="p")
    assert (err.tensor, err.expected, err.actual, str(err.path)) == ("t", "a", "b", "p")


def test_library_never_imports_the_cli_or_a_web_framework():
    import subprocess
    import sys

    code = "import sys, deltakit; print(sorted(m for m in sys.modules if m in ('fastapi', 'click', 'deltakit.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
