"""What a user installs: the wheel's contents, the Makefile's torch source, the Docker build context."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: setuptools leaves build/ and egg-info behind in what it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("deltakit", "service"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, source],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=out,
    )
    (built,) = out.glob("*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_deltakit_names(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"deltakit", "deltakit_service"}


def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    names = set(wheel.namelist())
    for package, installed in (("deltakit", "deltakit"), ("service", "deltakit_service")):
        for source in (ROOT / package).rglob("*.py"):
            rel = source.relative_to(ROOT / package).as_posix()
            assert f"{installed}/{rel}" in names, f"{package}/{rel} is missing from the wheel"
    assert "deltakit/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def _make_dry_run(*variables: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH", "MAKEFLAGS", "MFLAGS"))}
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "VENV=/nonexistent/deltakit-venv", *variables, "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return next(line for line in result.stdout.splitlines() if "install_torch.py" in line)


def test_make_lets_install_torch_choose_the_build_unless_told_otherwise():
    """By default tools/install_torch.py chooses (a CPU build first: see test_install_torch.py); CI's
    pin and an explicit index go through as given."""
    assert '--requirement "torch>=2.1" --index "auto"' in _make_dry_run()
    pinned = _make_dry_run("TORCH=torch==2.13.0", "TORCH_INDEX=")
    assert '--requirement "torch==2.13.0" --index ""' in pinned
    assert '--index "https://download.pytorch.org/whl/cu128"' in _make_dry_run(
        "TORCH_INDEX=https://download.pytorch.org/whl/cu128"
    )


def test_the_docker_context_carries_the_sources_and_no_environment():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"], "everything is excluded unless named"
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    assert copied <= kept, f"the Dockerfile copies {copied - kept}, which the context leaves out"
    assert ".venv" not in kept


def test_the_distribution_has_a_name_of_its_own_on_pypi(wheel):
    """ "deltakit" on PyPI is a quantum error-correction toolkit: this one installs as deltakit-llm."""
    from deltakit import DISTRIBUTION

    (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    fields = dict(line.split(": ", 1) for line in wheel.read(metadata).decode().splitlines() if ": " in line)
    assert fields["Name"] == DISTRIBUTION == "deltakit-llm"
    (entry_points,) = (n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "deltakit = deltakit.cli:entry_point" in wheel.read(entry_points).decode()
    readme = (ROOT / "README.md").read_text()
    assert "pip install deltakit-llm" in readme and "pip install deltakit\n" not in readme
