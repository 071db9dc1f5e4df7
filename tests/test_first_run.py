"""What a first-time user meets: a container without a writable home, typos, the help they read."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import finetune_of, llama_like, write_checkpoint

NOBODY = 65534


def _as_nobody(command: list[str], env: dict[str, str], scratch: Path) -> list[str]:
    """``command`` run as uid/gid 65534 (as ``docker run --user``), in a mount namespace of its own
    where a folder on the interpreter's path that others may not enter (``/root`` when Python lives
    under ``/root/.pyenv``) is replaced by an empty one holding only that path: nothing else of the
    host changes."""
    steps = []
    prefix = Path(os.path.realpath(sys.base_prefix))
    for folder in [*reversed(prefix.parents), prefix]:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            inner = prefix.relative_to(folder).parts[0]
            hold = tempfile.mkdtemp(prefix="hold-", dir=scratch)
            steps += [
                f"mount --bind {shlex.quote(str(folder / inner))} {hold}",
                f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(folder))}",
                f"mkdir {shlex.quote(str(folder / inner))}",
                f"mount --bind {hold} {shlex.quote(str(folder / inner))}",
            ]
            break
    environment = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    run = f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups env -i {environment} {shlex.join(command)}"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "; ".join([*steps, run])]


@pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="switching users needs root, unshare and setpriv",
)
def test_make_and_apply_as_a_user_without_a_writable_home():
    """``docker run --user "$(id -u)"`` with HOME=/: numba may write neither beside deltakit nor under
    the home, and make and apply must still work (they raised "cannot cache function ... no locator")."""
    work = Path(tempfile.mkdtemp(prefix="deltakit-nohome-"))
    try:
        base = llama_like(torch.float16)
        write_checkpoint(work / "base", base)
        write_checkpoint(work / "target", finetune_of(base))
        for path in [work, *work.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/", "TMPDIR": str(work)}
        exe = str(Path(sys.executable).parent / "deltakit")

        def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
            command = _as_nobody([exe, *map(str, args), "--quiet"], env, work)
            return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300, check=False)

        made = run("make", "--base", work / "base", "--target", work / "target", "--out", work / "delta")
        assert made.returncode == 0, made.stderr
        applied = run("apply", "--base", work / "base", "--delta", work / "delta", "--out", work / "out")
        assert applied.returncode == 0, applied.stderr
        assert (work / "out" / "model.safetensors").is_file()
    finally:
        shutil.rmtree(work, ignore_errors=True)
