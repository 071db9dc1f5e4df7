"""The model store's core: imports (whole, delta, base found), byte-identical rebuilds, revisions, the
rebuild cache (one build, LRU budget, tampering), hostile names and failed imports.

Every test runs on both object backends: a local folder and an S3 bucket on a real SeaweedFS server.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import finetune_of, llama_like, tensor_bytes, write_checkpoint
from test_cli import deltakit_cli

from deltakit.errors import DeltakitError, InputNotFoundError, UnsupportedInputError
from deltakit.modelstore import LocalObjects, ModelStore, Objects, Repositories
from deltakit.progress import ProgressBar


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path) -> Objects:
    """A folder, and a real S3 bucket (SeaweedFS, tests/seaweed.py), which offers no file to read in place."""
    return LocalObjects(tmp_path / "objects") if request.param == "local" else request.getfixturevalue("s3_objects")


@pytest.fixture
def store(tmp_path, objects) -> ModelStore:
    s = ModelStore(tmp_path / "home", objects=objects, cache_grace=0)
    yield s
    s.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def originals(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def served(store: ModelStore, repo_id: str, revision: str = "main", **kw) -> dict[str, str]:
    rev = store.revision(repo_id, revision)
    return {f.path: sha256(store.file_path(rev, f.path, **kw)) for f in rev.files}


class Counter:
    """A progress factory that counts the rebuilds it is asked to show, and the bytes they report."""

    def __init__(self) -> None:
        self.rebuilds = 0
        self.rebuilt_bytes = 0
        self._lock = threading.Lock()

    def __call__(self, total: int, description: str) -> ProgressBar:
        counter = self

        class Bar:
            def update(self, n: int) -> None:
                if description.startswith("rebuild"):
                    with counter._lock:
                        counter.rebuilt_bytes += n

            def close(self) -> None:
                pass

        if description.startswith("rebuild"):
            with self._lock:
                self.rebuilds += 1
        return Bar()


CONFIG = {"config.json": '{"model_type": "llama"}\n', "tokenizer_config.json": "{}\n"}


@pytest.fixture
def models(tmp_path):
    """A bf16 base, two fine-tunes of it, and an unrelated model, as folders."""
    base = llama_like(torch.bfloat16, vocab=256, hidden=64)
    return {
        "base": write_checkpoint(tmp_path / "m" / "base", base, files=CONFIG),
        "ft1": write_checkpoint(tmp_path / "m" / "ft1", finetune_of(base, seed=1), files=CONFIG),
        "ft2": write_checkpoint(tmp_path / "m" / "ft2", finetune_of(base, seed=2), files=CONFIG),
        "ft3": write_checkpoint(tmp_path / "m" / "ft3", finetune_of(base, seed=3), files=CONFIG),
        "other": write_checkpoint(
            tmp_path / "m" / "other", llama_like(torch.bfloat16, vocab=256, hidden=64, seed=7), files=CONFIG
        ),
    }


def test_the_store_is_the_protocol_the_faces_read(store):
    assert isinstance(store, Repositories)


def test_a_base_is_stored_whole_and_served_as_imported(store, models):
    report = store.import_model("org/base", models["base"])
    assert (report.storage, report.revision_number, report.base_model) == ("whole", 1, None)
    assert report.stored_bytes == report.full_bytes == sum(p.stat().st_size for p in models["base"].iterdir())
    assert len(report.commit) == 40
    assert served(store, "org/base") == originals(models["base"])
    assert store.orphan_objects() == []


def test_a_finetune_with_its_base_is_stored_as_a_small_delta(store, models):
    store.import_model("org/base", models["base"])
    report = store.import_model("org/ft1", models["ft1"], base="org/base")
    assert report.storage == "delta"
    assert (report.base_model, report.relation, report.base_found) == ("org/base", "finetune", False)
    assert report.stored_bytes < report.full_bytes / 4, (report.stored_bytes, report.full_bytes)
    counter = Counter()
    assert not store.is_cached(store.revision("org/ft1"))
    assert served(store, "org/ft1", progress=counter) == originals(models["ft1"])
    assert (counter.rebuilds, counter.rebuilt_bytes) == (1, report.full_bytes)
    assert store.is_cached(store.revision("org/ft1"))

    summary = {s.repo_id: s for s in store.repositories()}
    assert summary["org/base"].derived == ("org/ft1",)
    ft = summary["org/ft1"].latest
    assert (ft.base_model, ft.base_commit, ft.relation) == ("org/base", summary["org/base"].latest.commit, "finetune")


def test_the_base_is_found_by_its_tensors(store, models):
    store.import_model("org/base", models["base"])
    # same names, dtypes and shapes, other weights: no fine-tune of the base
    assert store.import_model("org/other", models["other"]).storage == "whole"
    report = store.import_model("org/ft1", models["ft1"])
    assert (report.storage, report.base_model, report.base_found) == ("delta", "org/base", True)
    # the same model under another name is found too (every tensor identical)
    assert store.import_model("org/other2", models["other"]).base_model == "org/other"
    assert served(store, "org/ft1") == originals(models["ft1"])


def test_a_model_with_nothing_stored_like_it_is_whole(store, models):
    store.import_model("org/base", models["base"])
    alone = write_checkpoint(models["base"].parent / "alone", llama_like(torch.bfloat16, vocab=32, hidden=8, seed=5))
    report = store.import_model("org/alone", alone)
    assert (report.storage, report.base_model) == ("whole", None)


def _odd_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file the reference writer would never write: keys in another order than the data,
    ``__metadata__`` last, indented JSON, and padding past the usual 8-byte alignment."""
    names = sorted(tensors, reverse=True)  # data in reverse name order
    offsets, position = {}, 0
    for n in names:
        size = len(tensor_bytes(tensors[n]))
        offsets[n] = [position, position + size]
        position += size
    dtypes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
    header = {
        n: {"shape": list(tensors[n].shape), "data_offsets": offsets[n], "dtype": dtypes[tensors[n].dtype]}
        for n in sorted(tensors)
    }
    header["__metadata__"] = {"format": "pt", "note": "hand made"}
    raw = json.dumps(header, indent=1).encode() + b"   \n" + b" " * 37
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for n in names:
            f.write(tensor_bytes(tensors[n]))


def test_every_file_is_rebuilt_byte_identical_sharded_and_odd_headers(store, tmp_path):
    base = llama_like(torch.bfloat16, vocab=128, hidden=32, layers=3)
    tuned = finetune_of(base, seed=4)
    base_dir = write_checkpoint(tmp_path / "base", base, shards=2, files=CONFIG)
    ft_dir = write_checkpoint(tmp_path / "ft", tuned, shards=3, files={**CONFIG, "sub/notes.txt": "kept\n"})
    # replace one shard with a hand-written one holding the same tensors
    index = json.loads((ft_dir / "model.safetensors.index.json").read_text())
    shard = "model-00002-of-00003.safetensors"
    _odd_safetensors(ft_dir / shard, {n: tuned[n] for n, f in index["weight_map"].items() if f == shard})
    (ft_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")

    store.import_model("org/base", base_dir)
    report = store.import_model("org/ft", ft_dir, base="org/base")
    assert report.storage == "delta" and report.note is None
    assert served(store, "org/ft") == originals(ft_dir)
    assert served(store, "org/base") == originals(base_dir)


def test_a_bin_checkpoint_given_a_base_is_stored_whole_and_says_why(store, models, tmp_path):
    store.import_model("org/base", models["base"])
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(finetune_of(llama_like(torch.bfloat16, vocab=256, hidden=64)), folder / "pytorch_model.bin")
    report = store.import_model("org/bin", folder, base="org/base")
    assert report.storage == "whole" and "pytorch_model.bin" in (report.note or "")
    assert served(store, "org/bin") == originals(folder)


def test_importing_a_name_again_makes_a_new_revision_and_keeps_the_old(store, models):
    store.import_model("org/base", models["base"])
    first = store.import_model("org/ft", models["ft1"], base="org/base")
    second = store.import_model("org/ft", models["ft2"], base="org/base")
    assert (first.revision_number, second.revision_number) == (1, 2)
    assert store.revision("org/ft").commit == second.commit
    assert store.revision("org/ft", "1").commit == first.commit
    assert store.revision("org/ft", first.commit).revision_number == 1
    assert served(store, "org/ft", "1") == originals(models["ft1"])
    assert served(store, "org/ft", second.commit) == originals(models["ft2"])
    with pytest.raises(InputNotFoundError) as e:
        store.revision("org/ft", "3")
    assert e.value.argument == "revision"


def test_eight_callers_of_one_cold_revision_cause_one_rebuild(store, models):
    store.import_model("org/base", models["base"])
    store.import_model("org/ft", models["ft1"], base="org/base")
    rev = store.revision("org/ft")
    counter = Counter()
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: store.file_path(rev, "model.safetensors", progress=counter), range(8)))
    assert counter.rebuilds == 1
    assert {sha256(p) for p in paths} == {originals(models["ft1"])["model.safetensors"]}


def test_the_cache_budget_evicts_the_least_recently_used(tmp_path, objects, models):
    if not isinstance(objects, LocalObjects):
        pytest.skip("a remote store's base is cached too, which changes the order; the policy is tested locally")
    store = ModelStore(tmp_path / "home", objects=objects, cache_grace=0)
    store.import_model("org/base", models["base"])
    for name in ("ft1", "ft2", "ft3"):
        store.import_model(f"org/{name}", models[name], base="org/base")
    entry = sum(f.size for f in store.revision("org/ft1").files)
    store.cache.budget = 2 * entry + entry // 2  # room for two
    revs = {n: store.revision(f"org/{n}") for n in ("ft1", "ft2", "ft3")}
    served(store, "org/ft1")
    served(store, "org/ft2")
    served(store, "org/ft1")  # ft2 is now the least recently used
    served(store, "org/ft3")
    cached = {n for n, r in revs.items() if store.cache.is_cached(r.commit)}
    assert cached == {"ft1", "ft3"}
    assert store.cache.total_bytes() <= store.cache.budget
    # an entry held by a reader is never evicted, however old
    with store.hold(revs["ft1"]):
        served(store, "org/ft3")
        served(store, "org/ft2")
        assert store.cache.is_cached(revs["ft1"].commit)
    store.close()


def test_a_tampered_cache_entry_is_not_served(store, models):
    store.import_model("org/base", models["base"])
    store.import_model("org/ft", models["ft1"], base="org/base")
    rev = store.revision("org/ft")
    counter = Counter()
    path = store.file_path(rev, "model.safetensors", progress=counter)
    with open(path, "r+b") as f:  # one byte flipped in place
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    again = store.file_path(rev, "model.safetensors", progress=counter)
    assert sha256(again) == originals(models["ft1"])["model.safetensors"]
    assert counter.rebuilds == 2


def test_a_cache_entry_whose_record_was_lost_is_rebuilt_and_counted(tmp_path, objects, models):
    """A power loss or a damaged disk empties entry.json: the revision is rebuilt, not unservable, and the
    entry's bytes still count against the budget until then."""
    store = ModelStore(tmp_path / "home", objects=objects, cache_grace=0)
    store.import_model("org/base", models["base"])
    store.import_model("org/ft", models["ft1"], base="org/base")
    rev = store.revision("org/ft")
    store.file_path(rev, "model.safetensors")
    store.close()
    (tmp_path / "home" / "cache" / rev.commit / "entry.json").write_text("")
    store = ModelStore(tmp_path / "home", objects=objects, cache_grace=0)  # a fresh process: nothing remembered
    assert rev.commit in [commit for commit, size, _ in store.cache.entries() if size > 0]
    assert not store.is_cached(rev)
    counter = Counter()
    served = store.file_path(rev, "model.safetensors", progress=counter)
    assert sha256(served) == originals(models["ft1"])["model.safetensors"]
    assert counter.rebuilds == 1 and store.is_cached(rev)
    store.close()


@pytest.mark.parametrize("repo_id", ["..", "a/b/c", "org/..", "../x", "name", "org/na me", ""])
def test_hostile_repo_ids_are_refused_by_name(store, models, repo_id):
    with pytest.raises(UnsupportedInputError) as e:
        store.import_model(repo_id, models["base"])
    assert e.value.argument == "repo_id"
    with pytest.raises((UnsupportedInputError, InputNotFoundError)) as e2:
        store.revision(repo_id)
    assert e2.value.argument == "repo_id"
    assert store.repositories() == []


def test_an_unknown_repo_or_file_is_not_found_by_name(store, models):
    with pytest.raises(InputNotFoundError) as e:
        store.revision("org/missing")
    assert e.value.argument == "repo_id"
    store.import_model("org/base", models["base"])
    with pytest.raises(InputNotFoundError) as e:
        store.file_path(store.revision("org/base"), "../etc/passwd")
    assert e.value.argument == "path"
    with pytest.raises(InputNotFoundError) as e:
        store.import_model("org/ft", models["ft1"], base="org/nope")
    assert e.value.argument == "base"


def test_a_failed_import_leaves_no_revision_and_no_objects(store, models, tmp_path):
    store.import_model("org/base", models["base"])
    keys = set(store.objects.keys())
    wrong = write_checkpoint(tmp_path / "wide", finetune_of(llama_like(torch.bfloat16, vocab=256, hidden=96)))
    with pytest.raises(DeltakitError):
        store.import_model("org/wide", wrong, base="org/base")
    with pytest.raises(InputNotFoundError):
        store.revision("org/wide")
    assert set(store.objects.keys()) == keys
    assert store.orphan_objects() == []


def test_a_catalog_failure_after_the_objects_removes_them(store, models, monkeypatch):
    store.import_model("org/base", models["base"])
    keys = set(store.objects.keys())

    def fail(new):
        raise OSError("disk full")

    monkeypatch.setattr(store.catalog, "add_revision", fail)
    with pytest.raises(OSError):
        store.import_model("org/ft", models["ft1"], base="org/base")
    assert set(store.objects.keys()) == keys
    monkeypatch.undo()
    assert [s.repo_id for s in store.repositories()] == ["org/base"]


def test_a_link_out_of_the_folder_is_refused(store, models, tmp_path):
    folder = write_checkpoint(tmp_path / "linked", llama_like(torch.bfloat16))
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    (folder / "notes.txt").symlink_to(secret)
    with pytest.raises(UnsupportedInputError) as e:
        store.import_model("org/linked", folder)
    assert e.value.argument == "folder"


def test_cli_imports_and_lists(tmp_path, models, monkeypatch):
    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "clihome"))
    done = deltakit_cli("registry", "import", "org/base", models["base"], "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["storage"] == "whole"
    done = deltakit_cli("registry", "import", "org/ft", models["ft1"], "--base", "org/base@1", "-q")
    assert done.returncode == 0, done.stderr
    assert "delta" in done.stdout and "org/base" in done.stdout
    listed = deltakit_cli("registry", "list")
    assert "org/ft" in listed.stdout and "org/base" in listed.stdout
    as_json = json.loads(deltakit_cli("registry", "list", "--json").stdout)
    repos = {e["name"]: e for e in as_json if e["kind"] == "repo"}
    assert repos["org/ft"]["base_model"] == "org/base" and repos["org/ft"]["storage"] == "delta"
    bad = deltakit_cli("registry", "import", "a/b/c", models["base"])
    assert bad.returncode == 1 and "a/b/c" in bad.stderr


def test_a_finetune_of_a_stored_finetune_is_a_delta_of_a_delta(store, models, tmp_path):
    store.import_model("org/base", models["base"])
    store.import_model("org/ft1", models["ft1"], base="org/base")
    from conftest import load_checkpoint

    again = write_checkpoint(tmp_path / "ft1b", finetune_of(load_checkpoint(models["ft1"]), seed=9), files=CONFIG)
    report = store.import_model("org/ft1b", again, base="org/ft1")
    assert (report.storage, report.base_model) == ("delta", "org/ft1")
    assert served(store, "org/ft1b") == originals(again)
    assert {s.repo_id: s.derived for s in store.repositories()}["org/ft1"] == ("org/ft1b",)


def test_a_damaged_whole_object_is_refused(tmp_path, models):
    store = ModelStore(tmp_path / "home", objects=LocalObjects(tmp_path / "objects"))
    store.import_model("org/base", models["base"])
    rev = store.revision("org/base")
    path = store.file_path(rev, "config.json")
    assert sha256(path) == originals(models["base"])["config.json"]
    path.write_text('{"model_type": "gpt2"}\n')
    from deltakit.errors import IntegrityError

    with pytest.raises(IntegrityError):
        store.file_path(rev, "config.json")
    store.close()


_BUILD_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from deltakit.modelstore import ModelStore
store = ModelStore(Path(sys.argv[1]))
print(store.ensure_cached(store.revision("org/ft")))
"""


def test_processes_sharing_a_home_rebuild_a_revision_once(tmp_path, models):
    import os
    import subprocess
    import sys

    store = ModelStore(tmp_path / "home")
    store.import_model("org/base", models["base"])
    store.import_model("org/ft", models["ft1"], base="org/base")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_IN_ANOTHER_PROCESS, str(tmp_path / "home")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), results
    assert sorted(out.strip() for out, _ in results) == ["False", "False", "True"]
    assert served(store, "org/ft") == originals(models["ft1"])
    store.close()


def test_an_import_whose_recipe_does_not_rebuild_the_files_is_refused(store, models, monkeypatch):
    from deltakit.errors import IntegrityError
    from deltakit.modelstore import store as store_module

    exact = store_module._exact_layout

    def reversed_order(folder, files):
        layout, why = exact(folder, files)
        wrong = {rel: (size, order[::-1]) for rel, (size, order) in layout.safetensors.items()}
        return store_module._Layout(layout.ckpt, wrong, layout.index), why

    store.import_model("org/base", models["base"])
    keys = set(store.objects.keys())
    monkeypatch.setattr(store_module, "_exact_layout", reversed_order)
    with pytest.raises(IntegrityError) as e:
        store.import_model("org/ft", models["ft1"], base="org/base")
    assert "model.safetensors" in str(e.value)
    assert set(store.objects.keys()) == keys
    assert [s.repo_id for s in store.repositories()] == ["org/base"]


def test_concurrent_imports_of_one_name_get_distinct_revisions(store, models):
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda name: store.import_model("org/m", models[name]), ["base", "other"]))
    assert sorted(r.revision_number for r in reports) == [1, 2]
    assert served(store, "org/m", "1") in (originals(models["base"]), originals(models["other"]))
    assert served(store, "org/m", "1") != served(store, "org/m", "2")


def test_a_gguf_of_a_stored_base_is_stored_whole_as_its_quantization(store, models, tmp_path):
    store.import_model("org/base", models["base"])
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    report = store.import_model("org/base-gguf", gguf, base="org/base")
    assert (report.storage, report.base_model, report.relation) == ("whole", "org/base", "quantized")
    summary = {s.repo_id: s for s in store.repositories()}
    assert "org/base-gguf" in summary["org/base"].derived
    # a relation given is kept
    again = store.import_model("org/merged", models["ft2"], base="org/base", relation="merge")
    assert again.relation == "merge"
