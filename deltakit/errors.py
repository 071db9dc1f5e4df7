"""Every error deltakit raises on purpose, in one tree.

Each class also inherits the builtin a caller would naturally catch, and carries the facts a
message needs (``path``, ``tensor``, ``expected``, ``actual``) as attributes::

    DeltakitError
    ├── InputNotFoundError      (FileNotFoundError)  a named input does not exist
    ├── UnsupportedInputError   (ValueError)         exists, but is no kind deltakit reads
    │   ├── RawWeightsError                          make would publish weights raw (swapped or wrong base)
    │   └── KeyFileError                             a key is not the kind asked for (RSA, public for private...)
    ├── FormatError             (ValueError)         a file breaks its format's rules
    │   ├── SafetensorsHeaderError                   a hostile or corrupt safetensors header
    │   ├── UnsafePickleError                        a .bin/.pth pickle asks for more than tensors
    │   └── ManifestError                            deltakit.json is missing fields or malformed
    ├── IntegrityError          (ValueError)         bytes differ from the digest they must have
    │   ├── BaseMismatchError                        the base is not the one the delta was made from
    │   ├── CorruptFrameError                        a compressed payload frame does not decode
    │   └── SignatureError                           a signature is damaged, does not verify or cover the files
    │       └── UntrustedSignerError                 unsigned, or signed by a key that is not trusted
    ├── OutputExistsError       (FileExistsError)    refusing to touch an existing output
    ├── NoSpaceError            (OSError)            the output would not fit on its disk
    ├── HubError                (RuntimeError)       the Hub refused a request or cannot be reached
    ├── ObjectStoreError        (RuntimeError)       an S3 bucket refused a request or cannot be reached
    └── ClusterError            (RuntimeError)       a Ray cluster could not do the work
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BaseMismatchError",
    "ClusterError",
    "CorruptFrameError",
    "DeltakitError",
    "FormatError",
    "HubError",
    "InputNotFoundError",
    "IntegrityError",
    "KeyFileError",
    "ManifestError",
    "NoSpaceError",
    "ObjectStoreError",
    "OutputExistsError",
    "RawWeightsError",
    "SafetensorsHeaderError",
    "SignatureError",
    "UnsafePickleError",
    "UnsupportedInputError",
    "UntrustedSignerError",
]


class DeltakitError(Exception):
    """Root of every error deltakit raises on purpose.

    Args:
        message: one line saying what failed and, where it helps, what to do.
        path: the file or folder concerned, if any.
        tensor: the tensor concerned, if any.
        expected: what deltakit required (a digest, a dtype, a shape...).
        actual: what it found instead.
        argument: the parameter of the call that the error is about, by its Python name (``out``,
            ``quant``, ``base``...), so that a face can say what to change in its own words: the CLI
            names its flag (``--out``), the service its JSON field (``output``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        expected: object = None,
        actual: object = None,
        argument: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        self.expected = expected
        self.actual = actual
        self.argument = argument

    def __str__(self) -> str:
        return self.message


class InputNotFoundError(DeltakitError, FileNotFoundError):
    """A base, target, delta or model that was named does not exist."""


class UnsupportedInputError(DeltakitError, ValueError):
    """The input exists but holds nothing deltakit can read (no weights, an unknown layout)."""


class RawWeightsError(UnsupportedInputError):
    """A delta of this base and target would store weights as they are rather than as differences: the
    target has fewer rows than the base (the two look swapped), or most of it has no counterpart in the
    base. Such a package publishes whole weights, perhaps the licensed base's."""


class KeyFileError(UnsupportedInputError):
    """A key file is not the kind asked for: a public key where a private one signs, a private key given as
    a trusted one, an RSA or ed25519 key where model-signing takes an elliptic-curve key, or no PEM key."""


class FormatError(DeltakitError, ValueError):
    """A file breaks the rules of its format."""


class SafetensorsHeaderError(FormatError):
    """A safetensors header is oversized, malformed, or describes data the file does not hold."""


class UnsafePickleError(FormatError):
    """A PyTorch pickle asks for objects beyond tensors and plain containers; it is not loaded."""


class ManifestError(FormatError):
    """A delta's ``deltakit.json`` is missing, malformed, or of an unknown format version."""


class IntegrityError(DeltakitError, ValueError):
    """Bytes on disk differ from the digest or size they are recorded with."""


class BaseMismatchError(IntegrityError):
    """The base model is not the one the delta was made from (another model or another conversion)."""


class CorruptFrameError(IntegrityError):
    """A format 2 payload frame does not decode to the size its record gives (truncated, altered,
    or a decompression bomb); ``tensor`` names the tensor, ``actual`` the frame's byte offset."""


class SignatureError(IntegrityError):
    """A signature (``deltakit.sig``, ``model.sig``) is truncated or garbage, does not verify with its key,
    does not cover every file, or a file changed after signing; ``path`` names the file concerned."""


class UntrustedSignerError(SignatureError):
    """Trusted signers were asked for, and the package is unsigned or signed by another key; ``actual`` is
    the signer's fingerprint found (None when unsigned), ``expected`` the trusted ones."""


class OutputExistsError(DeltakitError, FileExistsError):
    """The output path exists and is not empty; deltakit never deletes or overwrites it."""


class NoSpaceError(DeltakitError, OSError):
    """The output needs more bytes (``expected``) than its disk has free (``actual``); nothing was written."""


class HubError(DeltakitError, RuntimeError):
    """The Hub refused or failed a request: authentication, a missing repo or revision, the network."""


class ObjectStoreError(DeltakitError, RuntimeError):
    """An object store (an S3-compatible bucket) refused or failed a request: no such bucket, credentials
    it does not accept, an endpoint that cannot be reached. The message names the bucket (and key)."""


class ClusterError(DeltakitError, RuntimeError):
    """A Ray cluster could not do the work: a worker cannot see the shared paths, or one died more
    often than its task may be retried. Nothing is left under the output's name."""
