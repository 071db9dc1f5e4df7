"""Service settings, read once from ``DELTAKIT_*`` environment variables or an env file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from deltakit.errors import UnsupportedInputError
from deltakit.registry import deltakit_home


class Settings(BaseSettings):
    """Where data lives and how much work runs at once.

    Attributes:
        home: the data root: registry, job store, and ``models/`` and ``deltas/`` where jobs write.
        roots: folders that names may resolve into; the home is always one.
        trust: public keys (PEM files, or folders of ``*.pub``) whose signature (``model.sig``) every import
            must carry; with the home's ``trusted_keys/`` folder. Neither: imports need no signature.
        workers: jobs running at once; the rest wait in the queue.
        max_body_bytes: the largest request body accepted.
        executor: ``local`` (jobs run in the service's threads) or ``ray`` (each job a task on a Ray cluster).
        ray_address: the cluster to join (``auto``, or ``HOST:PORT``); unset: ``RAY_ADDRESS``, else a local one.
        ray_job_cpus, ray_job_memory: what each job's task holds on the cluster.
        ray_retries: how many times a job's task is run again after its worker died.
        max_connections: open HTTP connections at most (lowered to fit under the open-file limit); past it,
            the oldest connection still sending its request head is closed for the new one.
        header_timeout: seconds a connection may take to send a request head before it is closed.
        keep_alive_timeout: seconds an idle keep-alive connection is kept open.
        shutdown_grace: seconds a stop waits for running jobs; then it exits, those jobs marked failed
            and their temporary output left for the next start to remove.
        min_free_bytes: below this much free space on the home's disk, ``/readyz`` answers 503.
        store: where the model store keeps its objects: unset for ``HOME/store``, or ``s3://BUCKET/PREFIX``
            for an S3-compatible bucket (endpoint and keys from the usual AWS variables).
        cache_bytes: the disk budget of the model store's rebuild cache (``home/cache``); the least recently
            used rebuilt revisions are evicted past it.
        max_upload_bytes: the largest model upload (``POST /v1/models/upload``), its whole request body.
    """

    model_config = SettingsConfigDict(env_prefix="DELTAKIT_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=deltakit_home)
    roots: list[Path] = Field(default_factory=list)
    trust: list[Path] = Field(default_factory=list)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_job_cpus: float = Field(default=1.0, gt=0, le=1024)
    ray_job_memory: int = Field(default=2 << 30, ge=1 << 20)
    ray_retries: int = Field(default=1, ge=0, le=100)
    max_connections: int = Field(default=1000, ge=8, le=1_000_000)
    header_timeout: float = Field(default=10.0, gt=0, le=3600)
    keep_alive_timeout: float = Field(default=5.0, gt=0, le=3600)
    shutdown_grace: float = Field(default=10.0, ge=0, le=3600)
    min_free_bytes: int = Field(default=64 << 20, ge=0)
    store: str | None = Field(default=None, pattern=r"^(s3://[^/\s]+(/\S*)?)?$")
    cache_bytes: int = Field(default=100 << 30, ge=0)
    max_upload_bytes: int = Field(default=64 << 30, ge=1024)

    @property
    def allowed_roots(self) -> list[Path]:
        return [p.resolve() for p in (self.home, *self.roots)]

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def deltas_dir(self) -> Path:
        return self.home / "deltas"

    @property
    def database(self) -> Path:
        return self.home / "jobs.sqlite3"


# What each setting takes, in the words a mistaken one is answered with.
_EXPECTED = {
    "home": "a folder",
    "roots": 'a JSON list of folders, for example DELTAKIT_ROOTS=\'["/models", "/deltas"]\'',
    "trust": "a JSON list of public key files or folders, for example DELTAKIT_TRUST='[\"/keys/team.pub\"]'",
    "workers": "a whole number from 1 to 64",
    "max_body_bytes": "a whole number of bytes, 1024 or more",
    "executor": "local or ray",
    "ray_address": "a Ray cluster address (auto, or HOST:PORT)",
    "ray_job_cpus": "a number of CPUs above 0",
    "ray_job_memory": "a whole number of bytes, 1 MiB or more",
    "ray_retries": "a whole number from 0 to 100",
    "max_connections": "a whole number of connections from 8 to 1000000",
    "header_timeout": "a number of seconds above 0 (at most 3600)",
    "keep_alive_timeout": "a number of seconds above 0 (at most 3600)",
    "shutdown_grace": "a number of seconds from 0 to 3600",
    "min_free_bytes": "a whole number of bytes",
    "store": "empty (a folder under DELTAKIT_HOME) or an S3 bucket, s3://BUCKET/PREFIX",
    "cache_bytes": "a whole number of bytes",
    "max_upload_bytes": "a whole number of bytes, 1024 or more",
}


def load_settings() -> Settings:
    """The settings from the environment; a mistaken one is named, with what it should be.

    Raises:
        UnsupportedInputError: a ``DELTAKIT_*`` variable (or ``.env`` entry) has a value of the wrong form.
    """
    try:
        return Settings()
    except SettingsError as e:  # a value that is not even JSON, where JSON is expected
        found = re.search(r'field "(\w+)"', str(e))
        field = found.group(1) if found else "?"
    except ValidationError as e:
        field = str(e.errors()[0]["loc"][0]) if e.errors() else "?"
    raise UnsupportedInputError(
        f"the setting DELTAKIT_{field.upper()} is not {_EXPECTED.get(field, 'of the right form')}"
    )
