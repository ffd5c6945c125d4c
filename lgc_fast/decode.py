"""From heatmaps to landmark coordinates. Every decoder maps heatmaps (N, C, H, W) to points (N, C, 2) as (x, y) in
0-based pixel coordinates of the maps, plus a confidence (N, C)."""
from __future__ import annotations

import torch


def argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """heatmaps: (N, C, H, W) -> points (N, C, 2) float32 at the per-channel maximum, confidence (N, C) = that maximum."""
    n, c, h, w = heatmaps.shape
    conf, idx = heatmaps.reshape(n, c, h * w).max(dim=2)
    pts = torch.stack(((idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()), dim=-1)
    return pts, conf.float()


DECODERS = {"argmax": argmax}


def decode(heatmaps: torch.Tensor, method: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode with the named method (see DECODERS)."""
    if method not in DECODERS:
        raise ValueError(f"method must be one of {', '.join(DECODERS)}, not {method!r}")
    return DECODERS[method](heatmaps)
