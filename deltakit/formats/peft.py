"""PEFT LoRA adapters: which base tensors an adapter changes, by how much, and what it replaces.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
For each adapted module it stores ``lora_A`` (r x in) and ``lora_B`` (out x r), so the merged
weight is ``W + scale * (B @ A)``, transposed for ``fan_in_fan_out`` layers and embeddings, and with
``lora_bias`` the layer's bias moves by ``scale * lora_B.bias``; and it may store whole tensors that
replace the base's (``modules_to_save``, resized embeddings).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputNotFoundError, UnsupportedInputError
from ..files import read_json_object
from .safetensors import TensorInfo, read_header
from .torch_zip import read_torch_zip

__all__ = ["ADAPTER_CONFIG", "Adapter", "LoraPair", "is_adapter", "open_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.weight$")
_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(\.[^.]+)?\.bias$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(\.[^.]+)?$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: ``weight += scale * (B @ A)``, transposed when ``transposed``; or, where
    ``a`` is None, one adapted bias (``lora_bias``): ``bias += scale * b``.

    Attributes:
        target: the base tensor it changes (``model.layers.0.self_attn.q_proj.weight``).
        transposed: the weight is stored (in, out): fan_in_fan_out layers and embeddings.
    """

    target: str
    a: TensorInfo | None
    b: TensorInfo
    scale: float
    transposed: bool


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter: its low-rank pairs and its whole-tensor replacements."""

    root: Path
    config: dict[str, Any]
    pairs: dict[str, LoraPair]
    replacements: dict[str, TensorInfo]
    extra_files: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.root.resolve().name


def is_adapter(path: str | Path) -> bool:
    config = Path(path) / ADAPTER_CONFIG  # a FIFO there makes an adapter that open_adapter refuses by name
    return config.exists() and not config.is_dir()


# A module name is matched against a rank_pattern or alpha_pattern key as peft does
# (``re.match(rf"(.*\.)?({key})$", name)``), but with RE2, which runs in time linear in the name:
# the keys come from the adapter's author, and Python's backtracking engine takes exponential
# time on keys such as ``(a+)+``. RE2 lacks backreferences and lookaround, which such a key never needs.
_MAX_PATTERN = 1000
# Far beyond any alpha in use (8 to 512); larger ones only overflow the merged weights.
_MAX_ALPHA = 1e6


def _compile_pattern(key: object, where: Path, field: str) -> Any:
    import re2

    if not isinstance(key, str) or not 0 < len(key) <= _MAX_PATTERN:
        raise FormatError(
            f"{where}: {field} keys must be regular expressions of 1 to {_MAX_PATTERN} characters", path=where
        )
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(rf"(.*\.)?({key})$", options)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise FormatError(
            f"{where}: {field} key {key[:100]!r} is not a regular expression deltakit can match ({reason}); "
            "backreferences and lookaround are not supported",
            path=where,
        ) from e


def _positive_int(value: object, where: Path, field: str) -> int:
    if type(value) is not int or value <= 0:
        raise FormatError(f"{where}: {field} must be a positive integer, not {value!r:.40}", path=where)
    return value


def _finite(value: object, where: Path, field: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > _MAX_ALPHA:  # type: ignore[arg-type]
        raise FormatError(
            f"{where}: {field} must be a finite number of magnitude at most {_MAX_ALPHA:g}, not {value!r:.40}",
            path=where,
        )
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Ranks:
    """An adapter's ``r`` and ``lora_alpha``, and their per-module overrides, validated as peft does."""

    r: int
    alpha: float
    rank_pattern: tuple[tuple[Any, int], ...]
    alpha_pattern: tuple[tuple[Any, float], ...]

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path) -> _Ranks:
        if "r" not in config or "lora_alpha" not in config:
            raise FormatError(f"{where}: 'r' and 'lora_alpha' are required", path=where)
        patterns = {}
        for field in ("rank_pattern", "alpha_pattern"):
            value = config.get(field) or {}
            if not isinstance(value, dict):
                raise FormatError(f"{where}: {field} must be an object", path=where)
            patterns[field] = value
        return cls(
            _positive_int(config["r"], where, "r"),
            _finite(config["lora_alpha"], where, "lora_alpha"),
            tuple(
                (_compile_pattern(k, where, "rank_pattern"), _positive_int(v, where, f"rank_pattern[{k!r:.60}]"))
                for k, v in patterns["rank_pattern"].items()
            ),
            tuple(
                (_compile_pattern(k, where, "alpha_pattern"), _finite(v, where, f"alpha_pattern[{k!r:.60}]"))
                for k, v in patterns["alpha_pattern"].items()
            ),
        )

    def of(self, module: str) -> tuple[int, float]:
        """The rank and alpha of ``module``: the first pattern key that matches its name, as in peft."""
        r = next((value for pattern, value in self.rank_pattern if pattern.match(module)), self.r)
        alpha = next((value for pattern, value in self.alpha_pattern if pattern.match(module)), self.alpha)
        return r, alpha


def _weights_file(root: Path) -> tuple[Path, dict[str, TensorInfo]]:
    for name, reader in (("adapter_model.safetensors", None), ("adapter_model.bin", read_torch_zip)):
        path = root / name
        if path.exists():  # a FIFO or folder there is refused by name when read
            return path, (read_header(path).tensors if reader is None else reader(path))
    raise InputNotFoundError(f"{root}: adapter_model.safetensors or adapter_model.bin is missing", path=root)


def open_adapter(path: str | Path) -> Adapter:
    """Read an adapter's config and tensor headers, and pair up its ``lora_A``/``lora_B`` tensors.

    Raises:
        UnsupportedInputError: not a LoRA adapter, or one using a variant deltakit does not merge (DoRA...).
        FormatError: the config or tensors are inconsistent (an A without its B, ranks that disagree).
    """
    root = Path(path)
    config_path = root / ADAPTER_CONFIG
    try:
        config = read_json_object(config_path)
    except InputNotFoundError as e:
        raise InputNotFoundError(f"{root}: no {ADAPTER_CONFIG}; not a PEFT adapter", path=root) from e
    if config.get("peft_type") != "LORA":
        kind = config.get("peft_type")
        raise UnsupportedInputError(f"{config_path}: peft_type is {kind!r}; only LORA adapters are merged", path=root)
    for flag in ("use_dora", "use_qalora"):
        if config.get(flag):
            raise UnsupportedInputError(f"{config_path}: {flag} adapters are not merged by deltakit yet", path=root)
    ranks = _Ranks.from_config(config, config_path)
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))

    weights_path, tensors = _weights_file(root)
    halves: dict[str, dict[str, TensorInfo]] = {}
    embedding_modules: set[str] = set()
    replacements: dict[str, TensorInfo] = {}
    biases: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        short = key.removeprefix(_PREFIX)
        bias = _BIAS_KEY.match(short)
        if bias is not None:
            biases[bias["module"]] = info
            continue
        match = _LORA_KEY.match(short) or _EMBEDDING_KEY.match(short)
        if match is None:
            name = short.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
            replacements[name] = info
            continue
        module, kind = match["module"], match["kind"]
        if kind.startswith("lora_embedding"):
            embedding_modules.add(module)
        halves.setdefault(module, {})[kind[-1]] = info

    pairs: dict[str, LoraPair] = {}
    for module, half in halves.items():
        if set(half) != {"A", "B"}:
            missing = "B" if "A" in half else "A"
            raise FormatError(f"{weights_path}: module {module!r} has no lora_{missing}", path=weights_path)
        a, b = half["A"], half["B"]
        r, alpha = ranks.of(module)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise UnsupportedInputError(
                f"{weights_path}: module {module!r} has {len(a.shape)}-D LoRA weights (a convolution?); "
                "deltakit merges linear and embedding LoRA only",
                path=weights_path,
            )
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise FormatError(
                f"{weights_path}: module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                f"do not make a rank-{r} pair",
                path=weights_path,
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        transposed = module in embedding_modules or fan_in_fan_out
        pairs[f"{module}.weight"] = LoraPair(f"{module}.weight", a, b, scale, transposed)
        if module in biases:
            b_bias = biases.pop(module)
            if b_bias.shape != (b.shape[0],):
                raise FormatError(
                    f"{weights_path}: module {module!r}: lora_B's bias is {list(b_bias.shape)}, not [{b.shape[0]}]",
                    path=weights_path,
                )
            pairs[f"{module}.bias"] = LoraPair(f"{module}.bias", None, b_bias, scale, False)
    if biases:
        module = next(iter(biases))
        raise FormatError(f"{weights_path}: module {module!r} has a lora_B bias but no LoRA pair", path=weights_path)

    skip = {ADAPTER_CONFIG, weights_path.name, "README.md"}
    extra = tuple(sorted(p.name for p in root.iterdir() if p.exists() and not p.is_dir() and p.name not in skip))
    return Adapter(root, config, pairs, replacements, extra)
