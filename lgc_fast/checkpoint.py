"""Saving and loading networks and training state.

A training checkpoint is a dict with at least ``config`` (``LGCN.config``, plain JSON types) and ``model`` (the
state_dict); ``lgc-fast train`` adds the optimizer, the epoch/step counters, the RNG states and the log history.
An exported weights file holds ``format``, ``config``, ``model`` (optionally with float16 storage) and, when known,
``image_size`` (the training crop size).
Files are written atomically (a temporary file in the same folder, then ``os.replace``) and read with
``torch.load(weights_only=True)``, so loading never runs pickled code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lgc_fast._io import atomic_write_bytes
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN

WEIGHTS_FORMAT = "lgc_fast.weights/1"
CHECKPOINT_FORMAT = "lgc_fast.checkpoint/1"


def save_checkpoint(path, state: dict) -> None:
    """Write `state` (tensors and plain Python values only) to `path` atomically."""
    if "config" not in state or "model" not in state:
        raise ValueError("state must contain 'config' and 'model'")
    atomic_write_bytes(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """The dict saved by ``save_checkpoint`` (or an exported weights file); LgcError naming `path` when the file is
    missing, unreadable, not a checkpoint, or lacks ``config``/``model``."""
    path = Path(path)
    if not path.is_file():
        raise LgcError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise LgcError(f"checkpoint {path}: not a readable lgc_fast checkpoint ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no details'})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or \
            not isinstance(state.get("model"), dict):
        raise LgcError(f"checkpoint {path}: not an lgc_fast checkpoint (expected a dict with 'config' and 'model')")
    return state


def model_from_state(state: dict, path="<state>", map_location="cpu") -> LGCN:
    """Build the network described by ``state['config']`` and load ``state['model']`` (float16 storage is
    converted to float32). LgcError naming `path` on a config or state_dict that does not match."""
    try:
        model = LGCN(**state["config"])
    except (TypeError, ValueError) as exc:
        raise LgcError(f"checkpoint {path}: bad network config {state['config']!r} ({exc})") from None
    weights = {}
    for key, value in state["model"].items():
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        weights[key] = value
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise LgcError(f"checkpoint {path}: weights do not match the config ({first})") from None
    return model.to(map_location)


def load_model(path, map_location="cpu") -> LGCN:
    """An LGCN (eval mode) from a training checkpoint or an exported weights file."""
    state = load_checkpoint(path, map_location="cpu")
    return model_from_state(state, path, map_location).eval()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The LGCN inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def export_weights(checkpoint, out_path, half: bool = True) -> None:
    """Write the inference weights of `checkpoint` (a path or a loaded state dict) to `out_path`: config and
    state_dict only, floating tensors stored as float16 when `half`."""
    state = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    model_from_state(state, checkpoint if not isinstance(checkpoint, dict) else "<state>")  # validates before writing
    weights = {}
    for key, value in state["model"].items():
        if half and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.half()
        weights[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    out = {"format": WEIGHTS_FORMAT, "config": dict(state["config"]), "model": weights}
    if "image_size" in state:  # the crop size the network was trained on (lgc-fast eval crops to it)
        out["image_size"] = int(state["image_size"])
    atomic_write_bytes(out_path, lambda f: torch.save(out, f))
