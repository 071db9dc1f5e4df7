"""The service's model store: where its objects live and how large its rebuild cache may grow."""

from __future__ import annotations

from deltakit.modelstore import ModelStore
from deltakit.modelstore.objects import open_objects

from .settings import Settings

__all__ = ["open_model_store"]


def open_model_store(settings: Settings) -> ModelStore:
    """The model store of ``settings.home``: its objects in ``home/store``, or in the bucket ``DELTAKIT_STORE``
    names, and its rebuild cache within ``settings.cache_bytes``."""
    objects = open_objects(settings.store, settings.home)
    return ModelStore(settings.home, objects=objects, cache_bytes=settings.cache_bytes)
