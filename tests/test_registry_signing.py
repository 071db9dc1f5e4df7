"""Signed imports into the registry (issues 23 and 24): with trusted keys, a model must carry a model.sig by
one of them over every file; its signer is recorded, served by the lineage API and shown on the page."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_of, llama_like, write_checkpoint
from test_service import LiveServer
from test_signing import _keypair

from deltakit.errors import SignatureError, UntrustedSignerError
from deltakit.modelstore.store import ModelStore
from deltakit.signing import load_public_key
from deltakit_service.settings import Settings
from deltakit_service.store import Store


def _sign(folder, private_key) -> None:
    """Sign a model folder as a publisher does with model-signing's own API (``model_signing sign key``)."""
    from model_signing import signing

    signing.Config().use_elliptic_key_signer(private_key=private_key).sign(folder, folder / "model.sig")


@pytest.fixture
def models(tmp_path):
    base = llama_like(torch.bfloat16, vocab=256, hidden=64)
    config = {"config.json": '{"model_type": "llama"}\n'}
    team_key, team_pub = _keypair(tmp_path / "keys", "team")
    other_key, _ = _keypair(tmp_path / "keys", "other")
    return {
        "base": write_checkpoint(tmp_path / "base", base, files=config),
        "tune": write_checkpoint(tmp_path / "tune", finetune_of(base, seed=1), files=config),
        "team": (team_key, team_pub),
        "other": other_key,
    }


def test_a_model_signed_by_a_trusted_key_is_imported_with_its_signer(tmp_path, models):
    _sign(models["base"], models["team"][0])
    _sign(models["tune"], models["team"][0])
    trusted = (load_public_key(models["team"][1]),)
    store = ModelStore(tmp_path / "home")
    store.import_model("team/base", models["base"], trusted=trusted)
    report = store.import_model("team/tune", models["tune"], base="team/base", trusted=trusted)
    assert report.storage == "delta"
    assert report.signer == trusted[0].signer.short
    revision = store.revision("team/tune")
    assert revision.signer == report.signer
    assert revision.file("model.sig") is not None  # served back with the model, for model_signing verify
    store.close()


@pytest.mark.parametrize("case", ["unsigned", "another key", "edited after signing", "a file added after"])
def test_without_a_trusted_signature_nothing_is_stored(tmp_path, models, case):
    folder = models["tune"]
    if case != "unsigned":
        _sign(folder, models["other"] if case == "another key" else models["team"][0])
    if case == "edited after signing":
        (folder / "config.json").write_text('{"model_type": "llama", "edited": true}\n')
    if case == "a file added after":
        (folder / "extra.txt").write_text("not signed\n")
    store = ModelStore(tmp_path / "home")
    error = SignatureError if case in ("edited after signing", "a file added after") else UntrustedSignerError
    with pytest.raises(error) as raised:
        store.import_model("team/tune", folder, trusted=(load_public_key(models["team"][1]),))
    if case == "another key":
        assert "SHA256:" in str(raised.value)  # the signer found is named
    assert store.repositories() == []
    assert list(store.objects.keys()) == []
    store.close()


def test_a_file_changed_after_its_signature_was_checked_is_not_stored(tmp_path, models, monkeypatch):
    """The signature is checked first, the folder read again later: what is stored must still be what was
    signed, or nothing is stored (a producer still writing into a folder in DELTAKIT_ROOTS)."""
    import deltakit.modelstore.store as store_module

    _sign(models["base"], models["team"][0])
    checked = store_module.check_model

    def then_changed(folder, trusted):
        signed = checked(folder, trusted)
        (folder / "config.json").write_text('{"model_type": "llama", "swapped": true}\n')
        return signed

    monkeypatch.setattr(store_module, "check_model", then_changed)
    store = ModelStore(tmp_path / "home")
    with pytest.raises(SignatureError, match=r"config\.json changed while it was imported"):
        store.import_model("team/base", models["base"], trusted=(load_public_key(models["team"][1]),))
    assert store.repositories() == []
    assert list(store.objects.keys()) == []
    store.close()


def test_the_service_requires_deltakit_trust_and_records_the_signer(tmp_path, models):
    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "jobs.sqlite3")
    write = store.create_token("write")
    store.close()
    _sign(models["base"], models["team"][0])
    settings = Settings(home=home, roots=[tmp_path], trust=[models["team"][1]])
    with LiveServer(settings) as url:
        import httpx

        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {write}"}, timeout=60) as http:

            def imported(source: str, repo_id: str) -> dict:
                job = http.post("/v1/models", json={"repo_id": repo_id, "source": source}).json()
                while job["state"] in ("queued", "running"):
                    job = http.get(f"/v1/jobs/{job['id']}").json()
                return job

            done = imported("base", "team/base")
            assert done["state"] == "succeeded", done
            refused = imported("tune", "team/tune")  # not signed
            assert refused["state"] == "failed"
            assert refused["error"]["type"] == "UntrustedSignerError"
            repo = http.get("/v1/models/team/base").json()
            assert repo["revisions"][-1]["signer"] == load_public_key(models["team"][1]).signer.short
            assert http.get("/v1/models/team/tune").status_code == 404
