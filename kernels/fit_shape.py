"""Triton statistics pass of the shape fit (semantics of ``lgc_fast.ops.fit_shape.fit_shape_stats_ref``).

One program per (plane, threshold): it walks the bounding box of the window (the whole map when there is none) in
BLOCK_H x BLOCK_W tiles, keeps tile-shaped partial sums of w, w dx and w dy (offsets from the window centre) and
reduces them once at the end. Accumulation in float32 (float64 for float64 maps).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

_TILE_ELEMENTS = 4096


@triton.jit(do_not_specialize=["height", "width", "n_thresholds"])
def _fit_shape_stats_kernel(
    x_ptr, peak_ptr, centers_ptr, params_ptr, out_ptr,
    height, width, n_thresholds,
    WINDOWED: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    # params: float64 (radius, threshold_0, ..., threshold_{T-1})
    floor = tl.maximum(tl.load(params_ptr + 1 + t).to(acc_t) * tl.load(peak_ptr + plane).to(acc_t), 0.0)
    if WINDOWED:
        ref_x = tl.load(centers_ptr + 2 * plane).to(acc_t)
        ref_y = tl.load(centers_ptr + 2 * plane + 1).to(acc_t)
        r = tl.load(params_ptr).to(acc_t)
        x_a = tl.maximum(tl.floor(ref_x - r), 0.0)
        x_b = tl.minimum(tl.ceil(ref_x + r), (width - 1).to(acc_t))
        y_a = tl.maximum(tl.floor(ref_y - r), 0.0)
        y_b = tl.minimum(tl.ceil(ref_y + r), (height - 1).to(acc_t))
        ok = (x_a <= x_b) & (y_a <= y_b)
        x_lo = tl.where(ok, x_a, 0.0).to(tl.int32)
        x_hi = tl.where(ok, x_b, -1.0).to(tl.int32)
        y_lo = tl.where(ok, y_a, 0.0).to(tl.int32)
        y_hi = tl.where(ok, y_b, -1.0).to(tl.int32)
        r2 = r * r
    else:
        ref_x = (width - 1).to(acc_t) / 2.0
        ref_y = (height - 1).to(acc_t) / 2.0
        x_lo = 0
        x_hi = width - 1
        y_lo = 0
        y_hi = height - 1
    base = x_ptr + plane * height * width
    sum_w = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_t)
    sum_x = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_t)
    sum_y = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_t)
    for y0 in range(y_lo, y_hi + 1, BLOCK_H):
        ys = y0 + tl.arange(0, BLOCK_H)[:, None]
        dy = ys.to(acc_t) - ref_y
        for x0 in range(x_lo, x_hi + 1, BLOCK_W):
            xs = x0 + tl.arange(0, BLOCK_W)[None, :]
            dx = xs.to(acc_t) - ref_x
            inside = (ys <= y_hi) & (xs <= x_hi)
            v = tl.load(base + ys * width + xs, mask=inside, other=0.0).to(acc_t)
            keep = inside & (v > floor)
            if WINDOWED:
                keep = keep & (dx * dx + dy * dy <= r2)
            w = tl.where(keep, v, 0.0)
            sum_w += w
            sum_x += w * dx
            sum_y += w * dy
    total = tl.sum(tl.sum(sum_w, axis=1), axis=0)
    mean_x = tl.sum(tl.sum(sum_x, axis=1), axis=0)
    mean_y = tl.sum(tl.sum(sum_y, axis=1), axis=0)
    safe = tl.where(total > 0, total, 1.0)
    out = out_ptr + (plane * n_thresholds + t) * 3
    tl.store(out, total)
    tl.store(out + 1, ref_x + mean_x / safe)
    tl.store(out + 2, ref_y + mean_y / safe)


def _blocks(height: int, width: int, radius: Optional[float]) -> tuple[int, int]:
    box_h, box_w = height, width
    if radius is not None:
        side = 2 * math.ceil(radius) + 1
        box_h, box_w = min(side, height), min(side, width)
    block_w = min(triton.next_power_of_2(box_w), 128)
    block_h = min(triton.next_power_of_2(box_h), max(1, _TILE_ELEMENTS // block_w))
    return block_h, block_w


def fit_shape_stats_triton(heatmaps: torch.Tensor, peak: torch.Tensor, centers: Optional[torch.Tensor], radius: float,
                           thresholds: list[float]) -> torch.Tensor:
    """heatmaps: (N, C, H, W); peak: (N, C); centers: (N, C, 2) or None -> (N, C, T, 3) = (W, mu_x, mu_y)."""
    n, c, h, w = heatmaps.shape
    acc = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    maps = heatmaps.contiguous()
    out = torch.empty((n, c, len(thresholds), 3), dtype=acc, device=heatmaps.device)
    if out.numel() == 0:
        return out
    pk = peak.to(acc).contiguous()
    ct = centers.to(acc).contiguous() if centers is not None else pk
    params = torch.tensor([float(radius)] + list(thresholds), dtype=torch.float64, device=heatmaps.device)
    block_h, block_w = _blocks(h, w, radius if centers is not None else None)
    _fit_shape_stats_kernel[(n * c, len(thresholds))](
        maps, pk, ct, params, out, h, w, len(thresholds),
        WINDOWED=centers is not None, ACC_FP64=acc == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w,
    )
    return out
