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
from test_cli import deltakit_cli

import deltakit

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


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A base and a fine-tune of it that adds vocabulary rows, as Panda does to LLaMA."""
    tmp = tmp_path_factory.mktemp("grown")
    base = llama_like(torch.float16)
    return tmp, write_checkpoint(tmp / "llama", base), write_checkpoint(tmp / "panda", finetune_of(base, extra_vocab=6))


def test_make_with_base_and_target_swapped_is_refused(grown):
    """Swapped, make stored the base's embedding and lm_head raw, publishing licensed weights, and
    called them copies of fine-tuned weights."""
    tmp, base, target = grown
    swapped = deltakit_cli("make", "--base", target, "--target", base, "--out", tmp / "swapped", "-q")
    assert swapped.returncode == 1, swapped.stdout
    assert "look swapped" in swapped.stderr and "64 rows in the target" in swapped.stderr
    assert "--allow-raw" in swapped.stderr and len(swapped.stderr.strip().splitlines()) == 1
    assert not (tmp / "swapped").exists()
    allowed = deltakit_cli("make", "--base", target, "--target", base, "--out", tmp / "swapped", "-q", "--allow-raw")
    assert allowed.returncode == 0, allowed.stderr
    assert "raw" in allowed.stdout


def test_make_against_an_unrelated_base_is_refused(grown):
    """A base that shares no tensor shapes with the target: every tensor would be stored raw."""
    tmp, _, target = grown
    other = write_checkpoint(tmp / "other", llama_like(torch.float16, hidden=8))
    made = deltakit_cli("make", "--base", other, "--target", target, "--out", tmp / "unrelated", "-q")
    assert made.returncode == 1
    assert "no counterpart" in made.stderr and "stored raw" not in made.stdout
    assert not (tmp / "unrelated").exists()
    with pytest.raises(deltakit.RawWeightsError) as caught:
        deltakit.make_delta(other, target, tmp / "unrelated")
    assert caught.value.tensor and int(caught.value.actual.rstrip("%")) > 50
    assert not (tmp / "unrelated").exists()


def test_a_mistyped_command_gets_the_nearest_suggested():
    typo = deltakit_cli("aply", "--base", "x")
    assert typo.returncode == 2 and "did you mean 'apply'?" in typo.stderr
    nested = deltakit_cli("registry", "lst")
    assert nested.returncode == 2 and "did you mean 'list'?" in nested.stderr
    far = deltakit_cli("zzzz")
    assert far.returncode == 2 and "did you mean" not in far.stderr


def test_verify_says_what_it_checked(grown):
    """It said "5 tensors and files match" of a delta of 13 tensors: the count was of files."""
    tmp, base, target = grown
    made = deltakit_cli("make", "--base", base, "--target", target, "--out", tmp / "told", "-q")
    assert made.returncode == 0, made.stderr
    alone = deltakit_cli("verify", tmp / "told", "-q")
    assert alone.returncode == 0, alone.stderr
    assert "1 payload file(s) by SHA-256" in alone.stdout and "headers for all 13 tensors" in alone.stdout
    with_base = deltakit_cli("verify", tmp / "told", "--base", base, "-q")
    assert "13 base tensor(s) by BLAKE3" in with_base.stdout


def test_the_readme_token_recipe_leaves_the_token_readable_by_its_owner_only(tmp_path):
    """The recipe wrote the token with the umask's mode, 644 as a rule: readable by every user."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (recipe,) = [line.split("#")[0] for line in readme.splitlines() if "token create --scope write > token" in line]
    env = {
        **os.environ,
        "DELTAKIT_HOME": str(tmp_path / "home"),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    subprocess.run(["bash", "-c", f"umask 022; {recipe}"], cwd=tmp_path, env=env, check=True, timeout=120)
    token = tmp_path / "token"
    assert token.read_text().strip() and stat.S_IMODE(token.stat().st_mode) == 0o600
