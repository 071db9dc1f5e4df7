"""apply fanned out over a real Ray cluster on this machine: a head and a worker node, each its own raylet
with its own CPUs and worker processes (ray.cluster_utils.Cluster), no mocks.

A worker is killed with SIGKILL mid-task: Ray runs the task again and the output still verifies; with no
retries allowed, the apply fails cleanly and nothing is left under the output's name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import finetune_of, llama_like, load_checkpoint, register_for_service, write_checkpoint

from deltakit import BaseMismatchError, ClusterError, apply_delta, make_delta
from deltakit.cluster import ClusterOptions, _shard_task, apply_delta_on_ray

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
cluster_utils = pytest.importorskip("ray.cluster_utils")

SHARD = 1_000_000  # bytes per output shard: the model below makes several


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU) and a worker node (1 CPU) on this machine; this process is the driver."""
    nodes = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    base = llama_like(torch.float16, vocab=2048, hidden=256, layers=4)
    base_dir = write_checkpoint(tmp / "llama", base)
    target_dir = write_checkpoint(tmp / "panda", finetune_of(base, extra_vocab=16), files={"config.json": "{}"})
    make_delta(base_dir, target_dir, tmp / "panda-delta")
    apply_delta(base_dir, tmp / "panda-delta", tmp / "local", shard_size=SHARD)
    return tmp, base_dir, tmp / "panda-delta", tmp / "local"


def same_folder(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_a_fanned_out_apply_is_byte_identical_to_the_local_one(cluster, pair, tmp_path):
    _, base, delta, local = pair
    report = apply_delta_on_ray(base, delta, tmp_path / "out", shard_size=SHARD)
    assert len(report.shards) >= 4 and len(list(local.glob("model-*.safetensors"))) == len(report.shards)
    assert same_folder(tmp_path / "out", local)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2


def test_a_wrong_base_is_refused_before_the_fan_out(cluster, pair, tmp_path, monkeypatch):
    import deltakit.cluster

    tmp, _, delta, _ = pair
    joined: list[str | None] = []
    connect = deltakit.cluster.connect
    monkeypatch.setattr(deltakit.cluster, "connect", lambda address: joined.append(address) or connect(address))
    with pytest.raises(BaseMismatchError):
        apply_delta_on_ray(tmp / "panda", delta, tmp_path / "out", shard_size=SHARD)
    assert joined == [] and list(tmp_path.iterdir()) == []  # the cluster was never asked for anything


def kill_a_running_task(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first worker process seen running a shard task (Ray titles it ray::_shard_task)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("_shard_task" in part for part in proc.info["cmdline"] or ()):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


def killed_run(base: Path, delta: Path, out: Path, retries: int) -> tuple[list[int], BaseException | None]:
    """apply_delta_on_ray while a thread SIGKILLs the first shard task it sees running; what it killed,
    and what the apply raised."""
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=kill_a_running_task, args=(stop, killed))
    killer.start()
    try:
        apply_delta_on_ray(base, delta, out, shard_size=SHARD, options=ClusterOptions(retries=retries))
    except BaseException as e:
        return killed, e
    finally:
        stop.set()
        killer.join()
    return killed, None


def test_a_worker_killed_mid_task_is_retried(cluster, pair, tmp_path):
    _, base, delta, local = pair
    killed, error = killed_run(base, delta, tmp_path / "out", retries=1)
    assert killed and error is None, error
    assert same_folder(tmp_path / "out", local)  # the retried shard replaced the half-written one


def test_with_no_retry_a_killed_worker_fails_the_apply_cleanly(cluster, pair, tmp_path):
    """A kill can land as the task hands its result back, too late to fail it: then the run is done
    again, up to three times, until one kill lands mid-task."""
    _, base, delta, _ = pair
    for _attempt in range(3):
        killed, error = killed_run(base, delta, tmp_path / "out", retries=0)
        assert killed, "no shard task was seen running"
        if error is not None:
            break
        shutil.rmtree(tmp_path / "out")
    assert isinstance(error, ClusterError), error
    assert re.search(r"the task rebuilding model-\d{5}-of-\d{5}\.safetensors failed", str(error))
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder


def test_a_worker_that_cannot_see_the_paths_says_so(tmp_path):
    with pytest.raises(ClusterError, match=r"cannot see .*a filesystem every node of the cluster mounts"):
        _shard_task(str(tmp_path / "nowhere"), str(tmp_path), 1, 0, str(tmp_path), ())


def test_the_cli_takes_ray(cluster, pair, tmp_path):
    from test_cli import deltakit_cli

    _, base, delta, local = pair
    address = cluster.address
    done = deltakit_cli("apply", "--base", base, "--delta", delta, "--out", tmp_path / "out", "--ray", address,
                        "--shard-size", str(SHARD))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert same_folder(tmp_path / "out", local)


@pytest.fixture(scope="module")
def service_home(tmp_path_factory):
    """A service home whose apply takes a few seconds on one worker: long enough to cancel mid-way."""

    home = tmp_path_factory.mktemp("service") / "home"
    base = llama_like(torch.float16, vocab=16000, hidden=2048, layers=4)
    base_dir = write_checkpoint(home / "data" / "llama", base)
    target_dir = write_checkpoint(
        home / "data" / "panda", finetune_of(base, extra_vocab=64), files={"config.json": "{}"}
    )
    make_delta(base_dir, target_dir, home / "data" / "panda-delta")
    token = register_for_service(home, llama=base_dir, panda_delta=home / "data" / "panda-delta")
    return home, token, target_dir


def test_service_jobs_run_on_the_cluster_and_are_cancelled_on_it(cluster, service_home):
    """DELTAKIT_EXECUTOR=ray: the job is a task on the cluster; its progress reaches the service, a
    DELETE stops it there and its output is removed; a fanned-out apply job gives the same model."""
    from test_service import LiveServer, client, wait

    from deltakit_service.settings import Settings

    home, token, target = service_home
    settings = Settings(home=home, executor="ray", ray_address=cluster.address)
    with LiveServer(settings) as url, client(url, token) as http:
        job = {"kind": "apply", "base": "llama", "delta": "panda-delta"}
        done = wait(http, http.post("/v1/jobs", json=job | {"output": "built"}).json()["id"])
        assert done["state"] == "succeeded", done
        assert done["progress"]["bytes_done"] == done["progress"]["bytes_total"] > 0
        fanned = wait(http, http.post("/v1/jobs", json=job | {"output": "fanned", "fanout": True}).json()["id"])
        assert fanned["state"] == "succeeded", fanned
        models = home / "models"
        assert load_checkpoint(models / "built").keys() == load_checkpoint(target).keys()
        assert same_folder(models / "built", models / "fanned")

        created = http.post("/v1/jobs", json=job | {"output": "stopped"}).json()
        deadline = time.monotonic() + 60
        while (state := http.get(f"/v1/jobs/{created['id']}").json())["state"] == "queued":
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
        assert state["state"] == "running", state  # on the cluster; it takes seconds there
        assert http.delete(f"/v1/jobs/{created['id']}").status_code in (200, 202)
        stopped = wait(http, created["id"])
        assert stopped["state"] == "cancelled", stopped
        assert sorted(p.name for p in models.iterdir()) == ["built", "fanned"]  # no output, no staging folder
