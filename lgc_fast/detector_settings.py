"""The Detector's settings that come with a model: its metadata.json's "pipeline" (decoder, shape-fit threshold,
systematic point errors), read and checked, and the defaults for weights without one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lgc_fast.decode import DECODERS
from lgc_fast.errors import LgcError

FIT_THRESHOLD = 0.01  # pixels above 1 % of their channel's maximum enter the fit (the release's)
DEFAULT_DECODE = "kernel_deconv"  # exact on the network's own targets (see lgc_fast.decode)


def read_metadata(path: Path) -> dict:
    """A model's metadata.json as a dict ({} when absent); LgcError naming it when it is malformed."""
    return read_json_object(path) if path.is_file() else {}


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object, as a dict; LgcError naming the file when it is missing or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LgcError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LgcError(f"{path}: expected a JSON object")
    return data


def pipeline_settings(metadata: dict, where: Path) -> dict:
    """A model's measured best Detector settings from its metadata (``read_metadata``: the bundled model's, or a file
    given to ``lgc-fast eval --point-offsets``): the "pipeline" entry ({"decode": name, "fit_threshold": value,
    "point_offsets": (C, 2) list}, each optional), checked; {} when there is none. `where`: the file named in errors."""
    pipeline = metadata.get("pipeline", {})
    if not isinstance(pipeline, dict) or set(pipeline) - {"decode", "fit_threshold", "point_offsets"}:
        raise LgcError(f"{where}: pipeline must be an object with decode, fit_threshold and/or point_offsets, got "
                       f"{pipeline!r}")
    if pipeline.get("decode", DEFAULT_DECODE) not in DECODERS:
        raise LgcError(f"{where}: pipeline decode must be one of {', '.join(DECODERS)}, not {pipeline['decode']!r}")
    threshold = pipeline.get("fit_threshold", FIT_THRESHOLD)
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise LgcError(f"{where}: pipeline fit_threshold must be a number in [0, 1), got {threshold!r}")
    if "point_offsets" in pipeline:
        try:
            offsets = np.asarray(pipeline["point_offsets"], dtype=np.float64)
        except (TypeError, ValueError):
            offsets = np.zeros(0)
        if offsets.ndim != 2 or offsets.shape[1] != 2 or not np.isfinite(offsets).all():
            raise LgcError(f"{where}: pipeline point_offsets must be a (C, 2) list of finite numbers")
        pipeline = {**pipeline, "point_offsets": offsets}
    return pipeline
