"""Make, apply and verify deltas: plan first, then stream chunk by chunk, hashing as bytes go by.

Memory is bounded by the chunks in flight (a few buffers of ``CHUNK_BYTES``), never by the model.
Outputs are built in a staging folder and renamed into place only once every digest has matched.
One module per job: :mod:`.make`, :mod:`.apply`, :mod:`.verify`; :mod:`.digests` holds what they share.
"""

from __future__ import annotations

from ..layout import DEFAULT_SHARD_SIZE
from .apply import ApplyPlan, ApplyReport, ApplyStep, apply_delta, plan_apply
from .digests import checkpoint_digests
from .make import MakeReport, make_delta
from .verify import Mismatch, VerifyReport, verify_delta, verify_model

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ApplyPlan",
    "ApplyReport",
    "ApplyStep",
    "MakeReport",
    "Mismatch",
    "VerifyReport",
    "apply_delta",
    "checkpoint_digests",
    "make_delta",
    "plan_apply",
    "verify_delta",
    "verify_model",
]
