"""Service settings, read once from ``DELTAKIT_*`` environment variables or an env file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deltakit.registry import deltakit_home


class Settings(BaseSettings):
    """Where data lives and how much work runs at once.

    Attributes:
        home: the data root: registry, job store, and ``models/`` and ``deltas/`` where jobs write.
        roots: folders that names may resolve into; the home is always one.
        workers: jobs running at once; the rest wait in the queue.
        max_body_bytes: the largest request body accepted.
    """

    model_config = SettingsConfigDict(env_prefix="DELTAKIT_", env_file=".env", extra="ignore")

    home: Path = Field(default_factory=deltakit_home)
    roots: list[Path] = Field(default_factory=list)
    workers: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

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
