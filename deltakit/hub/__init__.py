"""Publish delta packages to the Hugging Face Hub, with a model card, and fetch them back, checked.

Everything goes through huggingface_hub's own APIs: ``create_commit`` uploads only the LFS objects
the Hub lacks (so re-running an interrupted publish sends only what is missing), and
``hf_hub_download`` and ``snapshot_download`` keep their resumable cache and honour ``HF_HUB_OFFLINE``.
The token comes from ``HF_TOKEN`` or the huggingface_hub login, and is never logged.

    repo_ids.py   ORG/NAME[@REVISION] specs and the Hub's rule for a repo id
    card.py       the model card: its metadata, checked, and its text
    publish.py    verify a package and send what the repo lacks in one commit
    fetch.py      download a package (each file checked) or a model through the Hub cache
"""

from __future__ import annotations

from .card import CardMetadata, model_card, pipeline_tag
from .fetch import FetchedDelta, fetch_delta, fetch_model
from .publish import PublishReport, publish_delta
from .repo_ids import check_repo_id, is_repo_spec, parse_repo_spec

__all__ = [
    "CardMetadata",
    "FetchedDelta",
    "PublishReport",
    "check_repo_id",
    "fetch_delta",
    "fetch_model",
    "is_repo_spec",
    "model_card",
    "parse_repo_spec",
    "pipeline_tag",
    "publish_delta",
]
