"""llama.cpp itself, for the slow GGUF tests: built from the source distribution of llama-cpp-python on PyPI.

That source distribution carries llama.cpp's full source: ``convert_hf_to_gguf.py`` (the converter every
GGUF on the Hub comes from) and the C++ library (its loader, its quantizers). :func:`build` downloads it,
builds the wheel once (a few minutes on 2 cores) into a cache that later runs reuse, and unpacks it; the
helpers below run each part in a subprocess, with the test's Python.

The cache lives in ``$DELTAKIT_TEST_CACHE`` (default ``~/.cache/deltakit-tests``); delete it to rebuild.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp these tests hold us to
# Built for AVX2, not -march=native: on a VM whose CPU reports AMX, a native build takes llama.cpp's
# AMX path, which crashed (SIGSEGV in decode) where the hypervisor does not grant AMX's tile state;
# and a cache built on one machine then runs on another.
FLAVOUR = "avx2"
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # llama.cpp's source tree (vendor/llama.cpp of the sdist)
    site: Path  # the built wheel, unpacked: the llama_cpp package and its shared libraries

    def env(self) -> dict[str, str]:
        """llama_cpp importable; the converter on its own gguf-py (which it takes unless NO_LOCAL_GGUF is set)."""
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
        return env | {"PYTHONPATH": str(self.site)}


def cache_root() -> Path:
    return Path(os.environ.get("DELTAKIT_TEST_CACHE") or Path.home() / ".cache" / "deltakit-tests")


def build() -> LlamaCpp:
    """llama.cpp from llama-cpp-python's sdist, built once and cached (a lock keeps parallel workers
    from building it twice)."""
    root = cache_root() / f"llama-cpp-python-{VERSION}-{FLAVOUR}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / ".built"
        if not done.exists():
            _build(root)
            done.touch()
    return LlamaCpp(source=root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp", site=root / "site")


def _build(root: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        spec = f"llama-cpp-python=={VERSION}"
        subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(root)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    wheels = root / "wheel"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(sdist)], check=True, env=env)
    (wheel,) = wheels.glob("llama_cpp_python-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root / "site")
    # llama_cpp's own Python dependencies, beside it (jinja2, numpy and typing-extensions are the test's)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), "diskcache>=5.6"], check=True)


def convert_hf(llama: LlamaCpp, model: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's own converter, as its README runs it."""
    script = llama.source / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(model), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True, env=llama.env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def quantize(llama: LlamaCpp, source: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's C++ quantizer (``llama_model_quantize``, what ``llama-quantize`` runs)."""
    code = f"""
        import llama_cpp
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{ftype.upper()}
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize({str(source).encode()!r}, {str(out).encode()!r}, params)
        assert rc == 0, rc
    """
    _run(llama, code)
    return out


def logits(llama: LlamaCpp, model: Path, tokens: list[int]) -> list[list[float]]:
    """llama.cpp's logits at every position of ``tokens`` (one batch, CPU)."""
    code = f"""
        import json, sys
        import llama_cpp
        llm = llama_cpp.Llama(model_path={str(model)!r}, n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                              n_threads=2, seed=0)
        llm.eval({tokens!r})
        sys.stdout.write(json.dumps([list(map(float, row)) for row in llm.scores[: {len(tokens)}]]))
    """
    return json.loads(_run(llama, code))


def transformers_logits(model: Path, tokens: list[int]) -> np.ndarray:
    """transformers' logits (fp32, whatever class config.json names) at every position of ``tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


@dataclass(frozen=True)
class LogitsCheck:
    """llama.cpp's logits for a GGUF file against transformers' for the folder it came from."""

    got: np.ndarray  # llama.cpp's, (tokens, vocab)
    expected: np.ndarray  # transformers', the same shape

    @property
    def nmse(self) -> float:
        """Normalized mean squared error: sum((got - expected)^2) / sum(expected^2)."""
        return float(((self.got - self.expected) ** 2).sum() / (self.expected**2).sum())

    @property
    def same_top1(self) -> bool:
        return bool((self.got.argmax(-1) == self.expected.argmax(-1)).all())


def check_logits(llama: LlamaCpp, gguf_file: Path, model: Path, tokens: list[int]) -> LogitsCheck:
    """Run ``gguf_file`` in llama.cpp and ``model`` in transformers on the same ``tokens``."""
    got = np.array(logits(llama, gguf_file, tokens))
    expected = transformers_logits(model, tokens)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return LogitsCheck(got=got, expected=expected)


def _run(llama: LlamaCpp, code: str) -> str:
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=llama.env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def fields_and_tensors(path: Path) -> tuple[dict, dict]:
    """A GGUF file's metadata (key: its types and value, in file order) and tensors (name: type, shape, bytes)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {
        k: ([t.name for t in f.types], f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")
    }
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), bytes(t.data)) for t in reader.tensors}
    return fields, tensors


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    """Every metadata key, value and type, and every tensor's type, shape and bytes, in the same order."""
    our_fields, our_tensors = fields_and_tensors(ours)
    their_fields, their_tensors = fields_and_tensors(theirs)
    assert list(our_fields) == list(their_fields)  # the same keys, in the same order
    for key, value in their_fields.items():
        assert our_fields[key] == value, key
    assert list(our_tensors) == list(their_tensors)
    for name, (qtype, shape, data) in their_tensors.items():
        assert our_tensors[name][:2] == (qtype, shape), name
        assert our_tensors[name][2] == data, name
