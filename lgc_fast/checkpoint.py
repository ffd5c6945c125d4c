"""Saving and loading networks and training state.

A training checkpoint is a dict with at least ``config`` (``LGCN.config``, plain JSON types) and ``model`` (the
state_dict); ``lgc-fast train`` adds the optimizer, the epoch/step counters, the RNG states and the log history.
An exported weights file holds ``format``, ``config``, ``model`` (optionally with float16 storage) and, when known,
``image_size`` (the training crop size).
Files are written atomically (a temporary file in the same folder, then ``os.replace``) and read with
``torch.load(weights_only=True)``, so loading never runs pickled code.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
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
    missing, unreadable, not a checkpoint, lacks ``config``/``model`` or has an ``image_size`` other than a positive
    integer."""
    path = Path(path)
    if path.is_dir():
        raise LgcError(f"checkpoint {path}: a folder, not a checkpoint file (e.g. best.pt or last.pt in it)")
    if not path.is_file():
        raise LgcError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, i.e. running the file's code
        raise LgcError(f"checkpoint {path}: not a readable lgc_fast checkpoint (not a torch file, or one holding "
                       f"Python objects, which are not loaded since loading them could run code)") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise LgcError(f"checkpoint {path}: not a readable lgc_fast checkpoint ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no details'})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or \
            not isinstance(state.get("model"), dict):
        raise LgcError(f"checkpoint {path}: not an lgc_fast checkpoint (expected a dict with 'config' and 'model')")
    size = state.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise LgcError(f"checkpoint {path}: image_size must be a positive integer (the training crop size), got "
                       f"{size!r}")
    return state


def model_from_state(state: dict, path="<state>", map_location="cpu") -> LGCN:
    """Build the network described by ``state['config']`` and load ``state['model']`` (float16 storage is
    converted to float32). LgcError naming `path` on a config or state_dict that does not match, or on weights that
    are not all finite."""
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
    # Such weights (a diverged run, a damaged file) give NaN heatmaps, and so made-up points without any error.
    broken = [key for key, value in weights.items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise LgcError(f"checkpoint {path}: the weights hold NaN or infinite values ({broken[0]}"
                       f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''})")
    return model.to(map_location)


def load_model(path, map_location="cpu") -> LGCN:
    """An LGCN (eval mode) from a training checkpoint or an exported weights file."""
    state = load_checkpoint(path, map_location="cpu")
    return model_from_state(state, path, map_location).eval()


def rng_state(augment_generator=None) -> dict:
    """Every RNG this process draws from (torch, CUDA, NumPy, Python, and the optional device augmentation
    generator), as tensors and plain values that a checkpoint can hold."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if augment_generator is not None:
        state["augment"] = augment_generator.get_state()
    return state


def set_rng_state(state: dict, augment_generator=None) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if augment_generator is not None and "augment" in state:
        augment_generator.set_state(state["augment"])


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
