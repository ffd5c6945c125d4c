"""From heatmaps to landmark coordinates. Every decoder maps heatmaps (N, C, H, W) to points (N, C, 2) float32 as
(x, y) in 0-based pixel coordinates of the maps, plus a confidence (N, C) float32: the map value at the peak pixel.

The local decoders refine the peak pixel: the channel's maximum, or with ``seeds`` (N, C, 2) the regional maximum
nearest to each seed (as the release does after the shape fit). Their accuracy on the network's own targets
T = K * G (a bilinear splat G of the point convolved with the paper's kernel K), measured by ``tests/test_decode.py``
and ``bench/bench_fit_shape.py``:
  argmax          the peak pixel (error up to 0.5 px per axis)
  argmax_shift    +-0.25 px toward the higher neighbour on each axis (the classic hourglass trick)
  local_centroid  centroid of the 5x5 window around the peak (the release's and the sub-pixel paper's estimate);
                  K is broad, so the window cuts it asymmetrically and the centroid is pulled toward the peak pixel
  local_gaussian  a parabola through the log values of the peak and its two neighbours, per axis; exact for one
                  Gaussian, biased for K's sum of five
  kernel_deconv   deconvolution with the known K: the 5x5 window is a linear combination of K centred on the 3x3
                  pixels around the peak (T = sum_c w_c K(. - c)); weighted least squares for w, and the point is the
                  centroid of w. Exact, up to rounding, on T (the splat's weights are recovered), so the best here.
``blend`` mixes a local estimate with the shape fit (``lgc_fast.ops.fit_shape``) by confidence, as the release does.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lgc_fast.ops._checks import check_maps
from lgc_fast.ops.kernel_conv import RADIUS, kernel_2d


def _check_seeds(seeds, heatmaps) -> None:
    n, c = heatmaps.shape[:2]
    if not isinstance(seeds, torch.Tensor) or seeds.shape != (n, c, 2) or not seeds.dtype.is_floating_point:
        got = tuple(seeds.shape) if isinstance(seeds, torch.Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must be None or a float tensor of shape (N, C, 2) = {(n, c, 2)}, got {got}")
    if seeds.device != heatmaps.device:
        raise ValueError(f"seeds must be on the device of heatmaps ({heatmaps.device}), got {seeds.device}")


def argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """heatmaps: (N, C, H, W) -> points (N, C, 2) float32 at the per-channel maximum, confidence (N, C) = that maximum."""
    n, c, h, w = heatmaps.shape
    conf, idx = heatmaps.reshape(n, c, h * w).max(dim=2)
    pts = torch.stack(((idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()), dim=-1)
    return pts, conf.float()


def _peak(heatmaps: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
    """(N, C) flat index of the peak pixel: the channel maximum, or the regional maximum nearest to each seed."""
    n, c, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, c, h * w)
    best = flat.argmax(dim=2)
    if seeds is None:
        return best
    maps = heatmaps.float() if heatmaps.dtype in (torch.float16, torch.bfloat16) else heatmaps
    regional = (maps >= F.max_pool2d(maps, 3, stride=1, padding=1)) & (maps > 0)
    xs = torch.arange(w, dtype=torch.float32, device=heatmaps.device)
    ys = torch.arange(h, dtype=torch.float32, device=heatmaps.device)
    s = seeds.float()
    d2 = (xs - s[..., 0, None, None]) ** 2 + (ys[:, None] - s[..., 1, None, None]) ** 2
    d2 = torch.where(regional, d2, torch.full((), float("inf"), device=heatmaps.device))
    nearest = d2.reshape(n, c, h * w).argmin(dim=2)
    return torch.where(regional.reshape(n, c, h * w).any(dim=2), nearest, best)


def _window(heatmaps: torch.Tensor, peak: torch.Tensor, radius: int):
    """Values (N, C, S, S) of the (2 radius + 1)^2 window around the peak, S = 2 radius + 1, zero outside the map,
    the in-map mask (N, C, S, S), and the peak's (x, y) as long tensors (N, C)."""
    n, c, h, w = heatmaps.shape
    px, py = peak % w, torch.div(peak, w, rounding_mode="floor")
    off = torch.arange(-radius, radius + 1, device=heatmaps.device)
    xs = px[..., None, None] + off[None, :]
    ys = py[..., None, None] + off[:, None]
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    idx = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).reshape(n, c, -1)
    values = heatmaps.reshape(n, c, h * w).gather(2, idx).reshape(inside.shape)
    return torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device)), inside, px, py


def _checked_window(heatmaps, seeds, radius: int):
    """Validate the decoders' input, find the peak (see _peak) and read its window (see _window): the flat peak
    index (N, C) followed by _window's values, mask, px and py."""
    check_maps(heatmaps, "heatmaps", non_empty=True)
    if seeds is not None:
        _check_seeds(seeds, heatmaps)
    peak = _peak(heatmaps, seeds)
    return (peak, *_window(heatmaps, peak, radius))


def _result(px, py, shift_x, shift_y, heatmaps, peak) -> tuple[torch.Tensor, torch.Tensor]:
    n, c = peak.shape
    conf = heatmaps.reshape(n, c, -1).gather(2, peak[..., None])[..., 0]
    pts = torch.stack((px.to(torch.float64) + shift_x, py.to(torch.float64) + shift_y), dim=-1)
    return pts.float(), conf.float()


def argmax_shift(heatmaps: torch.Tensor, seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The peak pixel moved 0.25 px toward its higher neighbour on each axis (no move where a neighbour is off the
    map or both are equal). heatmaps: (N, C, H, W) -> points (N, C, 2), confidence (N, C)."""
    peak, win, inside, px, py = _checked_window(heatmaps, seeds, 1)
    win = win.double()

    def shift(lo, hi, lo_ok, hi_ok):
        return torch.where(lo_ok & hi_ok, 0.25 * torch.sign(hi - lo), torch.zeros_like(hi))

    sx = shift(win[..., 1, 0], win[..., 1, 2], inside[..., 1, 0], inside[..., 1, 2])
    sy = shift(win[..., 0, 1], win[..., 2, 1], inside[..., 0, 1], inside[..., 2, 1])
    return _result(px, py, sx, sy, heatmaps, peak)


def local_centroid(heatmaps: torch.Tensor, seeds: torch.Tensor | None = None,
                   radius: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of the positive values in the (2 radius + 1)^2 window (5x5 by default) around the peak.
    heatmaps: (N, C, H, W) -> points (N, C, 2), confidence (N, C)."""
    peak, win, _, px, py = _checked_window(heatmaps, seeds, radius)
    wgt = win.double().clamp_min(0.0)
    off = torch.arange(-radius, radius + 1, dtype=torch.float64, device=heatmaps.device)
    total = wgt.sum(dim=(2, 3))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    sx = torch.where(total > 0, (wgt * off).sum(dim=(2, 3)) / safe, 0.0)
    sy = torch.where(total > 0, (wgt * off[:, None]).sum(dim=(2, 3)) / safe, 0.0)
    return _result(px, py, sx, sy, heatmaps, peak)


def local_gaussian(heatmaps: torch.Tensor, seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis, the vertex of the parabola through the log values of the peak and its two neighbours (a Gaussian
    fit), limited to +-0.5 px; no move where a value is not positive or a neighbour is off the map.
    heatmaps: (N, C, H, W) -> points (N, C, 2), confidence (N, C)."""
    peak, win, inside, px, py = _checked_window(heatmaps, seeds, 1)
    win = win.double()

    def vertex(lo, mid, hi, ok):
        ok = ok & (lo > 0) & (mid > 0) & (hi > 0)
        one = torch.ones_like(mid)
        l, m, r = (torch.log(torch.where(ok, v, one)) for v in (lo, mid, hi))
        curvature = l - 2 * m + r
        ok = ok & (curvature < 0)
        step = 0.5 * (l - r) / torch.where(ok, curvature, -one)
        return torch.where(ok, step.clamp(-0.5, 0.5), torch.zeros_like(mid))

    centre = win[..., 1, 1]
    sx = vertex(win[..., 1, 0], centre, win[..., 1, 2], inside[..., 1, 0] & inside[..., 1, 2])
    sy = vertex(win[..., 0, 1], centre, win[..., 2, 1], inside[..., 0, 1] & inside[..., 2, 1])
    return _result(px, py, sx, sy, heatmaps, peak)


@functools.lru_cache(maxsize=None)
def _deconv_design(device_type: str, device_index) -> torch.Tensor:
    """(25, 9): K at the 5x5 window pixels q for each of the 3x3 centres c around the peak, K(q - c)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    k = kernel_2d(torch.float64)
    off = torch.arange(-2, 3)
    qy, qx = torch.meshgrid(off, off, indexing="ij")
    cy, cx = torch.meshgrid(off[1:4], off[1:4], indexing="ij")
    dy = qy.reshape(-1, 1) - cy.reshape(1, -1)
    dx = qx.reshape(-1, 1) - cx.reshape(1, -1)
    return k[RADIUS + dy, RADIUS + dx].to(device)


def kernel_deconv(heatmaps: torch.Tensor, seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deconvolution with the paper's kernel K around the peak: fit the 5x5 window (in-map pixels only) as
    sum_c w_c K(q - c) over the 3x3 pixels c around the peak by least squares, and return the centroid of the
    non-negative part of w (the peak pixel where that is empty). heatmaps: (N, C, H, W) -> points (N, C, 2),
    confidence (N, C)."""
    peak, win, inside, px, py = _checked_window(heatmaps, seeds, 2)
    n, c = heatmaps.shape[:2]
    design = _deconv_design(heatmaps.device.type, heatmaps.device.index)
    mask = inside.reshape(n * c, 25).double()
    values = win.reshape(n * c, 25).double()
    gram = torch.einsum("lq,qa,qb->lab", mask, design, design)
    gram = gram + 1e-12 * torch.eye(9, dtype=gram.dtype, device=gram.device)
    rhs = (mask * values) @ design
    chol, _ = torch.linalg.cholesky_ex(gram)
    wgt = torch.cholesky_solve(rhs[..., None], chol)[..., 0].clamp_min(0.0).reshape(n, c, 9)
    off = torch.arange(-1, 2, dtype=torch.float64, device=heatmaps.device)
    off_x, off_y = off.repeat(3), off.repeat_interleave(3)
    total = wgt.sum(dim=2)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    sx = torch.where(total > 0, (wgt * off_x).sum(dim=2) / safe, 0.0)
    sy = torch.where(total > 0, (wgt * off_y).sum(dim=2) / safe, 0.0)
    return _result(px, py, sx, sy, heatmaps, peak)


def blend(local_points: torch.Tensor, local_conf: torch.Tensor, fit_points: torch.Tensor, low: float = 0.1,
          high: float = 0.5) -> torch.Tensor:
    """Mix a local estimate with the shape fit by confidence, per landmark: lam = clamp((conf - low) / (high - low),
    0, 1), points = lam * local + (1 - lam) * fit. Below `low` the fit wins, above `high` the local estimate.

    local_points, fit_points: (N, C, 2); local_conf: (N, C) (heatmap values at the local peaks). Returns (N, C, 2)
    float32 (float64 when an input is float64). The release blends by heatmap confidence too; the linear ramp and its
    ends are this package's choice.
    """
    for name, t in (("local_points", local_points), ("local_conf", local_conf), ("fit_points", fit_points)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if local_points.dim() != 3 or local_points.shape[2] != 2:
        raise ValueError(f"local_points must have shape (N, C, 2), got {tuple(local_points.shape)}")
    if fit_points.shape != local_points.shape:
        raise ValueError(f"fit_points must have the shape of local_points {tuple(local_points.shape)}, got "
                         f"{tuple(fit_points.shape)}")
    if local_conf.shape != local_points.shape[:2]:
        raise ValueError(f"local_conf must have shape (N, C) = {tuple(local_points.shape[:2])}, got "
                         f"{tuple(local_conf.shape)}")
    if not low < high:
        raise ValueError(f"low must be below high, got low={low!r}, high={high!r}")
    dtype = torch.promote_types(torch.promote_types(local_points.dtype, fit_points.dtype), torch.float32)
    lam = ((local_conf.to(dtype) - low) / (high - low)).clamp(0.0, 1.0)[..., None]
    return lam * local_points.to(dtype) + (1.0 - lam) * fit_points.to(dtype)


DECODERS = {
    "argmax": argmax,
    "argmax_shift": argmax_shift,
    "local_centroid": local_centroid,
    "local_gaussian": local_gaussian,
    "kernel_deconv": kernel_deconv,
}


def decode(heatmaps: torch.Tensor, method: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode with the named method (see DECODERS)."""
    if method not in DECODERS:
        raise ValueError(f"method must be one of {', '.join(DECODERS)}, not {method!r}")
    return DECODERS[method](heatmaps)
