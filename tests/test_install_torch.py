"""The Makefile's choice of PyTorch build (tools/install_torch.py): a CPU build already at hand first,
an unreachable index said at once, never minutes of silent retries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "install_torch.py"


def _fake_torch_wheel(folder: Path, version: str, *, cuda: bool) -> Path:
    """A minimal valid wheel named torch: enough for pip to read its metadata and choose it."""
    name = f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version.split('+')[0]}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
    if cuda:
        metadata += "Requires-Dist: nvidia-cublas-cu12==12.8.4.1\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr("torch/__init__.py", "")
        z.writestr(f"{info}/METADATA", metadata)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return folder / name


def _choose(tmp_path: Path, requirement: str, index: str = "auto", **env: str) -> tuple[list[str], str, float]:
    environment = {**os.environ, "PIP_NO_INPUT": "1", **env}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--requirement", requirement, "--index", index, "--dry-run"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr, time.monotonic() - start


@pytest.fixture
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu"  # closed once the socket is


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU/CUDA choice is Linux's")
def test_a_cpu_wheel_at_hand_is_taken_by_its_file(tmp_path, closed_port):
    wheel = _fake_torch_wheel(tmp_path / "wheels", "2.0.0+cpu", cuda=False)
    command, said, _ = _choose(
        tmp_path, "torch==2.0.0", PIP_FIND_LINKS=str(tmp_path / "wheels"), DELTAKIT_TORCH_CPU_INDEX=closed_port
    )
    assert command == ["-m", "pip", "install", str(wheel)]
    assert "CPU build already here" in said


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU/CUDA choice is Linux's")
def test_an_unreachable_cpu_index_is_said_at_once(tmp_path, closed_port):
    """A CUDA build at hand is not taken as the CPU one; the CPU index, unreachable, is said in one line
    within seconds (pip's own retries took 4 minutes, silently)."""
    _fake_torch_wheel(tmp_path / "wheels", "2.0.0", cuda=True)
    command, said, seconds = _choose(
        tmp_path, "torch==2.0.0", PIP_FIND_LINKS=str(tmp_path / "wheels"), DELTAKIT_TORCH_CPU_INDEX=closed_port
    )
    assert command == ["-m", "pip", "install", "torch==2.0.0"]
    assert "did not answer" in said and "CUDA build" in said
    assert seconds < 60


def test_an_explicit_index_is_used_as_given(tmp_path):
    command, said, _ = _choose(tmp_path, "torch==2.13.0", index="")
    assert command == ["-m", "pip", "install", "torch==2.13.0"] and "configured index" in said
    command, _, _ = _choose(tmp_path, "torch==2.13.0", index="https://example.invalid/cu128")
    assert command == ["-m", "pip", "install", "--extra-index-url", "https://example.invalid/cu128", "torch==2.13.0"]
