"""Signed releases (OpenSSF Model Signing): make/publish --sign, --trust on download/apply/verify/inspect, the
rebuilt model's model.sig checked by model-signing's own CLI, and every hostile case refused by name."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, finetune_of, llama_like, load_checkpoint, write_checkpoint
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from test_cli import deltakit_cli

from deltakit import KeyFileError, SignatureError, UntrustedSignerError, apply_delta, inspect_path, make_delta
from deltakit.signing import (
    MODEL_SIGNATURE,
    PACKAGE_KEY,
    PACKAGE_SIGNATURE,
    check_package,
    check_trust,
    load_public_key,
    load_signing_key,
    sign_package,
    signer_of,
    trusted_keys,
)

CARD_FLAGS = ("--base-model", "huggyllama/llama-7b", "--license", "apache-2.0")


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _keypair(folder: Path, name: str, key=None) -> tuple[Path, Path]:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.pem").write_bytes(_pem_private(key))
    (folder / f"{name}.pub").write_bytes(_pem_public(key))
    return folder / f"{name}.pem", folder / f"{name}.pub"


@pytest.fixture
def signed(tmp_path):
    """A base, its fine-tune (vocabulary grown, a carried file), the delta signed at make, and two key pairs."""
    base = llama_like(torch.float16)
    base_dir = write_checkpoint(tmp_path / "llama-7b", base)
    target_dir = write_checkpoint(
        tmp_path / "panda-7b", finetune_of(base, extra_vocab=3), files={"config.json": '{"vocab_size": 67}\n'}
    )
    key, pub = _keypair(tmp_path / "keys", "publisher")
    other_key, other_pub = _keypair(tmp_path / "keys", "other")
    made = deltakit_cli(
        "make", "--base", base_dir, "--target", target_dir, "--out", tmp_path / "delta", "--sign", key, "--json", "-q"
    )
    assert made.returncode == 0, made.stderr
    signer = json.loads(made.stdout)["signer"]
    return {
        "base": base_dir,
        "target": target_dir,
        "delta": tmp_path / "delta",
        "key": key,
        "pub": pub,
        "other_key": other_key,
        "other_pub": other_pub,
        "signer": signer,
    }


def _model_signing_verify(model: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    """model-signing's own CLI, without deltakit."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(model),
         "--signature", str(model / MODEL_SIGNATURE), "--public_key", str(pub)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_make_signs_the_package_and_the_model_it_rebuilds(signed, tmp_path):
    delta = signed["delta"]
    for name in (PACKAGE_SIGNATURE, PACKAGE_KEY, MODEL_SIGNATURE):
        assert (delta / name).is_file(), name
    assert not list(delta.glob(".*.tmp")), "no temporary file left"
    fingerprint = load_public_key(signed["pub"]).fingerprint
    assert signed["signer"]["fingerprint"] == fingerprint
    assert signer_of(delta).fingerprint == fingerprint
    assert check_trust(delta, trusted_keys([signed["pub"]])).fingerprint == fingerprint
    # model-signing's CLI checks the package itself too (its signature inside it, README.md ignored)
    package = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(delta),
         "--signature", str(delta / PACKAGE_SIGNATURE), "--public_key", str(signed["pub"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert package.returncode == 0, package.stderr

    shown = deltakit_cli("inspect", delta, "--trust", signed["pub"])
    assert shown.returncode == 0, shown.stderr
    assert f"signed by   {signer_of(delta).short} (a trusted key)" in shown.stdout
    as_dict = inspect_path(delta).to_dict()
    assert as_dict["signer_fingerprint"] == fingerprint and as_dict["signer"].startswith("SHA256:")

    applied = deltakit_cli(
        "apply", "--base", signed["base"], "--delta", delta, "--out", tmp_path / "out", "--trust", signed["pub"], "-q"
    )
    assert applied.returncode == 0, applied.stderr
    assert f"signed by {signer_of(delta).short} (a trusted key)" in applied.stdout
    assert (tmp_path / "out" / MODEL_SIGNATURE).read_bytes() == (delta / MODEL_SIGNATURE).read_bytes()
    assert _model_signing_verify(tmp_path / "out", signed["pub"]).returncode == 0
    (tmp_path / "out" / "config.json").write_text('{"vocab_size": 68}\n')  # the rebuilt model altered
    altered = _model_signing_verify(tmp_path / "out", signed["pub"])
    assert altered.returncode == 1 and "config.json" in altered.stderr


def test_sign_publish_download_with_trust_apply_and_model_signing_verifies(signed, tmp_path, monkeypatch):
    from hubserver import FakeHub, configure_client

    with FakeHub(tmp_path / "hub-storage", token="hf_test") as hub:
        configure_client(monkeypatch, hub.endpoint, tmp_path / "hf-home", token="hf_test", xet=True)
        # an unsigned package, signed by publish
        plain = tmp_path / "plain"
        shutil.copytree(signed["delta"], plain)
        for name in (PACKAGE_SIGNATURE, PACKAGE_KEY):
            (plain / name).unlink()
        published = deltakit_cli("publish", plain, "--repo", "dandelion/panda-7b-delta", "--sign", signed["key"],
                                 *CARD_FLAGS, "-q")  # fmt: skip
        assert published.returncode == 0, published.stderr
        assert hub.xet.files, "the payload went through Xet"
        card = hub.read("dandelion/panda-7b-delta", "README.md").decode()
        assert signer_of(plain).short in card and "model_signing verify key" in card

        refused = deltakit_cli("download", "dandelion/panda-7b-delta", "--trust", signed["other_pub"])
        assert refused.returncode == 1
        assert f"signed by {signer_of(plain).short}, which is not a trusted key" in refused.stderr
        assert "--trust" in refused.stderr  # the advice

        fetched = deltakit_cli("download", "dandelion/panda-7b-delta", "--trust", signed["pub"], "--json")
        assert fetched.returncode == 0, fetched.stderr
        assert json.loads(fetched.stdout)["signer"]["fingerprint"] == load_public_key(signed["pub"]).fingerprint

        trust_dir = Path(__import__("os").environ["DELTAKIT_HOME"]) / "trusted_keys"
        trust_dir.mkdir(parents=True)
        shutil.copy(signed["pub"], trust_dir / "publisher.pub")  # trusted through DELTAKIT_HOME this time
        out = tmp_path / "rebuilt"
        applied = deltakit_cli(
            "apply", "--base", signed["base"], "--delta", "dandelion/panda-7b-delta", "--out", out, "-q"
        )
        assert applied.returncode == 0, applied.stderr
        assert "(a trusted key)" in applied.stdout
    assert_same_tensors(load_checkpoint(out), load_checkpoint(signed["target"]))
    done = _model_signing_verify(out, signed["pub"])
    assert done.returncode == 0, done.stderr
    assert "Verification succeeded" in done.stdout


def test_without_trust_the_signer_is_shown_and_an_unsigned_package_refused_under_trust(signed, tmp_path):
    delta = signed["delta"]
    applied = deltakit_cli("apply", "--base", signed["base"], "--delta", delta, "--out", tmp_path / "a", "-q")
    assert applied.returncode == 0 and f"signed by {signer_of(delta).short}; signature checked" in applied.stdout
    unsigned = tmp_path / "unsigned"
    make_delta(signed["base"], signed["target"], unsigned)
    assert check_package(unsigned) is None
    for command in (
        ["apply", "--base", signed["base"], "--delta", unsigned, "--out", tmp_path / "b"],
        ["verify", unsigned],
    ):
        refused = deltakit_cli(*command, "--trust", signed["pub"])
        assert refused.returncode == 1, command
        assert "is not signed (deltakit.sig is absent)" in refused.stderr
    assert not (tmp_path / "b").exists()
    with pytest.raises(UntrustedSignerError, match="is not signed"):
        inspect_path(unsigned, trusted=trusted_keys([signed["pub"]]))
    other = tmp_path / "by-other"
    shutil.copytree(unsigned, other)
    sign_package(other, load_signing_key(signed["other_key"]), target=signed["target"])
    with pytest.raises(UntrustedSignerError, match=re.escape(f"signed by {signer_of(other).short}")) as caught:
        check_trust(other, trusted_keys([signed["pub"]]))
    assert caught.value.actual == load_public_key(signed["other_pub"]).fingerprint


def _refused_before_reading(signed, tmp_path, delta: Path, match: str, *, trust: bool = True) -> None:
    """apply refuses ``delta`` by its signature, before reading a tensor: the base is not even valid."""
    bogus = tmp_path / "bogus-base"
    bogus.mkdir(exist_ok=True)
    (bogus / "model.safetensors").write_bytes(b"not read")
    flags = ["--trust", signed["pub"]] if trust else []
    refused = deltakit_cli("apply", "--base", bogus, "--delta", delta, "--out", tmp_path / "never", *flags)
    assert refused.returncode == 1
    assert match in refused.stderr, refused.stderr
    assert not (tmp_path / "never").exists()


def test_a_manifest_edited_after_signing_is_refused(signed, tmp_path):
    delta = signed["delta"]
    manifest = json.loads((delta / "deltakit.json").read_text())
    manifest["target"]["name"] = "not-panda"
    (delta / "deltakit.json").write_text(json.dumps(manifest))
    with pytest.raises(SignatureError, match=r"deltakit\.json changed after it was signed"):
        signer_of(delta)
    _refused_before_reading(signed, tmp_path, delta, "deltakit.json changed after it was signed", trust=False)
    _refused_before_reading(signed, tmp_path, delta, "deltakit.json changed after it was signed")


def test_a_payload_swapped_for_another_signed_packages_is_refused(signed, tmp_path):
    other_target = write_checkpoint(tmp_path / "kiwi", finetune_of(llama_like(torch.float16), extra_vocab=3, seed=7))
    other = tmp_path / "other-delta"
    make_delta(signed["base"], other_target, other)
    sign_package(other, load_signing_key(signed["key"]), target=other_target)  # validly signed, same key
    payload = sorted(p.name for p in signed["delta"].glob("delta*.safetensors"))[0]
    assert (other / payload).read_bytes() != (signed["delta"] / payload).read_bytes()
    shutil.copy(other / payload, signed["delta"] / payload)
    with pytest.raises(SignatureError, match=re.escape(f"{payload} changed after it was signed")):
        check_trust(signed["delta"], trusted_keys([signed["pub"]]))
    _refused_before_reading(signed, tmp_path, signed["delta"], f"{payload} changed after it was signed")


def test_a_signature_over_a_subset_of_the_files_is_refused(signed, tmp_path):
    from deltakit.signing import _manifest, _package_digests, _sign

    delta = signed["delta"]
    digests = _package_digests(delta)
    del digests["files/config.json"]  # signed honestly, but not over every file
    _sign(load_signing_key(signed["key"]), delta, _manifest(delta.name, digests, [PACKAGE_SIGNATURE]),
          delta / PACKAGE_SIGNATURE)  # fmt: skip
    with pytest.raises(SignatureError, match=r"does not cover files/config\.json"):
        signer_of(delta)
    _refused_before_reading(signed, tmp_path, delta, "does not cover files/config.json")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_truncated_or_garbage_signature_is_refused(signed, tmp_path, damage):
    delta = signed["delta"]
    for name in (PACKAGE_SIGNATURE, MODEL_SIGNATURE):
        data = (delta / name).read_bytes()
        broken = {"truncated": data[: len(data) // 2], "garbage": b"\x00\xffnot json", "empty": b""}[damage]
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(delta, copy)
        (copy / name).write_bytes(broken)
        with pytest.raises(SignatureError, match=re.escape(name)):
            signer_of(copy)  # model.sig is covered by deltakit.sig: changed after signing
        if name == PACKAGE_SIGNATURE:
            _refused_before_reading(signed, tmp_path, copy, "is not a model-signing signature", trust=False)
    # a damaged model.sig next to a rebuilt model: model-signing's CLI refuses it
    out = tmp_path / "out"
    apply_delta(signed["base"], delta, out)
    (out / MODEL_SIGNATURE).write_bytes((out / MODEL_SIGNATURE).read_bytes()[:100])
    assert _model_signing_verify(out, signed["pub"]).returncode == 1


def test_a_signature_made_with_another_key_than_the_shipped_one_is_refused(signed):
    delta = signed["delta"]
    (delta / PACKAGE_KEY).write_bytes(signed["other_pub"].read_bytes())
    with pytest.raises(SignatureError, match=r"names the key .* but deltakit\.pub is"):
        signer_of(delta)


def test_keys_of_the_wrong_type_are_refused_by_name(signed, tmp_path):
    keys = tmp_path / "keys"
    rsa_key, rsa_pub = _keypair(keys, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ed_key, ed_pub = _keypair(keys, "ed", ed25519.Ed25519PrivateKey.generate())
    k1_key, _ = _keypair(keys, "k1", ec.generate_private_key(ec.SECP256K1()))
    for path, match in ((rsa_key, "RSA key"), (ed_key, "Ed25519 key"), (k1_key, "secp256k1")):
        with pytest.raises(KeyFileError, match=match) as caught:
            load_signing_key(path)
        assert caught.value.argument == "sign"
    with pytest.raises(KeyFileError, match="is a public key"):
        load_signing_key(signed["pub"])
    with pytest.raises(KeyFileError, match="holds a private key"):
        load_public_key(signed["key"])
    for path in (rsa_pub, ed_pub):
        with pytest.raises(KeyFileError):
            load_public_key(path)

    made = deltakit_cli("make", "--base", signed["base"], "--target", signed["target"], "--out", tmp_path / "d",
                        "--sign", rsa_key)  # fmt: skip
    assert made.returncode == 1 and "RSA key" in made.stderr and "openssl ecparam" in made.stderr
    assert not (tmp_path / "d").exists(), "the key is checked before any work"
    add = deltakit_cli("make", "--base", signed["base"], "--target", signed["target"], "--out", tmp_path / "d",
                       "--codec", "add", "--sign", signed["key"])  # fmt: skip
    assert add.returncode == 2 and "--codec add" in add.stderr and not (tmp_path / "d").exists()
    trust = deltakit_cli("verify", signed["delta"], "--trust", signed["key"])
    assert trust.returncode == 1 and "holds a private key" in trust.stderr and "-pubout" in trust.stderr


def test_republishing_signed_resigns_the_model_signature_with_the_new_key(signed, tmp_path):
    delta = signed["delta"]
    sign_package(delta, load_signing_key(signed["other_key"]))  # re-signed: no target at hand
    assert signer_of(delta).fingerprint == load_public_key(signed["other_pub"]).fingerprint
    out = tmp_path / "out"
    apply_delta(signed["base"], delta, out)
    assert _model_signing_verify(out, signed["other_pub"]).returncode == 0
    assert _model_signing_verify(out, signed["pub"]).returncode == 1


def test_apply_with_another_shard_size_writes_no_model_signature(signed, tmp_path):
    apply_delta(signed["base"], signed["delta"], tmp_path / "out", shard_size=3000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    assert not (tmp_path / "out" / MODEL_SIGNATURE).exists()


def _certificate(subject: str, key, issuer_key, issuer: str | None = None, *, ca: bool = False):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def test_certificate_signing_chains_to_a_trusted_ca(signed, tmp_path):
    pem = serialization.Encoding.PEM
    ca_key, leaf_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("Dandelion CA", ca_key, ca_key, ca=True)
    rogue = _certificate("Rogue CA", rogue_key, rogue_key, ca=True)
    leaf = _certificate("release@dandelion", leaf_key, ca_key, "Dandelion CA")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(ca.public_bytes(pem))
    (certs / "rogue.crt").write_bytes(rogue.public_bytes(pem))
    (certs / "leaf.crt").write_bytes(leaf.public_bytes(pem))
    (certs / "leaf.pem").write_bytes(_pem_private(leaf_key))

    delta = tmp_path / "cert-delta"
    make_delta(signed["base"], signed["target"], delta)
    key = load_signing_key(certs / "leaf.pem", certificate=certs / "leaf.crt", certificate_chain=[certs / "ca.crt"])
    sign_package(delta, key, target=signed["target"])
    found = signer_of(delta)
    assert found.subject == "CN=release@dandelion" and found.fingerprint == key.fingerprint
    assert check_trust(delta, trusted_keys([certs / "ca.crt"])) == found
    with pytest.raises(UntrustedSignerError, match="does not chain to a trusted CA"):
        check_trust(delta, trusted_keys([certs / "rogue.crt"]))
    with pytest.raises(UntrustedSignerError):
        check_trust(delta, trusted_keys([signed["pub"]]))
    (delta / "deltakit.json").write_text((delta / "deltakit.json").read_text().replace("panda", "pandb"))
    with pytest.raises(SignatureError, match=r"deltakit\.json changed after it was signed"):
        check_trust(delta, trusted_keys([certs / "ca.crt"]))

    (delta / "deltakit.json").write_text((delta / "deltakit.json").read_text().replace("pandb", "panda"))
    assert check_trust(delta, trusted_keys([certs / "ca.crt"])) == found  # as signed again
    out2 = tmp_path / "out"
    apply_delta(signed["base"], delta, out2)
    checked = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "certificate", str(out2),
         "--signature", str(out2 / MODEL_SIGNATURE), "--certificate_chain", str(certs / "ca.crt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def test_release_signs_what_it_publishes(signed, tmp_path):
    released = deltakit_cli("release", "--base", signed["base"], "--target", signed["target"], "--out",
                            tmp_path / "rel", "--repo", "dandelion/panda-7b-delta", "--sign", signed["key"],
                            "--dry-run", *CARD_FLAGS, "-q")  # fmt: skip
    assert released.returncode == 0, released.stderr
    assert signer_of(tmp_path / "rel").fingerprint == load_public_key(signed["pub"]).fingerprint
    assert "deltakit.sig" in released.stdout + released.stderr  # the dry run lists the signature among the files
