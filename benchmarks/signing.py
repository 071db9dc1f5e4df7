"""Benchmark what signed releases cost: ``deltakit make`` with and without ``--sign`` (which also hashes the
model apply will write, for ``model.sig``), ``deltakit apply`` with and without ``--trust`` (which hashes
every file of the package before a tensor is read), and model-signing's own check of the rebuilt folder.

Each command runs as its own process through the real CLI, after ``sync`` and a read of its inputs (warm
cache); the two variants of a step alternate, round by round, and the best round of each is kept.

Usage::

    .venv/bin/python benchmarks/signing.py             # the 1.9 GB LLaMA-shaped pair; writes JSON, BENCHMARKS.md
    .venv/bin/python benchmarks/signing.py --layers 4 --hidden 1024 --intermediate 2752 --vocab 16000 --no-record
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from common import (
    LLAMA_1_9GB,
    ROOT,
    add_shape_arguments,
    machine,
    record,
    run_cli,
    run_process,
    settle,
    shape_from,
    write_pair_and_delta,
)

SECTION_BEGIN = "<!-- signing:begin -->"
SECTION_END = "<!-- signing:end -->"


def _keys(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "publisher.pem", folder / "publisher.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def measure(work: Path, args: argparse.Namespace) -> dict[str, object]:
    pair = write_pair_and_delta(work, shape_from(args))
    private, public = _keys(work / "keys")
    logs = work / "logs"
    logs.mkdir()
    best: dict[str, float] = {}

    def timed(name: str, command: Sequence[str | Path], warm: Sequence[Path], out: Path | None = None) -> None:
        if out is not None and out.exists():
            shutil.rmtree(out)
        settle(warm)
        wall, _ = run_cli([str(c) for c in command], logs / f"{name}.log")
        best[name] = min(best.get(name, float("inf")), wall)

    inputs = _files(pair.base) + _files(pair.target)
    for _ in range(args.repeat):
        base_make = ["make", "--base", pair.base, "--target", pair.target, "-q"]
        timed("make", [*base_make, "--out", work / "plain"], inputs, work / "plain")
        timed("make_signed", [*base_make, "--out", work / "signed", "--sign", private], inputs, work / "signed")
    for _ in range(args.repeat):
        warm = _files(pair.base) + _files(work / "signed") + _files(work / "plain")
        out = ["--out", work / "out", "-q"]
        timed("apply", ["apply", "--base", pair.base, "--delta", work / "plain", *out], warm, work / "out")
        signed = ["apply", "--base", pair.base, "--delta", work / "signed", *out]
        timed("apply_signed", signed, warm, work / "out")
        timed("apply_trusted", [*signed, "--trust", public], warm, work / "out")
    verify = [sys.executable, "-m", "model_signing", "verify", "key", str(work / "out"),
              "--signature", str(work / "out" / "model.sig"), "--public_key", str(public)]  # fmt: skip
    for _ in range(args.repeat):
        settle(_files(work / "out"))
        wall, _ = run_process(verify, logs / "model_signing_verify.log")
        best["model_signing_verify"] = min(best.get("model_signing_verify", float("inf")), wall)
    for _ in range(args.repeat):  # the fixed part of the cost: loading model-signing (and Sigstore's client)
        for name, code in (("python", "pass"), ("python_import_model_signing", "import model_signing")):
            wall, _ = run_process([sys.executable, "-c", code], logs / f"{name}.log")
            best[name] = min(best.get(name, float("inf")), wall)
    return {
        "machine": machine(),
        "shape": vars(shape_from(args)),
        "target_bytes": pair.target_bytes,
        "package_bytes": sum(p.stat().st_size for p in _files(work / "signed")),
        "repeat": args.repeat,
        "seconds": best,
        "ratios": {
            "make_signed_over_make": best["make_signed"] / best["make"],
            "apply_signed_over_apply": best["apply_signed"] / best["apply"],
            "apply_trusted_over_apply": best["apply_trusted"] / best["apply"],
            "model_signing_verify_over_apply": best["model_signing_verify"] / best["apply"],
        },
        "import_model_signing_s": best["python_import_model_signing"] - best["python"],
    }


def markdown(result: dict[str, object]) -> str:
    s: dict[str, float] = result["seconds"]  # type: ignore[assignment]
    r: dict[str, float] = result["ratios"]  # type: ignore[assignment]
    gb = int(result["target_bytes"]) / 1e9  # type: ignore[call-overload]
    m: dict[str, object] = result["machine"]  # type: ignore[assignment]
    rows = [
        ("make", s["make"], ""),
        ("make --sign (package + model.sig: the target hashed in output layout)", s["make_signed"],
         f"{r['make_signed_over_make']:.2f}x make"),
        ("apply (an unsigned package)", s["apply"], ""),
        ("apply (a signed package: its signature checked, signer shown)", s["apply_signed"],
         f"{r['apply_signed_over_apply']:.2f}x apply"),
        ("apply --trust (every package file hashed before a tensor is read)", s["apply_trusted"],
         f"{r['apply_trusted_over_apply']:.2f}x apply"),
        ("model_signing verify key (the rebuilt folder, model-signing alone)", s["model_signing_verify"],
         f"{r['model_signing_verify_over_apply']:.2f}x apply"),
    ]  # fmt: skip
    fixed = float(result["import_model_signing_s"])  # type: ignore[arg-type]
    table = "\n".join(f"| {name} | {sec:.2f} | {ratio} |" for name, sec, ratio in rows)
    return f"""{SECTION_BEGIN}
## Signed releases (make --sign, apply --trust)

A {gb:.2f} GB LLaMA-shaped fp16 target, format 2, best of {result["repeat"]} rounds, warm cache; {m["cpus"]} CPUs
({m["cpu_model"]}), deltakit {m["deltakit_source"]}.

| step | seconds | ratio |
|---|---:|---:|
{table}

Of which fixed, whatever the model's size: loading model-signing (and Sigstore's client), {fixed:.2f} s.
{SECTION_END}
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=ROOT / "benchmarks" / "work" / "signing", help="scratch (must be empty)"
    )
    p.add_argument("--keep", action="store_true", help="keep the models, packages and output in --work")
    p.add_argument("--repeat", type=int, default=3)
    add_shape_arguments(p, LLAMA_1_9GB)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "signing.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--no-record", action="store_true", help="print only; write neither BENCHMARKS.md nor JSON")
    args = p.parse_args(argv)
    if args.work.exists() and any(args.work.iterdir()):
        p.error(f"{args.work} is not empty")
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        result = measure(args.work, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if not args.no_record:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        record(args.markdown, markdown(result), SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
