"""The API's request and response models; storage rows are converted here, at the HTTP edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .store import Job

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]

_REQUIRED = {
    "apply": ("base", "delta", "output"),
    "make": ("base", "target", "output"),
    "verify": ("delta",),
    "convert": ("model", "output"),
}
Quant = Literal[
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
    "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
]  # fmt: skip


class JobRequest(BaseModel):
    """``apply`` needs base, delta, output; ``make`` base, target, output; ``verify`` a delta, and a base
    or a model to check against it; ``convert`` a model and an output (a GGUF file for llama.cpp).
    Every name is a registered name, never a path. A ``make`` may set the package ``format`` (2,
    compressed, by default; 1 for older readers) and the zstd ``level``. An ``apply`` may set ``to``:
    ``gguf`` rebuilds straight into one GGUF file. ``quant`` is the GGUF's type (f16 by default).
    ``fanout`` runs one apply as one task per output shard on the service's Ray cluster."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["apply", "make", "verify", "convert"]
    base: Name | None = None
    delta: Name | None = None
    target: Name | None = None
    model: Name | None = None
    output: Name | None = None
    format: Literal[1, 2] | None = None
    level: Annotated[int, Field(ge=1, le=22)] | None = None
    to: Literal["hf", "gguf"] | None = None
    quant: Quant | None = None
    fanout: bool | None = None

    @model_validator(mode="after")
    def _fields_for_kind(self) -> JobRequest:
        missing = [f for f in _REQUIRED[self.kind] if getattr(self, f) is None]
        if missing:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.kind} job needs {', '.join(missing)}")
        if self.kind == "verify" and self.base and self.model:
            raise ValueError("verify takes a base (to check the delta's base) or a model, not both")
        if self.kind != "make" and (self.format is not None or self.level is not None):
            raise ValueError("format and level belong to make jobs")
        if self.to is not None and self.kind != "apply":
            raise ValueError("to belongs to apply jobs (a convert job always writes GGUF)")
        if self.quant is not None and not (self.kind == "convert" or self.to == "gguf"):
            raise ValueError("quant belongs to convert jobs and to apply jobs with to gguf")
        if self.fanout and (self.kind != "apply" or self.to == "gguf"):
            raise ValueError("fanout belongs to apply jobs that rebuild a model folder")
        return self

    def params(self) -> dict[str, str | int]:
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}


class Progress(BaseModel):
    stage: str | None
    bytes_done: int
    bytes_total: int


class JobOut(BaseModel):
    id: str
    kind: str
    params: dict[str, Any]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    created: float
    started: float | None
    finished: float | None
    duration: float | None
    report: dict[str, Any] | None
    error: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            kind=job.kind,
            params=job.params,
            state=job.state,  # type: ignore[arg-type]
            progress=Progress(stage=job.stage, bytes_done=job.bytes_done, bytes_total=job.bytes_total),
            created=job.created,
            started=job.started,
            finished=job.finished,
            duration=job.duration,
            report=job.report,
            error=job.error,
        )


class ModelOut(BaseModel):
    name: str
    kind: Literal["model", "delta", "gguf"]
    fingerprint: str
    base_fingerprint: str | None
    size: int


class Problem(BaseModel):
    """An error, as RFC 9457 problem details: ``type`` is the deltakit error class; ``field``, where
    the error is about one, the request's field to change."""

    type: str
    title: str
    status: int
    detail: str
    field: str | None = None


class ImportRequest(BaseModel):
    """Import a model into the model store: ``source`` is a registered model name or a folder given relative
    to one of ``DELTAKIT_ROOTS``; with ``base`` (``ORG/NAME[@REV]`` in the store) a fine-tune is kept as a
    delta against it; without, a base is looked for among stored models by tensor digests."""

    model_config = ConfigDict(extra="forbid")

    repo_id: Annotated[str, StringConstraints(min_length=3, max_length=200)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    base: Annotated[str, StringConstraints(min_length=3, max_length=300)] | None = None
    # how it derives from its base (the Hub's base_model_relation); unset: finetune, or for a GGUF file
    # quantized, for a PEFT adapter adapter
    relation: Literal["finetune", "adapter", "quantized", "merge"] | None = None

    def params(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StoredFileOut(BaseModel):
    path: str
    size: int
    sha256: str


class RevisionOut(BaseModel):
    """One revision of a repository in the model store; ``built_from`` is its chain of bases, nearest first
    (``ORG/NAME@COMMIT``)."""

    repo_id: str
    commit: str
    number: int
    created: float
    storage: Literal["whole", "delta"]
    stored_bytes: int
    full_bytes: int
    base_model: str | None
    base_commit: str | None
    relation: str | None
    signer: str | None
    note: str | None
    built_from: list[str]
    files: list[StoredFileOut]


class RepoOut(BaseModel):
    """A repository: its revisions, oldest first, and the repositories whose latest revision derives from it."""

    repo_id: str
    revisions: list[RevisionOut]
    derived: list[str]


class RepoListed(BaseModel):
    """A repository of the model store as ``GET /v1/models`` lists it beside the registered names (the same
    object ``deltakit registry list --json`` prints); ``name`` is its repo id."""

    name: str
    kind: Literal["repo"]
    revisions: int
    commit: str
    storage: Literal["whole", "delta"]
    stored_bytes: int
    full_bytes: int
    base_model: str | None
    relation: str | None
    derived: list[str]
