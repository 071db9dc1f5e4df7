"""Readers and writers of tensor files: validating safetensors, checkpoints and their byte ranges."""

from .checkpoint import Checkpoint, RangeReader, is_weight_file, open_checkpoint
from .safetensors import SafetensorsHeader, SafetensorsWriter, TensorInfo, TensorSpec, plan_layout, read_header

__all__ = [
    "Checkpoint",
    "RangeReader",
    "SafetensorsHeader",
    "SafetensorsWriter",
    "TensorInfo",
    "TensorSpec",
    "is_weight_file",
    "open_checkpoint",
    "plan_layout",
    "read_header",
]
