"""Input validation shared by the ops and the decoders: clear errors that name the argument."""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch


def check_maps(value, name: str, non_empty: bool = False) -> None:
    """TypeError or ValueError naming `name` unless `value` is a floating-point torch.Tensor (N, C, H, W) (with
    `non_empty`, also H, W >= 1)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (N, C, H, W), got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if non_empty and (value.shape[2] == 0 or value.shape[3] == 0):
        raise ValueError(f"{name} must have non-empty maps, got shape {tuple(value.shape)}")


def check_number(name: str, value, ok: Callable[[float], bool], what: str) -> None:
    """ValueError naming `name` unless `value` is a finite real number (int, float, a NumPy scalar; not a bool) for
    which `ok` holds.

    Written with comparisons only: under torch.compile(dynamic=True) a float argument is symbolic, and comparisons
    become guards where math.isfinite would break the graph (Python numbers pass the first isinstance, so Dynamo never
    meets the numbers.Real test)."""
    real = isinstance(value, (int, float)) or isinstance(value, numbers.Real)
    if isinstance(value, bool) or not real or not -math.inf < value < math.inf or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
