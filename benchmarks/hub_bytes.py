"""Bytes a publish sends to the Hub, through Xet (the default) and through LFS, side by side in one run.

The Hub is tests/hubserver.py (the test Hub, which speaks Xet to the unmodified hf_xet client and counts
the xorb, shard and LFS bytes it receives). For a LLaMA-shaped fp16 pair, a format 2 delta is published:

1. first publish;
2. the same package again (what resuming sends once everything arrived);
3. after an interruption: the first publish of a package fails once the first upload has arrived, then
   runs again;
4. a new version of the fine-tune in which one tensor changed, made and published over the first.

Writes benchmarks/results/hub_bytes.json and its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from common import ROOT, machine, record
from safetensors.torch import load_file, save_file

from deltakit import make_delta
from deltakit.examples import LlamaShape, write_llama_pair
from deltakit.hub import CardMetadata, publish_delta

sys.path.insert(0, str(ROOT / "tests"))
from hubserver import FakeHub, configure_client  # the test Hub lives with the tests

CARD = CardMetadata(base_model="huggyllama/llama-7b", license="apache-2.0")
SHAPE = LlamaShape(vocab=8000, hidden=512, layers=8, intermediate=1376, heads=8)
CHANGED = "model.layers.3.mlp.down_proj.weight"
SHARD = 5 << 20


def _one_tensor_changed(finetune: Path, out: Path) -> None:
    """The fine-tune with one more training step on one tensor: the rest byte for byte the same."""
    shutil.copytree(finetune, out)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        if CHANGED in tensors:
            generator = torch.Generator().manual_seed(1)
            t = tensors[CHANGED]
            tensors[CHANGED] = (t.float() + 1e-4 * torch.randn(t.shape, generator=generator)).to(t.dtype)
            save_file(tensors, shard, metadata={"format": "pt"})


def _sent(hub: FakeHub) -> int:
    return hub.xet.bytes_received + hub.lfs_bytes_received


def _scenarios(work: Path, delta: Path, delta2: Path, *, xet: bool) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with pytest.MonkeyPatch.context() as patch, FakeHub(work / f"hub-{xet}", token="hf_test") as hub:
        configure_client(patch, hub.endpoint, work / f"hf-{xet}", token="hf_test", xet=xet)

        def publish(name: str, package: Path) -> None:
            before, start = _sent(hub), time.perf_counter()
            report = publish_delta(package, "org/panda", metadata=CARD)
            results[name] = {
                "bytes_sent": _sent(hub) - before,
                "seconds": round(time.perf_counter() - start, 2),
                "files_uploaded": len(report.uploaded),
                "commit": bool(report.commit),
            }

        hub.fail_uploads_after(1)
        before = _sent(hub)
        try:
            publish_delta(delta, "org/panda", metadata=CARD)
        except Exception as e:  # the simulated interruption
            results["interrupted"] = {"bytes_sent": _sent(hub) - before, "error": type(e).__name__}
        hub.fail_uploads_after(None)
        publish("resumed after the interruption", delta)
        publish("republished unchanged", delta)
        publish("new version, one tensor changed", delta2)
    with pytest.MonkeyPatch.context() as patch, FakeHub(work / f"hub-first-{xet}", token="hf_test") as hub:
        configure_client(patch, hub.endpoint, work / f"hf-first-{xet}", token="hf_test", xet=xet)
        before = _sent(hub)
        publish_delta(delta, "org/panda", metadata=CARD)
        results = {"first publish": {"bytes_sent": _sent(hub) - before}, **results}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "hub_bytes")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base, finetune = write_llama_pair(args.work / "pair", shape=SHAPE, noise=1.6e-5)
    _one_tensor_changed(finetune, args.work / "finetune2")
    delta, delta2 = args.work / "delta", args.work / "delta2"
    made = make_delta(base, finetune, delta, shard_size=SHARD)  # several payload files, as a 7B has
    make_delta(base, args.work / "finetune2", delta2, shard_size=SHARD)
    payload = made.payload_bytes
    runs = {
        "xet": _scenarios(args.work, delta, delta2, xet=True),
        "lfs": _scenarios(args.work, delta, delta2, xet=False),
    }
    out = {"machine": machine(), "target_bytes": made.target_bytes, "payload_bytes": payload, "runs": runs}
    (ROOT / "benchmarks" / "results" / "hub_bytes.json").write_text(json.dumps(out, indent=2) + "\n")

    rows = []
    for name in runs["xet"]:
        cells = []
        for transport in ("xet", "lfs"):
            sent = runs[transport].get(name, {}).get("bytes_sent")
            cells.append("-" if sent is None else f"{sent / 1e6:.2f} MB ({sent / payload:.1%})")
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    m = out["machine"]
    section = f"""<!-- hub_bytes:begin -->
## Hub: bytes a publish sends, Xet and LFS

`benchmarks/hub_bytes.py`, one run, against the test Hub (tests/hubserver.py), on loopback, with the
unmodified clients: hf_xet {version("hf_xet")}, huggingface_hub {version("huggingface_hub")}.
A LLaMA-shaped fp16 pair ({made.target_bytes / 1e6:.0f} MB of tensors, fine-tune noise 1.6e-5); a format 2
delta whose payload is {payload / 1e6:.2f} MB. Bytes are what the Hub received: xorbs and shards for Xet, LFS
objects for LFS (small text files, sent inline in the commit, are not counted); percentages are of the payload.
Source {m["deltakit_source"]}.

| publish | Xet | LFS |
|---|---:|---:|
{chr(10).join(rows)}

"interrupted": the first upload arrived (one LFS object; for Xet, the first xorb), the next failed; "resumed"
is the same command run again. The payload is split into {SHARD >> 20} MiB files, as a 7B's is into several.
Through LFS a resumed publish sends only the objects that did not arrive. Through Xet the whole payload went
into one xorb, which arrived, but the shard that registers it did not; hf_xet keeps no record of a xorb whose
shard failed, so the resumed publish sent it again (the Hub answers that it already has it). A changed tensor
costs Xet about half what it costs LFS here: only the chunks around it are new, where LFS sends the whole
payload file that holds it.
"new version": `{CHANGED}` trained one more step, the delta made again and published over the first.
<!-- hub_bytes:end -->
"""
    record(ROOT / "BENCHMARKS.md", section, "<!-- hub_bytes:begin -->", "<!-- hub_bytes:end -->")
    print(section)


if __name__ == "__main__":
    main()
