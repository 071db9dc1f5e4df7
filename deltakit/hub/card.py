"""The model card of a published delta: the Hub metadata (checked as the Hub checks it) and how to rebuild it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import DISTRIBUTION, __version__
from ..dtypes import itemsize
from ..errors import UnsupportedInputError
from ..manifest import Manifest
from ..units import human_bytes
from .repo_ids import check_repo_id

if TYPE_CHECKING:
    from ..signing import Signer

__all__ = ["CardMetadata", "model_card", "pipeline_tag"]

# The Hub's pipeline_tag for a transformers architecture, by the suffix of its class name.
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)
# The forms of a Hub license id, a license_name and an ISO 639 language code (with its subtags).
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def pipeline_tag(config: dict[str, Any] | None) -> str | None:
    """``text-generation`` for a ``*ForCausalLM`` config, and so on; None when the architecture says nothing."""
    architectures = (config or {}).get("architectures")
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        return None
    return next((tag for suffix, tag in _PIPELINE_TAGS if architectures[0].endswith(suffix)), None)


@dataclass(frozen=True)
class CardMetadata:
    """What a model card says beyond the manifest, checked as the Hub checks it.

    Attributes:
        base_model: the base's Hub repo id (``huggyllama/llama-7b``): the Hub's model tree links it.
        license: a Hub license id; ``other`` needs ``license_name`` and ``license_link``.
        language: ISO 639 codes (``en``, ``zh``).
        datasets: Hub dataset ids the fine-tune was trained on.
    """

    base_model: str
    license: str = "other"
    license_name: str | None = None
    license_link: str | None = None
    language: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_repo_id(self.base_model, f"base_model {self.base_model!r}", argument="base_model")
        if self.license == "other" and not (self.license_name and self.license_link):
            raise UnsupportedInputError(
                "license 'other' needs a license_name (a short id, such as llama-license) and a license_link "
                "(a URL, or the path of a license file in the repo)",
                argument="license_link" if self.license_name else "license_name",
            )
        if self.license_name is not None and not _LICENSE_NAME.match(self.license_name):
            raise UnsupportedInputError(
                f"license name {self.license_name!r} must be a short lowercase id: letters, digits, '.', '_', '-'",
                argument="license_name",
            )
        if not _LICENSE.match(self.license):
            raise UnsupportedInputError(
                f"license {self.license!r} is not a Hub license id (apache-2.0, llama2, other)", argument="license"
            )
        for code in self.language:
            if not _LANGUAGE.match(code):
                raise UnsupportedInputError(
                    f"language {code!r} is not an ISO 639 code such as en or zh", argument="language"
                )
        for dataset in self.datasets:
            check_repo_id(dataset, f"dataset {dataset!r}", argument="datasets")


def model_card(
    manifest: Manifest,
    repo_id: str,
    metadata: CardMetadata,
    *,
    config: dict[str, Any] | None = None,
    signer: Signer | None = None,
) -> str:
    """The ``README.md`` of a published delta: metadata for the Hub, and how to rebuild and check it.

    Args:
        config: the fine-tune's ``config.json``, from which the card's ``pipeline_tag`` comes.
        signer: who signed the package (its signature checked), shown with how to require that signer.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=metadata.base_model,
        base_model_relation="finetune",  # else the Hub's model tree guesses (an adapter? a quantization?)
        library_name="deltakit",
        license=metadata.license,
        license_name=metadata.license_name,
        license_link=metadata.license_link,
        language=list(metadata.language) or None,
        datasets=list(metadata.datasets) or None,
        pipeline_tag=pipeline_tag(config),
        tags=["deltakit", "delta"],
    )
    counts: dict[str, tuple[int, int]] = {}
    for t in manifest.target.tensors.values():
        n, size = counts.get(t.encoding, (0, 0))
        nbytes = 0 if t.encoding == "copy" else t.coded_bytes if t.frames is not None else _nbytes(t.dtype, t.shape)
        counts[t.encoding] = (n + 1, size + nbytes)
    rows = "\n".join(f"| `{e}` | {n} | {human_bytes(size)} |" for e, (n, size) in sorted(counts.items()))
    payload = sum(f.size for f in manifest.payload.values())
    model = sum(_nbytes(t.dtype, t.shape) for t in manifest.target.tensors.values())
    coding = "losslessly compressed" if manifest.format >= 2 else "raw"
    title = repo_id.split("/")[-1]
    out = title.removesuffix("-delta") if title.endswith("-delta") and title != "-delta" else f"{title}-model"
    base = metadata.base_model
    body = f"""
# {title}

A fine-tune of [{base}](https://huggingface.co/{base}), published as a parameter delta against it rather
than as weights: rebuild the model from your own copy of the base. Every tensor of the result is
checked against the BLAKE3 digest recorded in `deltakit.json`, so the rebuild is bit for bit or it fails.

## Rebuild

```sh
pip install {DISTRIBUTION}
deltakit apply --base {base} --delta {repo_id} --out {out}
```

`--base` takes the Hub id or the folder of your local copy. The base must be exactly the one the
delta was made from, with this fingerprint ({len(manifest.base.tensors)} tensors):

```
{manifest.base.fingerprint}
```

`deltakit verify {repo_id} --base {base}` checks a base without rebuilding; a wrong base is refused in
seconds, naming the first tensor that differs. The rebuilt model's fingerprint is:

```
{manifest.target.fingerprint}
```

{_signature_section(repo_id, out, signer)}## Contents

| encoding | tensors | payload |
|---|---:|---:|
{rows}

Payload: {human_bytes(payload)} in {len(manifest.payload)} file(s), {payload / max(1, model):.0%} of the
model's {human_bytes(model)} (package format {manifest.format}, {coding}). Made by {manifest.created_by};
published by deltakit {__version__}.
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return str(card)


def _signature_section(repo_id: str, out: str, signer: Signer | None) -> str:
    """The card's word on the package's signature: who signed it and how to hold a download to that."""
    if signer is None:
        return ""
    return f"""## Signature

The package is signed with [OpenSSF Model Signing](https://github.com/sigstore/model-transparency) by the
key with fingerprint

```
{signer.short}
{signer.fingerprint}
```

Get the publisher's public key from them (not from this repo), check its fingerprint, then refuse anything
it did not sign with `deltakit apply ... --trust publisher.pub` (or put it in `$DELTAKIT_HOME/trusted_keys/`).
The rebuilt model comes with `model.sig`, which model-signing checks alone:

```sh
model_signing verify key {out} --signature {out}/model.sig --public_key publisher.pub
```

"""


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = itemsize(dtype)
    for d in shape:
        n *= d
    return n
