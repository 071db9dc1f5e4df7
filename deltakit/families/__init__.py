"""Model families: one module each, holding its name maps, hyperparameters and vocabulary rules;
this registry finds a config's family. A new family is one new module and one line in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .family import Family
from .llama import LLAMA
from .llama3 import LLAMA3
from .mistral import MISTRAL
from .qwen2 import QWEN2, QWEN3

__all__ = ["FAMILIES", "Family", "family_of"]

# The first family that both names the architecture and claims the config is the model's: Llama 3
# before Llama 1 and 2, which share its architecture name.
FAMILIES: tuple[Family, ...] = (LLAMA3, LLAMA, MISTRAL, QWEN2, QWEN3)


def family_of(config: Mapping[str, Any]) -> Family | None:
    """The family a config.json describes: by its first ``architectures`` entry, or where there is
    none, by its ``model_type``, and among those the first that claims it; None for a family deltakit
    does not know."""
    arch = (config.get("architectures") or [None])[0]
    for family in FAMILIES:
        named = arch in family.architectures or (arch is None and config.get("model_type") in family.model_types)
        if named and family.claims(config):
            return family
    return None
