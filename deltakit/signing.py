"""Signed releases: OpenSSF Model Signing (``model-signing``) signatures of delta packages and of the
models they rebuild, made and checked through model-signing's own signers and verifiers.

A signed package holds, beside its manifest, payload and carried files:

- ``model.sig``: a model-signing signature of the model ``apply`` will write (each output file's SHA-256,
  known at make time since the layout is deterministic); ``apply`` puts it next to the rebuilt model, where
  ``model_signing verify key MODEL --signature MODEL/model.sig --public_key PUB`` checks it alone.
- ``deltakit.pub``: the signer's public key (PEM), so that a signature is checked even where no key is trusted.
- ``deltakit.sig``: a model-signing signature of every other file of the package, written last.

Both signatures use model-signing's file serialization with SHA-256, as its CLI signs a folder. A signer is
named by its key's fingerprint: the SHA-256 of its SubjectPublicKeyInfo in PEM, the very key hint
model-signing writes into every key-signed bundle (:attr:`Signer.fingerprint`, :attr:`Signer.short`). A
package signed with a certificate names its certificate's key, and is trusted when its chain leads to a
trusted CA certificate.

Public API: :func:`load_signing_key` (and :func:`pkcs11_signing_key`), :func:`load_public_key`,
:func:`trusted_keys`, :func:`sign_package`, :func:`signer_of`, :func:`check_trust`, :func:`check_package`,
:func:`check_model`, :func:`carry_model_signature`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from .errors import InputNotFoundError, KeyFileError, SignatureError, UntrustedSignerError
from .formats.delta import FILES_DIR
from .hashing import file_sha256
from .layout import DEFAULT_SHARD_SIZE, INDEX_NAME, index_bytes, plan_output
from .manifest import MANIFEST_NAME, load_manifest

if TYPE_CHECKING:
    from model_signing import manifest as ms_manifest

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_SIGNATURE",
    "PACKAGE_KEY",
    "PACKAGE_SIGNATURE",
    "SIGNATURE_FILES",
    "TRUSTED_KEYS_DIR",
    "PublicKey",
    "SignedModel",
    "Signer",
    "SigningKey",
    "carry_model_signature",
    "check_model",
    "check_package",
    "check_trust",
    "load_public_key",
    "load_signing_key",
    "pkcs11_signing_key",
    "sign_package",
    "signer_of",
    "trusted_keys",
]

PACKAGE_SIGNATURE = "deltakit.sig"
PACKAGE_KEY = "deltakit.pub"
MODEL_SIGNATURE = "model.sig"
# What a signed package holds beside the files its manifest lists (published and fetched with them).
SIGNATURE_FILES = (PACKAGE_SIGNATURE, PACKAGE_KEY, MODEL_SIGNATURE)
# Under DELTAKIT_HOME: every *.pub in it is a trusted signer's public key.
TRUSTED_KEYS_DIR = "trusted_keys"
# What model-signing's CLI records when it signs a folder with its signature inside (`--signature
# MODEL/model.sig`): file serialization, SHA-256, no symlinks, git's files and the signature ignored.
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
_HASH = "sha256"
# A bundle is a few KiB per hundred files; anything far larger is not one.
_MAX_SIGNATURE_BYTES = 64 << 20
# The curves model-signing's key signer accepts.
_CURVES = ("secp256r1", "secp384r1", "secp521r1")


@dataclass(frozen=True)
class Signer:
    """Who signed: the fingerprint of the signing key (of the certificate's key, for a certificate).

    Attributes:
        fingerprint: hex SHA-256 of the public key's SubjectPublicKeyInfo in PEM: model-signing's key hint.
        subject: the certificate's subject, for a certificate signature.
    """

    fingerprint: str
    subject: str | None = None

    @property
    def short(self) -> str:
        """``SHA256:`` and the fingerprint in unpadded base64, as ``ssh-keygen -l`` shows keys."""
        return "SHA256:" + base64.b64encode(bytes.fromhex(self.fingerprint)).decode().rstrip("=")

    def __str__(self) -> str:
        return self.short + (f" ({self.subject})" if self.subject else "")


@dataclass(frozen=True)
class PublicKey:
    """A key trusted to sign packages: an EC public key (PEM) of a curve model-signing accepts, or, with
    ``certificate``, a CA certificate (PEM) that packages signed with certificates must chain to.

    Attributes:
        fingerprint: the key's (for a certificate: its public key's), as :attr:`Signer.fingerprint`.
    """

    path: Path
    pem: bytes = field(repr=False)
    fingerprint: str
    certificate: bool = False

    @property
    def signer(self) -> Signer:
        return Signer(self.fingerprint)


@dataclass(frozen=True)
class SigningKey:
    """How to sign: an EC private key (PEM), with a certificate and its chain, or a PKCS #11 URI.

    Build it with :func:`load_signing_key` or :func:`pkcs11_signing_key`, which check it first.
    """

    public_pem: bytes = field(repr=False)
    fingerprint: str
    private_key: Path | None = None
    password: str | None = field(default=None, repr=False)
    certificate: Path | None = None
    certificate_chain: tuple[Path, ...] = ()
    pkcs11_uri: str | None = None
    module_paths: tuple[str, ...] = ()

    @property
    def signer(self) -> Signer:
        return Signer(self.fingerprint)

    def _config(self) -> Any:
        """model-signing's signing configuration for this key."""
        from model_signing import signing

        config = signing.Config()  # type: ignore[no-untyped-call]
        if self.pkcs11_uri is not None:
            if self.certificate is not None:
                return config.use_pkcs11_certificate_signer(
                    pkcs11_uri=self.pkcs11_uri,
                    signing_certificate=self.certificate,
                    certificate_chain=self.certificate_chain,
                    module_paths=self.module_paths,
                )
            return config.use_pkcs11_signer(pkcs11_uri=self.pkcs11_uri, module_paths=self.module_paths)
        assert self.private_key is not None
        if self.certificate is not None:
            return config.use_certificate_signer(
                private_key=self.private_key,
                signing_certificate=self.certificate,
                certificate_chain=self.certificate_chain,
            )
        return config.use_elliptic_key_signer(private_key=self.private_key, password=self.password)


def _fingerprint(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def _read_key_file(path: Path, argument: str) -> bytes:
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such key file", path=path, argument=argument)
    data = path.read_bytes()
    if len(data) > 1 << 20:
        raise KeyFileError(f"{path} is {len(data)} bytes: not a PEM key", path=path, argument=argument)
    return data


def _check_ec(key: Any, path: Path, argument: str, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if hasattr(key, "public_key") and not isinstance(key, ec.EllipticCurvePublicKey) else key
    if not isinstance(public, ec.EllipticCurvePublicKey):
        kind = type(public).__name__.removeprefix("_").replace("PublicKey", "") or "unknown"
        raise KeyFileError(
            f"{path} is an {kind} key; signatures take an elliptic-curve {what} ({', '.join(_CURVES)})",
            path=path,
            expected="EC",
            actual=kind,
            argument=argument,
        )
    if public.curve.name not in _CURVES:
        raise KeyFileError(
            f"{path} is an EC key on {public.curve.name}; model-signing takes {', '.join(_CURVES)}",
            path=path,
            expected=_CURVES,
            actual=public.curve.name,
            argument=argument,
        )


def load_signing_key(
    private_key: str | Path,
    *,
    password: str | None = None,
    certificate: str | Path | None = None,
    certificate_chain: Iterable[str | Path] = (),
) -> SigningKey:
    """Load and check an EC private key (PEM) to sign with; with ``certificate``, sign as that
    certificate (whose public key must be the key's), its ``certificate_chain`` shipped in the signature.

    Raises:
        InputNotFoundError: a file does not exist.
        KeyFileError: the file is no PEM private key (a public key, garbage), or an RSA/ed25519 key, or an EC
            key on a curve model-signing does not take, or the certificate is not the key's.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    path = Path(private_key)
    data = _read_key_file(path, "sign")
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
    except (ValueError, TypeError) as e:
        what = "a public key" if b"PUBLIC KEY" in data else "no PEM private key"
        if b"ENCRYPTED" in data and password is None:
            what = "an encrypted private key, and no password was given"
        raise KeyFileError(
            f"{path} is {what}; --sign takes the publisher's EC private key (PEM)", path=path, argument="sign"
        ) from e
    _check_ec(key, path, "sign", "private key")
    public = key.public_key()
    cert_path = Path(certificate) if certificate is not None else None
    chain = tuple(Path(c) for c in certificate_chain)
    if cert_path is not None:
        try:
            cert = x509.load_pem_x509_certificate(_read_key_file(cert_path, "certificate"))
        except ValueError as e:
            raise KeyFileError(f"{cert_path} is no PEM certificate", path=cert_path, argument="certificate") from e
        if cert.public_key() != public:
            raise KeyFileError(f"{cert_path} certifies another key than {path}", path=cert_path, argument="certificate")
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(
        pem, _fingerprint(public), path, password=password, certificate=cert_path, certificate_chain=chain
    )


def pkcs11_signing_key(
    uri: str,
    public_key: str | Path,
    *,
    module_paths: Iterable[str] = (),
    certificate: str | Path | None = None,
    certificate_chain: Iterable[str | Path] = (),
) -> SigningKey:
    """A key held in a PKCS #11 token (``pkcs11:...``), signed with through model-signing's PKCS #11
    signer (the ``model-signing[pkcs11]`` extra); ``public_key`` is its public half, shipped in the package.

    Raises:
        KeyFileError: ``public_key`` is not an EC public key model-signing takes.
    """
    public = load_public_key(public_key)
    return SigningKey(
        public.pem,
        public.fingerprint,
        pkcs11_uri=uri,
        module_paths=tuple(module_paths),
        certificate=Path(certificate) if certificate is not None else None,
        certificate_chain=tuple(Path(c) for c in certificate_chain),
    )


def load_public_key(path: str | Path, *, argument: str = "trust") -> PublicKey:
    """Load and check a signer's EC public key (PEM), or a CA certificate (PEM) to trust signing certificates by.

    Raises:
        InputNotFoundError: the file does not exist.
        KeyFileError: it is a private key, no PEM public key, or not an EC key model-signing takes.
    """
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    data = _read_key_file(path, argument)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} holds a private key; trust takes the signer's public key "
            f"(`openssl ec -in {path.name} -pubout`), and a private key is never shared",
            path=path,
            argument=argument,
        )
    if b"BEGIN CERTIFICATE" in data:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise KeyFileError(f"{path} is no PEM certificate", path=path, argument=argument) from e
        return PublicKey(path, data, _fingerprint(cert.public_key()), certificate=True)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyFileError(f"{path} is no PEM public key", path=path, argument=argument) from e
    _check_ec(key, path, argument, "public key")
    return PublicKey(path, data, _fingerprint(key))


def trusted_keys(paths: Iterable[str | Path] = (), *, home: Path | None = None) -> tuple[PublicKey, ...]:
    """The keys ``paths`` name (a file, or a folder of ``*.pub`` keys and ``*.crt`` CA certificates), then
    every ``*.pub`` and ``*.crt`` in ``$DELTAKIT_HOME/trusted_keys/``; empty when neither names any, which
    means: trust is not asked for.

    Raises:
        KeyFileError: a named key, or one in the trust folder, is not an EC public key.
    """
    from .registry import deltakit_home

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted([*p.glob("*.pub"), *p.glob("*.crt")]) if p.is_dir() else [p])
    folder = (home if home is not None else deltakit_home()) / TRUSTED_KEYS_DIR
    if folder.is_dir():
        files.extend(sorted([*folder.glob("*.pub"), *folder.glob("*.crt")]))
    keys: dict[str, PublicKey] = {}
    for f in files:
        key = load_public_key(f)
        keys.setdefault(key.fingerprint, key)
    return tuple(keys.values())


# -------------------------------------------------------------------------------------------------
# Signing


def _serialization(ignored: Sequence[str]) -> ms_manifest.SerializationType:
    from model_signing import manifest as msm

    return msm.SerializationType.from_args(
        {"method": "files", "hash_type": _HASH, "allow_symlinks": False, "ignore_paths": [*_GIT_PATHS, *ignored]}
    )


def _manifest(name: str, digests: dict[str, str], ignored: Sequence[str]) -> ms_manifest.Manifest:
    """A model-signing manifest of files whose SHA-256 are known without reading them again."""
    from model_signing import manifest as msm
    from model_signing._hashing.hashing import Digest  # the manifest's own digest type

    items = [
        msm.FileManifestItem(path=PurePosixPath(rel), digest=Digest(_HASH, bytes.fromhex(sha)))
        for rel, sha in sorted(digests.items())
    ]
    return msm.Manifest(name, items, _serialization(ignored))


def _sign(key: SigningKey, folder: Path, manifest: ms_manifest.Manifest, signature: Path) -> None:
    """Sign ``manifest`` with model-signing's signer for ``key``, into ``signature`` (temp name, then rename).

    model-signing's signing configuration hashes the folder it is given; here the digests are known
    already (make computed them, or the files are not written yet), so its hashing step returns them.
    """
    from model_signing import hashing

    class _Known(hashing.Config):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]

        def hash(self, model_path: Any, *, files_to_hash: Any = None) -> ms_manifest.Manifest:
            return manifest

    temp = signature.with_name(f".{signature.name}.{os.getpid()}.tmp")
    try:
        key._config().set_hashing_config(_Known()).sign(folder, temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, signature)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _package_digests(package: Path) -> dict[str, str]:
    """The SHA-256 of every file a package's signature covers, from its manifest's records (payload,
    carried files) and hashed now (the manifest, the key, the model signature)."""
    m = load_manifest(package)
    digests = {name: r.sha256 for name, r in m.payload.items()}
    digests.update({f"{FILES_DIR}/{rel}": r.sha256 for rel, r in m.target.files.items()})
    for name in (MANIFEST_NAME, PACKAGE_KEY, MODEL_SIGNATURE):
        if (package / name).is_file():
            digests[name] = file_sha256(package / name)[0]
    return digests


def _model_digests(package: Path, target: Path, shard_size: int) -> dict[str, str]:
    """The SHA-256 of each file ``apply --shard-size shard_size`` writes: the shards as laid out from the
    manifest, filled with the target's tensor bytes (each checked against its manifest digest), the
    index, and the carried files."""
    from .formats.checkpoint import RangeReader, open_checkpoint
    from .formats.safetensors import TensorSpec
    from .hashing import TensorHasher
    from .reading import CHUNK_BYTES

    m = load_manifest(package)
    ckpt = open_checkpoint(target)
    specs = [TensorSpec(n, t.dtype, t.shape) for n, t in m.target.tensors.items()]
    shards, shard_of = plan_output(specs, shard_size)
    digests: dict[str, str] = {}
    buffers = (bytearray(CHUNK_BYTES), bytearray(CHUNK_BYTES))
    # SHA-256 (what model.sig signs) and BLAKE3 (the check against the manifest) of each chunk run on two
    # threads at once (both release the GIL), while the next chunk is read into the other buffer
    with RangeReader() as reader, ThreadPoolExecutor(1, thread_name_prefix="deltakit-sign") as pool:
        for index, shard in enumerate(shards):
            sha = hashlib.sha256(shard.layout.header)
            for spec in specs:
                if shard_of[spec.name] != index:
                    continue
                info = ckpt.tensors.get(spec.name)
                check = TensorHasher()
                if info is not None and info.nbytes == spec.nbytes:
                    pending: Future[None] | None = None
                    for k, offset in enumerate(range(info.start, info.end, CHUNK_BYTES)):
                        view = memoryview(buffers[k % 2])[: min(CHUNK_BYTES, info.end - offset)]
                        reader.read_into(info.path, offset, view)
                        if pending is not None:
                            pending.result()
                        pending = pool.submit(check.update, view)
                        sha.update(view)
                    if pending is not None:
                        pending.result()
                if info is None or check.hexdigest() != m.target.tensors[spec.name].digest:
                    # the `add` codec rebuilds other bytes than the target's: only apply knows them
                    raise SignatureError(
                        f"tensor {spec.name!r} of {target} is not what apply rebuilds (encoding "
                        f"{m.target.tensors[spec.name].encoding}); the rebuilt model cannot be signed at make time",
                        path=target,
                        tensor=spec.name,
                        argument="sign",
                    )
            digests[shard.name] = sha.hexdigest()
    if len(shards) > 1:
        digests[INDEX_NAME] = hashlib.sha256(index_bytes(shards, shard_of, specs)).hexdigest()
    digests.update({rel: r.sha256 for rel, r in m.target.files.items()})
    return digests


def sign_package(
    package: str | Path, key: SigningKey, *, target: str | Path | None = None, shard_size: int = DEFAULT_SHARD_SIZE
) -> Signer:
    """Sign a delta package with ``key``: the rebuilt model (``model.sig``), the key (``deltakit.pub``),
    then every file of the package (``deltakit.sig``, written last, atomically).

    Args:
        target: the fine-tune the package was made from: its tensors fill the output shards whose SHA-256
            ``model.sig`` signs. Without it, a package already holding a ``model.sig`` has the digests that
            one lists signed again with ``key`` (re-signing); one without gets no ``model.sig``.
        shard_size: the output shard size the model signature is for (apply's default).

    Raises:
        SignatureError: a target tensor is not what apply rebuilds (the ``add`` codec), or a ``model.sig``
            to re-sign is unreadable.
    """
    root = Path(package)
    load_manifest(root)  # a package, before anything is written into it
    # An earlier deltakit.sig stays until the new one replaces it: a run cut short leaves a package whose
    # signature no longer matches (refused), never one that looks unsigned.
    model_digests: dict[str, str] | None = None
    if target is not None:
        model_digests = _model_digests(root, Path(target), shard_size)
    elif (root / MODEL_SIGNATURE).is_file():
        model_digests = _digests_of(_signed_manifest_unverified(root / MODEL_SIGNATURE))
    if model_digests is not None:
        name = load_manifest(root).target.name
        _sign(key, root, _manifest(name, model_digests, [MODEL_SIGNATURE]), root / MODEL_SIGNATURE)
    _write_atomic(root / PACKAGE_KEY, key.public_pem)
    _sign(key, root, _manifest(root.name, _package_digests(root), [PACKAGE_SIGNATURE, "README.md"]),
          root / PACKAGE_SIGNATURE)  # fmt: skip
    return key.signer


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------------------
# Checking


def _read_bundle(path: Path) -> Any:
    """model-signing's signature at ``path``, parsed (not yet verified).

    Raises:
        SignatureError: truncated, garbage, or not a model-signing bundle.
    """
    from model_signing._signing import sign_sigstore_pb

    size = path.stat().st_size
    if size > _MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path} is {size} bytes: not a signature", path=path)
    try:
        signature = sign_sigstore_pb.Signature.read(path)
        bundle = signature.bundle
        if bundle.dsse_envelope is None or not bundle.dsse_envelope.signatures:
            raise ValueError("no DSSE envelope with a signature")
    except Exception as e:  # model-signing raises what its JSON and protobuf readers raise
        raise SignatureError(
            f"{path} is not a model-signing signature (truncated or damaged: {type(e).__name__}: {e})", path=path
        ) from e
    return signature


def _bundle_signer(signature: Any, path: Path) -> Signer:
    """The signer a bundle names: its key hint, or its certificate's key and subject."""
    from cryptography import x509

    material = signature.bundle.verification_material
    chain = getattr(material, "x509_certificate_chain", None)
    if chain is not None and chain.certificates:
        raw = chain.certificates[0].raw_bytes
        cert = x509.load_der_x509_certificate(base64.b64decode(raw) if isinstance(raw, str) else raw)
        return Signer(_fingerprint(cert.public_key()), cert.subject.rfc4514_string())
    hint = material.public_key.hint if material.public_key is not None else None
    if not hint:
        raise SignatureError(f"{path} names no signing key (no key hint, no certificate)", path=path)
    return Signer(str(hint))


def _verify_bundle(signature: Any, pem: bytes, path: Path, signer: Signer) -> ms_manifest.Manifest:
    """Check ``signature`` through model-signing's verifier; the signed manifest. ``pem`` is the public key
    for a key signature, the trusted certificates (CA, PEM) for a certificate signature."""
    import tempfile

    from model_signing._signing import sign_certificate, sign_ec_key

    with tempfile.TemporaryDirectory(prefix="deltakit-key-") as tmp:
        key_file = Path(tmp) / "trusted.pem"
        key_file.write_bytes(pem)
        try:
            if signer.subject is not None:
                verifier: Any = sign_certificate.Verifier([key_file])
            else:
                verifier = sign_ec_key.Verifier(key_file)
            return verifier.verify(signature)  # type: ignore[no-any-return]
        except Exception as e:  # model-signing's verifiers raise ValueError, InvalidSignature, OpenSSL errors
            what = "the certificates trusted" if signer.subject is not None else f"the key of {signer}"
            raise SignatureError(
                f"{path} does not verify with {what}: {type(e).__name__}: {e}",
                path=path,
                actual=signer.fingerprint,
            ) from e


def _shipped_root(signature: Any) -> bytes:
    """The last certificate of a certificate signature's own chain, in PEM: what it claims to chain to."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    raw = signature.bundle.verification_material.x509_certificate_chain.certificates[-1].raw_bytes
    cert = x509.load_der_x509_certificate(base64.b64decode(raw) if isinstance(raw, str) else raw)
    return cert.public_bytes(serialization.Encoding.PEM)


def _signed_manifest_unverified(path: Path) -> ms_manifest.Manifest:
    """The manifest a bundle carries, read without checking who signed it (to re-sign its digests)."""
    from model_signing._signing import signing as ms_signing

    signature = _read_bundle(path)
    try:
        payload = json.loads(signature.bundle.dsse_envelope.payload)
        return ms_signing.dsse_payload_to_manifest(payload)
    except Exception as e:
        raise SignatureError(f"{path} carries no model-signing manifest: {e}", path=path) from e


def _digests_of(manifest: ms_manifest.Manifest) -> dict[str, str]:
    params = manifest.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != _HASH:
        raise SignatureError(f"signature is over {params.get('method')}/{params.get('hash_type')}, not files/sha256")
    return {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}


def _compare(path: Path, signed: dict[str, str], actual: dict[str, str], signer: Signer) -> None:
    """Refuse a package whose files are not exactly those the signature lists, with their SHA-256."""
    uncovered = sorted(set(actual) - set(signed))
    if uncovered:
        raise SignatureError(
            f"{path} (signer {signer}) does not cover {uncovered[0]}"
            + (f" and {len(uncovered) - 1} more files" if len(uncovered) > 1 else "")
            + ": the signature is over a subset of the package",
            path=path,
            actual=signer.fingerprint,
        )
    absent = sorted(set(signed) - set(actual))
    if absent:
        raise SignatureError(
            f"{path} (signer {signer}) lists {absent[0]}, which the package lacks", path=path, actual=signer.fingerprint
        )
    for name in sorted(signed):
        if signed[name] != actual[name]:
            raise SignatureError(
                f"{name} changed after it was signed by {signer}: sha256 {actual[name][:16]}..., signed "
                f"{signed[name][:16]}...",
                path=path.parent / name,
                expected=signed[name],
                actual=actual[name],
            )


def _package_signature(package: Path) -> tuple[Any, Signer] | None:
    sig = package / PACKAGE_SIGNATURE
    if not sig.is_file():
        return None
    signature = _read_bundle(sig)
    return signature, _bundle_signer(signature, sig)


def signer_of(package: str | Path) -> Signer | None:
    """Who signed a package, once its signature is checked with the key it ships; None when unsigned.

    The files are compared with the signature through the SHA-256 the (signed) manifest records for the
    payload and carried files, which apply and verify check as they read them; the manifest, the key and
    ``model.sig`` are hashed here. This proves the package is as its signer left it; who that signer is
    worth trusting is :func:`check_trust`'s question.

    Raises:
        SignatureError: the signature is damaged, does not verify, does not cover every file, or a file
            changed after signing (the manifest edited, a payload record swapped).
    """
    root = Path(package)
    found = _package_signature(root)
    if found is None:
        return None
    signature, signer = found
    sig = root / PACKAGE_SIGNATURE
    if signer.subject is None:
        key_file = root / PACKAGE_KEY
        if not key_file.is_file():
            raise SignatureError(f"{sig} is signed by {signer}, but {PACKAGE_KEY} is missing", path=sig)
        shipped = load_public_key(key_file, argument="delta")
        if shipped.fingerprint != signer.fingerprint:
            raise SignatureError(
                f"{sig} names the key {signer}, but {PACKAGE_KEY} is {shipped.signer}",
                path=sig,
                actual=signer.fingerprint,
            )
        pem = shipped.pem
    else:  # checked against the chain it ships: intact, though who the CA is worth is check_trust's question
        pem = _shipped_root(signature)
    signed = _digests_of(_verify_bundle(signature, pem, sig, signer))
    _compare(sig, signed, _package_digests(root), signer)
    return signer


def check_trust(package: str | Path, trusted: Sequence[PublicKey]) -> Signer:
    """Refuse a package unless one of ``trusted`` signed it and every file is as signed: checked before
    any tensor is read, each file hashed (SHA-256) by model-signing against the signed manifest.

    Raises:
        UntrustedSignerError: the package is unsigned, or signed by a key not in ``trusted`` (the
            message and ``actual`` name the signer found).
        SignatureError: the signature is damaged, does not verify, covers a subset, or a file changed.
    """
    from model_signing import hashing

    root = Path(package)
    found = _package_signature(root)
    names = ", ".join(k.signer.short for k in trusted)
    if found is None:
        raise UntrustedSignerError(
            f"{root} is not signed ({PACKAGE_SIGNATURE} is absent), and a signer is required: {names}",
            path=root,
            expected=[k.fingerprint for k in trusted],
        )
    signature, signer = found
    sig = root / PACKAGE_SIGNATURE
    key = next((k for k in trusted if k.fingerprint == signer.fingerprint and not k.certificate), None)
    if key is not None and signer.subject is None:
        signed = _digests_of(_verify_bundle(signature, key.pem, sig, signer))
    elif signer.subject is not None:
        # a certificate: its signing key trusted as such, else its chain must lead to a trusted CA
        signed = _digests_of(_verify_bundle(signature, _shipped_root(signature), sig, signer))
        authorities = b"".join(k.pem for k in trusted if k.certificate)
        if key is None:
            try:
                if not authorities:
                    raise SignatureError("no CA certificate is trusted")
                _verify_bundle(signature, authorities, sig, signer)
            except SignatureError as e:
                raise UntrustedSignerError(
                    f"{root} is signed by the certificate of {signer}, which does not chain to a trusted CA "
                    f"certificate (trusted: {names})",
                    path=root,
                    expected=[k.fingerprint for k in trusted],
                    actual=signer.fingerprint,
                ) from e
    else:
        raise UntrustedSignerError(
            f"{root} is signed by {signer}, which is not a trusted key (trusted: {names})",
            path=root,
            expected=[k.fingerprint for k in trusted],
            actual=signer.fingerprint,
        )
    expected = _package_digests(root)  # the files the package holds, by its manifest
    _compare(sig, signed, {name: signed.get(name, "") for name in expected}, signer)  # coverage first
    missing = sorted(name for name in expected if not (root / name).is_file())
    if missing:
        raise SignatureError(f"{root} lacks {missing[0]}, which its manifest lists", path=root / missing[0])
    try:
        hashed = (
            hashing.Config()  # type: ignore[no-untyped-call]
            .use_file_serialization(hashing_algorithm="sha256")
            .set_allow_symlinks(True)  # the Hub cache links to blobs
            .hash(root, files_to_hash=[root / name for name in expected])
        )
    except (OSError, ValueError) as e:  # model-signing refuses what is not a regular file (a link out, a folder)
        raise SignatureError(f"{root}: cannot hash its files: {e}", path=root) from e
    _compare(sig, signed, _digests_of(hashed), signer)
    return signer


def check_package(package: str | Path, trusted: Sequence[PublicKey] = ()) -> Signer | None:
    """The check apply, verify, download and inspect run first: with ``trusted`` keys :func:`check_trust`,
    else :func:`signer_of` (a signed package's signature must still verify)."""
    return check_trust(package, trusted) if trusted else signer_of(package)


@dataclass(frozen=True)
class SignedModel:
    """A model folder's signature, checked: who signed it, and the SHA-256 it signed for each file (by path
    in the folder, ``model.sig`` itself aside), for a reader of the folder to hold what it read later to."""

    signer: Signer
    sha256: dict[str, str]


def check_model(folder: str | Path, trusted: Sequence[PublicKey]) -> SignedModel:
    """Refuse a model folder unless its ``model.sig`` (as ``apply`` writes it, or ``model_signing sign``)
    was made by one of ``trusted`` keys and covers every file as it is now (each hashed, SHA-256).

    Raises:
        UntrustedSignerError: no ``model.sig``, or one by a key not in ``trusted`` (named by fingerprint).
        SignatureError: the signature is damaged, does not verify, covers a subset, or a file changed.
    """
    from model_signing import hashing

    root = Path(folder)
    sig = root / MODEL_SIGNATURE
    names = ", ".join(k.signer.short for k in trusted)
    expected = [k.fingerprint for k in trusted]
    if not sig.is_file():
        raise UntrustedSignerError(
            f"{root} is not signed ({MODEL_SIGNATURE} is absent), and a signer is required: {names}",
            path=root,
            expected=expected,
        )
    signature = _read_bundle(sig)
    signer = _bundle_signer(signature, sig)
    key = next((k for k in trusted if k.fingerprint == signer.fingerprint and not k.certificate), None)
    if key is None or signer.subject is not None:
        raise UntrustedSignerError(
            f"{root} is signed by {signer}, which is not a trusted key (trusted: {names})",
            path=root,
            expected=expected,
            actual=signer.fingerprint,
        )
    signed = _digests_of(_verify_bundle(signature, key.pem, sig, signer))
    try:
        hashed = (
            hashing.Config()  # type: ignore[no-untyped-call]
            .use_file_serialization(hashing_algorithm="sha256")
            .set_ignored_paths(paths=[MODEL_SIGNATURE])  # relative to the folder, as model_signing sign takes it
            .hash(root)
        )
    except (OSError, ValueError) as e:  # model-signing refuses what is not a regular file (a link out, a folder)
        raise SignatureError(f"{root}: cannot hash its files: {e}", path=root) from e
    _compare(sig, signed, _digests_of(hashed), signer)
    return SignedModel(signer, signed)


def carry_model_signature(package: str | Path, folder: Path, shard_of: dict[str, int]) -> bool:
    """Copy the package's ``model.sig`` next to a model rebuilt from it into ``folder`` when the model is
    laid out as signed (apply's default shard size); returns whether it did."""
    source = Path(package) / MODEL_SIGNATURE
    if not source.is_file():
        return False
    m = load_manifest(package)
    from .formats.safetensors import TensorSpec

    specs = [TensorSpec(n, t.dtype, t.shape) for n, t in m.target.tensors.items()]
    if plan_output(specs, DEFAULT_SHARD_SIZE)[1] != shard_of:
        log.info("not writing %s: the model is sharded otherwise than the signed layout", MODEL_SIGNATURE)
        return False
    _write_atomic(folder / MODEL_SIGNATURE, source.read_bytes())
    return True
