"""Install PyTorch into the virtual environment, choosing where it comes from and saying so.

deltakit needs only torch's CPU build. On Linux, PyPI's torch wheels bundle CUDA (gigabytes), so by
default (``--index auto``) this takes, in order:

1. a CPU build pip already has without any index (its ``--find-links`` folders, or one installed);
2. PyTorch's CPU index, if it answers within a few seconds;
3. the configured index (PyPI), after saying that on Linux this is the CUDA build.

An explicit ``--index URL`` adds that index; ``--index ''`` uses the configured index alone (CI pins a
local wheel this way). Nothing waits silently: the index check is bounded and pip shows its progress.

Usage: python tools/install_torch.py --requirement 'torch>=2.1' [--index auto|URL|''] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

CPU_INDEX = os.environ.get("DELTAKIT_TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")  # tests move it
PROBE_SECONDS = 5


def _say(text: str) -> None:
    print(f"install_torch: {text}", file=sys.stderr, flush=True)


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def _local_cpu_build(requirement: str) -> str | None:
    """A CPU torch build that pip can take without any index: the wheel's path, or "" when the installed
    torch already satisfies ``requirement``; None when there is none."""
    report = subprocess.run(
        _pip("install", "--dry-run", "--no-index", "--no-deps", "--quiet", "--report", "-", requirement),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if report.returncode != 0:
        return None
    chosen = json.loads(report.stdout or "{}").get("install", [])
    if not chosen:  # already satisfied by what is installed
        return ""
    wheel = chosen[0]
    requires = wheel.get("metadata", {}).get("requires_dist", [])
    url = str(wheel.get("download_info", {}).get("url", ""))
    if any(r.startswith("nvidia-") for r in requires) or not url.startswith("file:"):
        return None  # a CUDA build: not what "CPU first" means
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def _reachable(url: str) -> str | None:
    """None when ``url`` answers within PROBE_SECONDS; else why not, in words."""
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/torch/", method="HEAD"), timeout=PROBE_SECONDS):
            return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return str(getattr(e, "reason", e))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirement", default="torch>=2.1")
    parser.add_argument("--index", default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command instead of running it")
    args = parser.parse_args()
    install = _pip("install", args.requirement)
    if args.index == "auto":
        if platform.system() != "Linux":
            _say(f"{args.requirement} from the configured index (its wheels here are CPU builds)")
        elif (local := _local_cpu_build(args.requirement)) is not None:
            # by its file: with the index beside it, pip would prefer a newer (CUDA) release of the index
            _say(f"{args.requirement}: the CPU build already here, {local or 'installed'}")
            install = _pip("install", local or args.requirement)
        elif (why := _reachable(CPU_INDEX)) is None:
            _say(f"{args.requirement} from PyTorch's CPU index, {CPU_INDEX}")
            install = _pip("install", "--extra-index-url", CPU_INDEX, args.requirement)
        else:
            _say(
                f"PyTorch's CPU index {CPU_INDEX} did not answer in {PROBE_SECONDS} s ({why}); installing "
                f"{args.requirement} from the configured index: on Linux that is the CUDA build, several GB. "
                "For the CPU build, put its wheel where pip finds it (PIP_FIND_LINKS) and run make again."
            )
    elif args.index:
        _say(f"{args.requirement} from {args.index} and the configured index")
        install = _pip("install", "--extra-index-url", args.index, args.requirement)
    else:
        _say(f"{args.requirement} from the configured index")
    if args.dry_run:
        print(json.dumps(install[1:]))
        return 0
    return subprocess.run(install, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
