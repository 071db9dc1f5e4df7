"""deltakit: release fine-tuned models as deltas against licensed base weights, rebuild them bit for bit.

The public surface is small: :func:`make_delta`, :func:`apply_delta`, :func:`verify_delta`,
:func:`verify_model` and :func:`inspect_path`, their reports, and the errors in :mod:`deltakit.errors`.
"""

__version__ = "0.2.0"  # 0.2: writes package format 2, which 0.1 cannot read

from .engine import (
    ApplyPlan,
    ApplyReport,
    MakeReport,
    Mismatch,
    VerifyReport,
    apply_delta,
    make_delta,
    plan_apply,
    verify_delta,
    verify_model,
)
from .errors import (
    BaseMismatchError,
    ClusterError,
    CorruptFrameError,
    DeltakitError,
    FormatError,
    HubError,
    InputNotFoundError,
    IntegrityError,
    KeyFileError,
    ManifestError,
    NoSpaceError,
    ObjectStoreError,
    OutputExistsError,
    RawWeightsError,
    SafetensorsHeaderError,
    SignatureError,
    UnsafePickleError,
    UnsupportedInputError,
    UntrustedSignerError,
)
from .inspection import Inspection, inspect_path
from .manifest import Manifest, load_manifest

# The name to install by: "deltakit" on PyPI is an unrelated quantum error-correction toolkit.
DISTRIBUTION = "deltakit-llm"

__all__ = [
    "ApplyPlan",
    "ApplyReport",
    "BaseMismatchError",
    "ClusterError",
    "CorruptFrameError",
    "DeltakitError",
    "FormatError",
    "HubError",
    "InputNotFoundError",
    "Inspection",
    "IntegrityError",
    "KeyFileError",
    "MakeReport",
    "Manifest",
    "ManifestError",
    "Mismatch",
    "NoSpaceError",
    "ObjectStoreError",
    "OutputExistsError",
    "RawWeightsError",
    "SafetensorsHeaderError",
    "SignatureError",
    "UnsafePickleError",
    "UnsupportedInputError",
    "UntrustedSignerError",
    "VerifyReport",
    "__version__",
    "apply_delta",
    "inspect_path",
    "load_manifest",
    "make_delta",
    "plan_apply",
    "verify_delta",
    "verify_model",
]
