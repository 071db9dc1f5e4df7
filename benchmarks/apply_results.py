"""The figures of one run of benchmarks/apply.py: what it measured, written as JSON and read back to render."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
FLOOR_TARGET = 1.25
MAKE_FLOOR_TARGET = 1.5
RSS_TARGET_BYTES = GIB

APPLY = {1: "apply (format 1, raw payload)", 2: "apply (format 2, compressed payload)"}
MAKE = {1: "make (format 1)", 2: "make (format 2)"}


@dataclass
class Step:
    """One measured step: a deltakit command in its own process, or the in-process I/O floor."""

    name: str
    wall_s: float
    peak_rss_bytes: int | None = None
    read_bytes: int | None = None
    written_bytes: int | None = None
    runs_s: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Everything measured in one run; written as JSON and rendered into BENCHMARKS.md."""

    date: str
    command: str
    machine: dict[str, object]
    shape: dict[str, int]
    extra_vocab: int
    base_bytes: int
    base_files: int
    payload_bytes: dict[int, int]  # by format
    output_bytes: int
    generate_s: float
    repeat: int
    json_path: str
    steps: list[Step]
    noise: float = 0.0
    decode_gbps: dict[str, float] = field(default_factory=dict)  # "format N, T threads" -> output GB/s
    cold_apply_s: dict[str, list[float]] = field(default_factory=dict)  # "read limit, format" -> runs
    dtype: str = "float16"
    floor_target: float = FLOOR_TARGET
    make_floor_target: float = MAKE_FLOOR_TARGET
    rss_target_bytes: int = RSS_TARGET_BYTES

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def ratio(self, step: str, floor: str = "apply I/O floor") -> float:
        return self.step(step).wall_s / self.step(floor).wall_s

    def to_json(self) -> str:
        ratios = {
            "apply_format2_to_floor": self.ratio(APPLY[2]),
            "apply_format1_to_floor": self.ratio(APPLY[1]),
            "apply_format2_to_format1": self.ratio(APPLY[2], APPLY[1]),
            "make_format2_to_floor": self.ratio(MAKE[2], "make I/O floor"),
            "make_format1_to_floor": self.ratio(MAKE[1], "make I/O floor"),
        }
        return json.dumps(asdict(self) | {"ratios": ratios}, indent=2) + "\n"


def load_results(path: Path) -> list[Results]:
    """The runs recorded in ``path`` (as :meth:`Results.to_json` wrote them)."""
    runs = []
    for raw in json.loads(path.read_text(encoding="utf-8")):
        raw.pop("ratios", None)
        raw["steps"] = [Step(**step) for step in raw["steps"]]
        raw["payload_bytes"] = {int(f): size for f, size in raw["payload_bytes"].items()}
        runs.append(Results(**raw))
    return runs


@dataclass
class MemoryRun:
    """make and apply (format 2) once each on one pair (``--memory-only``): wall time and peak RSS."""

    date: str
    command: str
    machine: dict[str, object]
    shape: dict[str, int]
    extra_vocab: int
    noise: float
    base_bytes: int
    base_files: int
    tuned_bytes: int
    generate_s: float
    payload_bytes: int
    make_s: float
    make_rss_bytes: int
    apply_s: float
    apply_rss_bytes: int
