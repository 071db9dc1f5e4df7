"""``python -m deltakit.cli``: the same command as ``deltakit``.

Kept so the module path that worked before ``cli`` became a package still runs the CLI.
"""

from . import entry_point

if __name__ == "__main__":
    entry_point()
