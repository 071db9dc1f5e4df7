"""The HTTP service, run for real with uvicorn on 127.0.0.1 and driven with httpx."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from conftest import (
    assert_same_tensors,
    finetune_of,
    llama_like,
    load_checkpoint,
    register_for_service,
    write_checkpoint,
)

from deltakit import make_delta
from deltakit.registry import Registry
from deltakit_service.main import create_app
from deltakit_service.settings import Settings
from deltakit_service.store import Store


class LiveServer:
    """uvicorn serving the app on an ephemeral loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    base = llama_like(torch.float16, vocab=256, hidden=64)
    target = finetune_of(base, extra_vocab=8)
    base_dir = write_checkpoint(home / "data" / "llama-7b", base)
    target_dir = write_checkpoint(home / "data" / "panda-7b", target, files={"config.json": "{}"})
    make_delta(base_dir, target_dir, home / "data" / "panda-7b-delta")
    registry = Registry(home)
    registry.add("llama-7b", base_dir)
    registry.add("panda-7b-src", target_dir)
    registry.add("panda-7b", home / "data" / "panda-7b-delta")
    store = Store(home / "jobs.sqlite3")
    tokens = {"read": store.create_token("read"), "write": store.create_token("write")}
    store.close()
    return home, tokens, target


def client(url: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def wait(http: httpx.Client, job_id: str, states: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_apply_job_from_request_to_verified_output(home):
    root, tokens, target = home
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        created = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "p"})
        assert created.status_code == 202, created.text
        assert created.headers["location"] == f"/v1/jobs/{created.json()['id']}"
        job = wait(http, created.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["report"]["verified"] is True
        assert job["progress"]["bytes_done"] == job["progress"]["bytes_total"] > 0

        assert_same_tensors(load_checkpoint(root / "models" / "p"), target)
        listed = {m["name"]: m for m in http.get("/v1/models").json()}
        assert listed["p"]["kind"] == "model" and listed["p"]["fingerprint"] == job["report"]["fingerprint"]
        assert http.get("/v1/models/p").json()["size"] > 0

        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            text = "".join(events.iter_text())
        assert "event: end" in text and '"state":"succeeded"' in text

        verify = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b", "model": "p"})
        assert wait(http, verify.json()["id"])["report"]["ok"] is True
        metrics = http.get("/metrics").text
        assert 'deltakit_jobs{state="succeeded"} 2' in metrics and "deltakit_bytes_processed_total" in metrics


def test_auth_scopes(home):
    root, tokens, _ = home
    job = {"kind": "verify", "delta": "panda-7b"}
    with LiveServer(Settings(home=root)) as url:
        with client(url, None) as anonymous:
            assert anonymous.get("/healthz").json() == {"status": "ok"}
            assert anonymous.get("/readyz").status_code == 200
            refused = anonymous.get("/v1/models")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.headers["content-type"] == "application/problem+json"
            assert anonymous.get("/metrics").status_code == 401
        with client(url, "dk_not-a-token") as forged:
            assert forged.get("/v1/jobs").status_code == 401
        with client(url, tokens["read"]) as reader:
            assert reader.get("/v1/models").status_code == 200
            assert reader.post("/v1/jobs", json=job).status_code == 403
        with client(url, tokens["write"]) as writer:
            assert writer.post("/v1/jobs", json=job).status_code == 202


def test_only_registered_names_inside_the_roots_come_in(home, tmp_path):
    root, tokens, _ = home
    outside = write_checkpoint(tmp_path / "outside", llama_like(torch.float16))
    (root / "data" / "link").symlink_to(outside, target_is_directory=True)
    Registry(root).add("sneaky", root / "data" / "link")
    Registry(root).add("elsewhere", outside)
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        for bad in ("../llama-7b", "/etc/passwd", "a/b", ".hidden", ""):
            response = http.post("/v1/jobs", json={"kind": "apply", "base": bad, "delta": "panda-7b", "output": "x"})
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["type"] == "ValidationError"
        for name in ("sneaky", "elsewhere"):
            response = http.post("/v1/jobs", json={"kind": "apply", "base": name, "delta": "panda-7b", "output": "x"})
            assert response.status_code == 403, response.text
            assert response.json()["type"] == "NameOutsideRoots"
        missing = http.post("/v1/jobs", json={"kind": "apply", "base": "nope", "delta": "panda-7b", "output": "x"})
        assert missing.status_code == 404 and missing.json()["type"] == "InputNotFoundError"
        taken = http.post(
            "/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "llama-7b"}
        )
        assert taken.status_code == 409
        huge = http.post("/v1/jobs", content=b"{" + b" " * 100_000 + b"}", headers={"content-type": "application/json"})
        assert huge.status_code == 413
        assert "Traceback" not in huge.text
        assert not (root / "models" / "x").exists()


def small_chunks(root: Path, monkeypatch) -> None:
    """Many small chunks, a job that takes a while: format 2 frames are cut when the delta is made,
    so the delta is made again with them."""
    monkeypatch.setattr("deltakit.reading.CHUNK_BYTES", 256)
    monkeypatch.setattr("deltakit.manifest.MIN_FRAME_BYTES", 32)  # so that apply reads frames that small
    shutil.rmtree(root / "data" / "panda-7b-delta")
    make_delta(root / "data" / "llama-7b", root / "data" / "panda-7b", root / "data" / "panda-7b-delta")


def test_cancel_stops_the_work_and_removes_its_output(home, monkeypatch):
    root, tokens, _ = home
    small_chunks(root, monkeypatch)
    with LiveServer(Settings(home=root, workers=1)) as url, client(url, tokens["write"]) as http:
        running = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "a"})
        queued = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "b"})
        wait(http, running.json()["id"], ("running",))
        assert http.delete(f"/v1/jobs/{queued.json()['id']}").json()["state"] == "cancelled"
        http.delete(f"/v1/jobs/{running.json()['id']}")
        assert wait(http, running.json()["id"])["state"] == "cancelled"
        assert not (root / "models" / "a").exists()
        assert not list((root / "models").glob(".*")), "no temporary output is left"
        assert "a" not in {m["name"] for m in http.get("/v1/models").json()}


def test_the_same_request_returns_the_same_job(home, monkeypatch):
    root, tokens, _ = home
    small_chunks(root, monkeypatch)
    request = {"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "same"}
    with LiveServer(Settings(home=root, workers=1)) as url, client(url, tokens["write"]) as http:
        first = http.post("/v1/jobs", json=request).json()
        assert http.post("/v1/jobs", json=request).json()["id"] == first["id"]
        keyed = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b"}, headers={"Idempotency-Key": "k1"})
        wait(http, keyed.json()["id"])
        again = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b"}, headers={"Idempotency-Key": "k1"})
        assert again.json()["id"] == keyed.json()["id"], "a finished job is returned for its key too"
        http.delete(f"/v1/jobs/{first['id']}")
        wait(http, first["id"])


def test_a_restart_marks_interrupted_jobs_and_cleans_their_temporary_output(home):
    root, tokens, _ = home
    store = Store(root / "jobs.sqlite3")
    job, _ = store.create_job("apply", {"base": "llama-7b", "delta": "panda-7b", "output": "half"}, None)
    store.start(job.id)  # as if the service died while this ran
    store.close()
    leftover = root / "models" / ".half.deltakit-0123456789ab.tmp"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half written")
    with LiveServer(Settings(home=root)) as url, client(url, tokens["read"]) as http:
        seen = http.get(f"/v1/jobs/{job.id}").json()
        assert seen["state"] == "failed" and seen["error"]["type"] == "Interrupted"
        assert not leftover.exists()
        assert "half" not in {m["name"] for m in http.get("/v1/models").json()}


def test_openapi_schema_is_served(home):
    root, tokens, _ = home
    with LiveServer(Settings(home=root)) as url, client(url, tokens["read"]) as http:
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        schema = http.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/models", "/metrics"} <= set(
            schema["paths"]
        )


def test_token_create_prints_the_token_alone_and_stores_only_its_hash(tmp_path, monkeypatch):
    from test_cli import deltakit_cli

    monkeypatch.setenv("DELTAKIT_HOME", str(tmp_path / "h"))
    result = deltakit_cli("token", "create", "--scope", "read")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("dk_") and "\n" not in token
    store = Store(Path(tmp_path / "h" / "jobs.sqlite3"))
    assert store.token_scope(token) == "read"
    assert token.encode() not in (tmp_path / "h" / "jobs.sqlite3").read_bytes()
    store.close()


def test_review_fixes_idempotency_cancel_and_bodies(home):
    root, tokens, _ = home
    verify = {"kind": "verify", "delta": "panda-7b"}
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        apply = {"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "k"}
        first = http.post("/v1/jobs", json=apply, headers={"Idempotency-Key": "build-k"}).json()
        assert wait(http, first["id"])["state"] == "succeeded"
        retry = http.post("/v1/jobs", json=apply, headers={"Idempotency-Key": "build-k"})
        assert retry.status_code == 202 and retry.json()["id"] == first["id"], "a retry gets the job, not a 409"
        reused = http.post("/v1/jobs", json=verify, headers={"Idempotency-Key": "build-k"})
        assert reused.status_code == 422 and reused.json()["type"] == "IdempotencyKeyReused"
        assert http.delete(f"/v1/jobs/{first['id']}").status_code == 409

        def chunks():
            yield b'{"kind": "verify", "delta": "'
            for _ in range(100):
                yield b"x" * 1000
            yield b'"}'

        streamed = http.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["type"] == "PayloadTooLarge"


def test_a_live_build_survives_a_service_start_and_a_file_linked_out_of_the_roots_is_refused(home, tmp_path):
    from deltakit.staging import StagedFolder

    root, tokens, _ = home
    (root / "models").mkdir(exist_ok=True)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"not for the service")
    linked = root / "data" / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(outside)
    Registry(root).add_known("linked", linked, "model", "0" * 64, 1)
    with (
        StagedFolder(root / "models" / "cli-built") as live,  # as a CLI apply in progress holds it
        LiveServer(Settings(home=root)) as url,
        client(url, tokens["write"]) as http,
    ):
        assert live.path.is_dir(), "the service must not remove another process's build in progress"
        refused = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b", "model": "linked"})
        assert refused.status_code == 403 and refused.json()["type"] == "NameOutsideRoots"


def test_an_output_that_cannot_be_registered_is_removed(home, monkeypatch):
    from deltakit.errors import FormatError

    root, tokens, _ = home

    def broken(*args, **kwargs):
        raise FormatError("registry full")

    monkeypatch.setattr(Registry, "add_known", broken)
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        job = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "o"})
        ended = wait(http, job.json()["id"])
        assert ended["state"] == "failed" and ended["error"]["detail"] == "registry full"
        assert not (root / "models" / "o").exists()


@pytest.mark.slow
def test_killing_the_service_mid_job_then_restarting_it(tmp_path):
    """The real thing: SIGKILL during an apply, then a new service finds and cleans up after it."""
    import signal
    import socket
    import subprocess
    import sys

    from deltakit.examples import LlamaShape, write_llama_pair

    home = tmp_path / "home"
    base_dir, tuned_dir = write_llama_pair(
        home / "data", shape=LlamaShape(vocab=32000, hidden=1024, layers=8, intermediate=2752, heads=8)
    )  # about 400 MB: an apply that runs for a while
    make_delta(base_dir, tuned_dir, home / "data" / "delta")
    token = register_for_service(home, base=base_dir, delta=home / "data" / "delta")

    def serve() -> tuple[subprocess.Popen[bytes], str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "DELTAKIT_HOME": str(home)}
        exe = [sys.executable, "-m", "deltakit", "serve", "--port", str(port)]
        process = subprocess.Popen(exe, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)

    process, url = serve()
    try:
        with client(url, token) as http:
            job = http.post("/v1/jobs", json={"kind": "apply", "base": "base", "delta": "delta", "output": "built"})
            job_id = job.json()["id"]
            while http.get(f"/v1/jobs/{job_id}").json()["progress"]["bytes_done"] == 0:
                time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        assert list((home / "models").glob(".built.deltakit-*.tmp")), "the kill left a half-built staging folder"
    finally:
        if process.poll() is None:
            process.kill()

    process, url = serve()
    try:
        with client(url, token) as http:
            seen = http.get(f"/v1/jobs/{job_id}").json()
            assert seen["state"] == "failed" and seen["error"]["type"] == "Interrupted"
            assert "built" not in {m["name"] for m in http.get("/v1/models").json()}
        assert not list((home / "models").iterdir()), "the half-built output is gone"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_make_jobs_choose_the_package_format_and_level(home):
    root, tokens, target = home
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        jobs = {
            name: http.post("/v1/jobs", json={"kind": "make", "base": "llama-7b", "target": "panda-7b-src", **extra})
            for name, extra in (("raw", {"output": "d1", "format": 1}), ("coded", {"output": "d2", "level": 3}))
        }
        reports = {}
        for name, created in jobs.items():
            assert created.status_code == 202, created.text
            job = wait(http, created.json()["id"])
            assert job["state"] == "succeeded", job
            reports[name] = job["report"]
        assert (reports["raw"]["format"], reports["coded"]["format"]) == (1, 2)
        assert reports["coded"]["payload_bytes"] < reports["raw"]["payload_bytes"]
        applied = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "d1", "output": "m1"})
        assert wait(http, applied.json()["id"])["state"] == "succeeded"
        assert_same_tensors(load_checkpoint(root / "models" / "m1"), target)
        for bad in (
            {"kind": "make", "base": "llama-7b", "target": "panda-7b-src", "output": "d3", "format": 3},
            {"kind": "make", "base": "llama-7b", "target": "panda-7b-src", "output": "d3", "level": 0},
            {"kind": "apply", "base": "llama-7b", "delta": "d1", "output": "m2", "level": 3},
        ):
            assert http.post("/v1/jobs", json=bad).status_code == 422, bad
        missing = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-7b"})
        assert missing.status_code == 422 and "an apply job needs delta, output" in missing.text


def test_one_service_per_home(home):
    import asyncio

    from deltakit import OutputExistsError

    root, tokens, _ = home

    async def start_and_stop(app) -> None:
        async with app.router.lifespan_context(app):
            pass

    with LiveServer(Settings(home=root)) as url, client(url, tokens["read"]) as http:
        second = create_app(Settings(home=root))
        with pytest.raises(OutputExistsError, match="another deltakit serve is running on"):
            asyncio.run(start_and_stop(second))  # refused before its recovery could fail the first one's jobs
        assert http.get("/readyz").status_code == 200, "the first one serves on"
    asyncio.run(start_and_stop(create_app(Settings(home=root))))  # free again once the first has stopped


def test_a_key_reused_with_another_body_is_refused_even_when_requests_race(home, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from deltakit_service.store import KeyReused

    store = Store(tmp_path / "jobs.sqlite3")
    try:
        first, created = store.create_job("verify", {"delta": "a"}, "k1")
        assert created and store.create_job("verify", {"delta": "a"}, "k1") == (first, False)
        with pytest.raises(KeyReused, match="made from another request"):  # the check the route's pre-check missed
            store.create_job("verify", {"delta": "b"}, "k1")
    finally:
        store.close()

    root, tokens, _ = home
    bodies = [{"kind": "verify", "delta": "panda-7b"}, {"kind": "verify", "delta": "panda-7b", "base": "llama-7b"}]
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:

        def post(i: int) -> tuple[dict, httpx.Response]:
            body = bodies[i % 2]
            return body, http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "race"})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(20)))
        ids = set()
        for body, response in answers:
            assert response.status_code in (202, 422), response.text
            if response.status_code == 202:
                job = response.json()
                assert job["params"] == {k: v for k, v in body.items() if k != "kind"}, "never the other body's job"
                ids.add(job["id"])
        assert len(ids) == 1


def test_job_errors_name_registered_models_never_server_paths(home):
    root, tokens, _ = home
    (root / "data" / "llama-7b" / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}")  # a broken base
    with LiveServer(Settings(home=root)) as url:
        with client(url, tokens["write"]) as writer:
            job_id = writer.post(
                "/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "p"}
            ).json()["id"]
        with client(url, tokens["read"]) as reader:
            error = wait(reader, job_id)["error"]
    assert error["type"] == "SafetensorsHeaderError", error
    assert str(root) not in error["detail"] and str(root.resolve()) not in error["detail"], error
    assert "llama-7b/model.safetensors" in error["detail"], error


def test_a_job_error_about_a_request_field_names_that_field_never_a_cli_flag(home):
    """The library says which argument an error is about (out); the service names its own field."""
    root, tokens, _ = home
    settings = Settings(home=root)
    settings.models_dir.joinpath("p").mkdir(parents=True)
    settings.models_dir.joinpath("p", "keep.txt").write_text("not ours")  # there, but registered to no name
    with LiveServer(settings) as url, client(url, tokens["write"]) as http:
        job = {"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "p"}
        error = wait(http, http.post("/v1/jobs", json=job).json()["id"])["error"]
    assert error["type"] == "OutputExistsError" and error["field"] == "output", error
    assert error["detail"].endswith("; choose another output") and "--" not in error["detail"], error


def test_a_hostile_checkpoint_fails_its_job_and_the_service_lives_on(home):
    """A .bin whose pickle nests a million deep once crashed the interpreter, and with it the service."""
    import zipfile

    root, tokens, _ = home
    folder = root / "data" / "hostile"
    torch.save(
        {"model.embed_tokens.weight": torch.ones(2, 2).half()},
        folder.mkdir(parents=True) or folder / "pytorch_model.bin",
    )
    Registry(root).add("hostile", folder)
    deep_key = b"\x80\x02ccollections\nOrderedDict\nK\x00" + b"\x85" * 1_000_000 + b"K\x01\x86\x85\x85R."
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", deep_key)
    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        job_id = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b", "model": "hostile"}).json()["id"]
        ended = wait(http, job_id)
        assert ended["state"] == "failed" and ended["error"]["type"] == "UnsafePickleError", ended
        assert "hostile/pytorch_model.bin" in ended["error"]["detail"]
        assert http.get("/readyz").status_code == 200  # still serving


def test_gguf_jobs_convert_a_model_and_apply_straight_to_gguf(tmp_path):
    """A convert job and an apply job with ``to: gguf`` write one GGUF file each, registered (kind
    ``gguf``, by its SHA-256) and byte for byte what the library writes."""
    from tinyllama import write_finetune, write_tiny_llama

    from deltakit.gguf import convert_to_gguf
    from deltakit.hashing import file_sha256

    root = tmp_path / "home"
    base = write_tiny_llama(root / "data" / "llama-tiny", seed=3)
    target = write_finetune(base, root / "data" / "panda-tiny", extra_rows=2)
    make_delta(base, target, root / "data" / "panda-tiny-delta")
    delta = root / "data" / "panda-tiny-delta"
    token = register_for_service(root, llama_tiny=base, panda_tiny=target, panda_tiny_delta=delta)
    convert_to_gguf(target, tmp_path / "expected.gguf", quant="q8_0")
    with LiveServer(Settings(home=root)) as url, client(url, token) as http:
        refused = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-tiny", "delta": "panda-tiny-delta",
                                               "output": "x", "quant": "q8_0"})  # fmt: skip
        assert refused.status_code == 422 and "to gguf" in refused.text
        jobs = [
            {"kind": "convert", "model": "panda-tiny", "output": "panda-q8", "quant": "q8_0"},
            {"kind": "apply", "base": "llama-tiny", "delta": "panda-tiny-delta", "output": "panda-applied-q8",
             "to": "gguf", "quant": "q8_0"},
        ]  # fmt: skip
        for request in jobs:
            job = wait(http, http.post("/v1/jobs", json=request).json()["id"])
            assert job["state"] == "succeeded", job
            out = root / "models" / f"{request['output']}.gguf"
            assert out.read_bytes() == (tmp_path / "expected.gguf").read_bytes()
            assert job["report"]["types"] == {"F32": 5, "Q8_0": 16}
            assert job["report"]["sha256"] == file_sha256(out)[0]
            listed = http.get(f"/v1/models/{request['output']}").json()
            assert listed["kind"] == "gguf" and listed["fingerprint"] == job["report"]["sha256"]
        fanout = http.post("/v1/jobs", json={"kind": "apply", "base": "llama-tiny", "delta": "panda-tiny-delta",
                                             "output": "f", "fanout": True})  # fmt: skip
        refused_job = wait(http, fanout.json()["id"])
        assert refused_job["state"] == "failed" and "DELTAKIT_EXECUTOR=ray" in refused_job["error"]["detail"]
        as_base = http.post("/v1/jobs", json={"kind": "apply", "base": "panda-q8", "delta": "panda-tiny-delta",
                                              "output": "y"})  # fmt: skip
        assert as_base.status_code == 404 and "no registered model is named 'panda-q8'" in as_base.text  # not a base


# issue 20: bounded shutdown, recovery of unregistered outputs, connection limits, a full disk, messages ---------


class ServeProcess:
    """A real ``deltakit serve`` in a subprocess, its stderr in a file; ``patch`` is Python run before the CLI
    (to inject a job function), ``nofile`` a lower RLIMIT_NOFILE for it."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None, patch: str = "", nofile: int | None = None):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.home, self.env, self.patch, self.nofile = home, env or {}, patch, nofile
        self.log = home.parent / f"serve-{self.port}.log"

    def _limit(self) -> None:
        import resource

        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self) -> ServeProcess:
        import subprocess
        import sys

        serve = f"sys.exit(main(['serve', '--port', '{self.port}']))"
        code = f"{self.patch}\nimport sys\nfrom deltakit.cli import main\n{serve}"
        env = {**os.environ, "DELTAKIT_HOME": str(self.home), **self.env}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=log, stderr=log, preexec_fn=self._limit
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


_STUCK_JOB = """
import os, time
from pathlib import Path
import deltakit_service.jobs
from deltakit.staging import StagedFolder

def stuck(delta, *, base=None, progress):  # never touches its progress bar: a cancel cannot reach it
    with StagedFolder(Path(os.environ["DELTAKIT_HOME"]) / "models" / "stuck") as staged:
        (staged.path / "half.safetensors").write_bytes(b"half written")
        while True:
            time.sleep(0.05)

deltakit_service.jobs.verify_delta = stuck
"""


def test_sigterm_ends_the_service_within_its_grace_even_when_a_job_ignores_it(home):
    import signal
    import subprocess

    root, tokens, _ = home
    with ServeProcess(root, env={"DELTAKIT_SHUTDOWN_GRACE": "1"}, patch=_STUCK_JOB) as served:
        with client(served.url, tokens["write"]) as http:
            job_id = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b"}).json()["id"]
            wait(http, job_id, ("running",))
            assert http.delete(f"/v1/jobs/{job_id}").status_code == 202
            while not list((root / "models").glob(".stuck.deltakit-*.tmp")):
                time.sleep(0.02)
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(timeout=30)  # the bound is the grace (1 s here) and a few seconds of stopping
        except subprocess.TimeoutExpired:
            pytest.fail("the service did not exit after SIGTERM: " + served.log.read_text()[-2000:])
        assert "did not stop within 1 s" in served.log.read_text()
    store = Store(root / "jobs.sqlite3")
    ended = store.get(job_id)
    store.close()
    assert ended is not None and ended.state in ("failed", "cancelled"), ended
    with LiveServer(Settings(home=root)):
        assert not list((root / "models").glob(".stuck.*")), "the next start removes what the job left"


def _interrupted(root: Path, kind: str, params: dict) -> str:
    """A job the store says is running, as a kill -9 leaves it."""
    store = Store(root / "jobs.sqlite3")
    job, _ = store.create_job(kind, params, None)
    store.start(job.id)
    store.close()
    return job.id


def test_an_output_committed_but_not_registered_before_a_kill_is_registered_or_moved_aside(home):
    from deltakit import apply_delta

    root, tokens, target = home
    built = _interrupted(root, "apply", {"base": "llama-7b", "delta": "panda-7b", "output": "built"})
    applied = apply_delta(root / "data" / "llama-7b", root / "data" / "panda-7b-delta", root / "models" / "built")
    made = _interrupted(root, "make", {"base": "llama-7b", "target": "panda-7b-src", "output": "made"})
    make_delta(root / "data" / "llama-7b", root / "data" / "panda-7b", root / "deltas" / "made")
    bogus = _interrupted(root, "apply", {"base": "llama-7b", "delta": "panda-7b", "output": "bogus"})
    (root / "models" / "bogus").mkdir()
    (root / "models" / "bogus" / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{}")
    registered = _interrupted(root, "apply", {"base": "llama-7b", "delta": "panda-7b", "output": "late"})
    late = apply_delta(root / "data" / "llama-7b", root / "data" / "panda-7b-delta", root / "models" / "late")
    Registry(root).add_known("late", root / "models" / "late", "model", late.fingerprint, late.bytes_written)

    with LiveServer(Settings(home=root)) as url, client(url, tokens["write"]) as http:
        for job_id, name in ((built, "built"), (made, "made"), (registered, "late")):
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded" and job["report"]["output"] == name, job
            assert "recovered" in job["report"], job
        models = {m["name"]: m for m in http.get("/v1/models").json()}
        assert models["built"]["fingerprint"] == applied.fingerprint and models["made"]["kind"] == "delta"

        failed = http.get(f"/v1/jobs/{bogus}").json()
        assert failed["state"] == "failed" and "moved aside" in failed["error"]["detail"], failed
        assert "bogus" not in models and not (root / "models" / "bogus").exists()
        assert list((root / "models").glob("bogus.unregistered-*")), "kept for the operator to look at"
        again = http.post(
            "/v1/jobs", json={"kind": "apply", "base": "llama-7b", "delta": "panda-7b", "output": "bogus"}
        )
        assert wait(http, again.json()["id"])["state"] == "succeeded", "a rerun is not refused as existing"
    assert_same_tensors(load_checkpoint(root / "models" / "bogus"), target)


_HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@pytest.mark.slow
def test_half_sent_request_heads_cannot_exhaust_the_servers_files(home):
    import signal
    import socket

    root, _, _ = home
    env = {"DELTAKIT_HEADER_TIMEOUT": "60"}  # the cap, not the deadline, must keep it answering
    with ServeProcess(root, env=env, nofile=128) as served:  # a connection cap below 128 open files
        sockets = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", served.port), timeout=10)
                s.sendall(_HALF_HEAD)
                sockets.append(s)
            assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200
        finally:
            for s in sockets:
                s.close()
        assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=30)
    log = served.log.read_text()
    assert log.count("Too many open files") <= 2 and log.count("Traceback") <= 1, log[-3000:]
    assert log.count("closing the oldest still sending a request head") == 1, log[-3000:]


def test_a_half_sent_head_is_closed_after_the_header_timeout(home):
    import socket

    root, _, _ = home
    with (
        ServeProcess(root, env={"DELTAKIT_HEADER_TIMEOUT": "1"}) as served,
        socket.create_connection(("127.0.0.1", served.port), timeout=10) as slow,
    ):
        slow.sendall(_HALF_HEAD)
        try:
            assert slow.recv(1024) == b"", "the server closes the connection"
        except TimeoutError:
            pytest.fail("a half-sent request head held its connection open past the header timeout")


def test_the_log_says_running_out_of_files_once_per_interval():
    import errno
    import logging

    from deltakit_service.server import OnceAnInterval

    logger = logging.getLogger("test.once")
    logger.propagate = False
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    logger.addFilter(OnceAnInterval(seconds=60))
    for _ in range(1000):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            logger.exception("socket.accept() out of system resource")
    logger.warning("something else")
    assert len(records) == 2, [r.getMessage() for r in records]


def _fill_the_store(store: Store) -> None:
    """SQLite's own limit on the file's pages: further growth fails as a full disk does (SQLITE_FULL)."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_store_answers_507_and_readyz_says_so(home):
    root, tokens, _ = home
    settings = Settings(home=root)
    server = LiveServer(settings)
    with server as url, client(url, tokens["write"]) as http:
        app_store = server.app.state.store
        assert http.get("/readyz").status_code == 200
        _fill_the_store(app_store)
        for i in range(500):
            refused = http.post(
                "/v1/jobs", json={"kind": "verify", "delta": "panda-7b"}, headers={"Idempotency-Key": f"k{i}"}
            )
            if refused.status_code != 202:
                break
        assert refused.status_code == 507, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"] == "NoSpaceError" and str(root) not in refused.text
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "store" in ready.json()["detail"], ready.text
        app_store._db.execute("PRAGMA max_page_count = 1073741823")
        assert http.get("/readyz").status_code == 200


def test_a_job_whose_progress_cannot_be_stored_fails_as_no_space(home, monkeypatch):
    import sqlite3

    root, tokens, _ = home
    server = LiveServer(Settings(home=root))
    with server as url, client(url, tokens["write"]) as http:
        store = server.app.state.store
        real = store._db

        class Full:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def execute(self, sql: str, *args: object) -> object:
                if sql.startswith("UPDATE jobs SET bytes") or sql.startswith("UPDATE jobs SET stage"):
                    error = sqlite3.OperationalError("database or disk is full")
                    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
                    raise error
                return real.execute(sql, *args)

        store._db = Full()
        job = http.post("/v1/jobs", json={"kind": "verify", "delta": "panda-7b"}).json()
        ended = wait(http, job["id"])
        store._db = real
    assert ended["state"] == "failed" and ended["error"]["type"] == "NoSpaceError", ended


def test_a_name_outside_the_roots_is_refused_naming_deltakit_roots(home, tmp_path):
    root, tokens, _ = home
    outside = write_checkpoint(tmp_path / "outside", llama_like(torch.float16))
    Registry(root).add("elsewhere", outside)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with LiveServer(Settings(home=root, roots=[allowed])) as url, client(url, tokens["write"]) as http:
        refused = http.post("/v1/jobs", json={"kind": "apply", "base": "elsewhere", "delta": "panda-7b", "output": "x"})
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert "DELTAKIT_ROOTS" in detail and str(allowed.resolve()) in detail and str(root.resolve()) in detail, detail


def test_a_second_serve_on_the_same_home_says_so_in_one_line(home):
    from test_cli import deltakit_cli

    root, _, _ = home
    with ServeProcess(root):
        os.environ["DELTAKIT_HOME"] = str(root)
        try:
            second = deltakit_cli("serve", "--port", "0")
        finally:
            del os.environ["DELTAKIT_HOME"]
    assert second.returncode == 1
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another deltakit serve is running on" in lines[0], second.stderr


def test_serve_help_lists_the_environment_it_reads_and_the_token():
    from test_cli import deltakit_cli

    shown = deltakit_cli("serve", "--help")
    assert shown.returncode == 0
    for field in Settings.model_fields:
        assert f"DELTAKIT_{field.upper()}" in shown.stdout, field
    assert "token create" in shown.stdout
