"""The test Hub's check of a card's YAML metadata, as the Hub documents it.

The Hub checks a README's front matter when it is pushed, and ``POST /api/validate-yaml`` runs the same
check for clients (huggingface_hub calls it before committing a ``README.md``, and ``RepoCard.validate``
calls it). Its public specification says what is verified: the model-card spec (hub-docs ``modelcard.md``:
"'model-index', 'datasets' and 'license' contents will be verified when git pushing changes to your
README.md file"), the license ids of hub-docs ``docs/hub/repositories-licenses.md`` (copied below), and the
model-tree fields of ``docs/hub/model-cards.md`` (``base_model``: model ids; ``base_model_relation``: one of
``adapter``, ``merge``, ``quantized``, ``finetune``). Errors are worded as the Hub's validator words them
(``"license" must be one of [...]``); an empty front matter is a warning, as on the Hub.

What is not reproduced: whether a named base model or dataset exists on the Hub, and the rest of the
Hub's rules (tags, widget, inference), which the specification does not spell out.
"""

from __future__ import annotations

import re
from typing import Any

# hub-docs docs/hub/repositories-licenses.md, the "licenses" region (commit 008d54d)
_LICENSE_IDS = """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++
    osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 gemma unknown other
"""
HUB_LICENSES = frozenset(_LICENSE_IDS.split())
RELATIONS = ("adapter", "merge", "quantized", "finetune")


def front_matter(text: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The card's metadata, or ``None`` with the errors that make it unreadable."""
    import yaml  # huggingface_hub's own dependency

    match = re.match(r"^---\r?\n(.*?)\r?\n---(?:\r?\n|$)", text, re.DOTALL)
    if match is None:
        return {}, []
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError as e:
        return None, [f"YAML metadata could not be parsed: {e}"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return None, ['"value" must be of type object']
    return data, []


def check(text: str) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for a card's text, as the Hub reports them."""
    data, errors = front_matter(text)
    if data is None:
        return errors, []
    if not data:
        return [], ["Empty metadata: consider adding a license, base_model, tags..."]
    warnings: list[str] = []
    licenses = _strings(data, "license", errors)
    for i, license in enumerate(licenses):
        if license not in HUB_LICENSES:
            where = "license" if isinstance(data["license"], str) else f"license[{i}]"
            errors.append(f'"{where}" must be one of [{", ".join(sorted(HUB_LICENSES))}]')
    if "other" in licenses and not data.get("license_name"):
        warnings.append('"license_name" should be set when "license" is "other" (and the text in a LICENSE file)')
    for key in ("license_name", "license_link", "pipeline_tag", "library_name"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("datasets", "base_model"):
        for i, repo_id in enumerate(_strings(data, key, errors)):
            if not _is_repo_id(repo_id):
                where = key if isinstance(data[key], str) else f"{key}[{i}]"
                errors.append(f'"{where}" with value "{repo_id}" is not a valid repo id')
    relation = data.get("base_model_relation")
    if relation is not None:
        if relation not in RELATIONS:
            errors.append(f'"base_model_relation" must be one of [{", ".join(RELATIONS)}]')
        elif not data.get("base_model"):
            errors.append('"base_model_relation" needs "base_model"')
    _strings(data, "language", errors)
    _strings(data, "tags", errors)
    if "model-index" in data:
        errors += _model_index(data["model-index"])
    return errors, warnings


def _is_repo_id(text: str) -> bool:
    """huggingface_hub's own rule for a repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _strings(data: dict[str, Any], key: str, errors: list[str]) -> list[str]:
    """A field that may be a string or a list of strings, as a list; a wrong type is an error."""
    value = data.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    errors.append(f'"{key}" must be a string or an array of strings')
    return []


def _model_index(index: Any) -> list[str]:
    """The model-card spec's ``model-index``: results with a task type, a dataset type and name, and
    metrics with a type and a value."""
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    errors = []
    for i, model in enumerate(index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, result in enumerate(model.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(result, dict):
                errors.append(f'"{where}" must be of type object')
                continue
            task, dataset = result.get("task"), result.get("dataset")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                errors.append(f'"{where}.dataset.type" and "{where}.dataset.name" are required')
            for k, metric in enumerate(result.get("metrics") or []):
                if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors
