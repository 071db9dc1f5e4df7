"""Registered bases, deltas and built models."""

from __future__ import annotations

from fastapi import APIRouter

from deltakit.errors import InputNotFoundError
from deltakit.registry import Entry

from ..deps import Read, RegistryDep
from ..schemas import ModelOut, Name

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Read])


def _out(entry: Entry) -> ModelOut:
    return ModelOut(
        name=entry.name,
        kind=entry.kind,  # type: ignore[arg-type]
        fingerprint=entry.fingerprint,
        base_fingerprint=entry.base_fingerprint,
        size=entry.size,
    )


@router.get("")
def list_models(registry: RegistryDep) -> list[ModelOut]:
    return [_out(e) for e in registry.entries().values()]


@router.get("/{name}")
def get_model(name: Name, registry: RegistryDep) -> ModelOut:
    entry = registry.get(name)
    if entry is None:
        raise InputNotFoundError(f"no model or delta is registered as {name!r}")
    return _out(entry)
