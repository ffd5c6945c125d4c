"""Fitting the PCA shape model to heatmaps (paper section 3.3), a whole batch at once.

Model: x_j = s R (mean_j + P_j b) + t (see ``lgc_fast.shape``). The paper makes every heatmap pixel p of landmark j
above ``threshold`` x the channel maximum an equation x_j = p weighted by its value w_p. For one landmark

    sum_p w_p ||x_j - p||^2 = W_j ||x_j - mu_j||^2 + const,   W_j = sum_p w_p,   mu_j = sum_p w_p p / W_j,

so the pixel-level least-squares problem is exactly a landmark-level one on (W_j, mu_j). One reduction over the maps
(``fit_shape_stats``) per stage gives those statistics; the rest is (K+3)-sized algebra for all faces together.

Each stage, for the window radii in ``windows`` (None: whole map; r: pixels within r px of the current estimate):
  1. statistics (W_j, mu_j) of the stage's pixels.
  2. rotation R by weighted Kabsch between the current model shape q = mean + P b (b = 0 at first) and the pixels;
     the first, whole-map stage uses the stronger pixels above ``kabsch_threshold`` for it (as the release does).
  3. with R fixed the model is linear: R^T x_j = s mean_j + P_j beta + t' with beta = s b, t' = R^T t; weighted
     linear least squares in (s, beta, t') (the normal equations, K+3 unknowns), then b = beta / s, t = R t'.
  4. bounds |b_k| <= bound_sigma * stddev_k by a grow-only active set: each violated coefficient is fixed at its
     bound (its mode joins the scale column: s (mean + b_k P_k)), the others are re-solved, until nothing new
     violates; a last clamp covers a non-positive scale. (The release solves the constrained problem exactly with
     Matlab's lsqlin; a grow-only active set never frees a coefficient again, so it can stop short of that optimum.)
A stage whose pixels all fall outside the windows (total weight 0) keeps the previous stage's fit for that face.
On kernel-convolved maps a blob is broad compared with a 7 px window, so a window centred off the true point sees
a centroid pulled toward its own centre: one windowed stage moves the estimate only part of the way (about a third
for 7 px). Repeating a radius in ``windows`` iterates it (the paper runs None, 20, 7 once each).
``fit_shape_ref`` does the same steps per face in NumPy with one weighted equation per pixel: the oracle.
"""
from __future__ import annotations

import importlib
from typing import List, NamedTuple, Optional

import numpy as np
import torch

from lgc_fast import _backend
from lgc_fast.ops._checks import check_maps, check_number
from lgc_fast.ops._library import custom_op
from lgc_fast.shape import ShapeModel

MAX_THRESHOLDS = 4
_RIDGE = 1e-12  # relative diagonal loading: keeps degenerate faces finite, invisible otherwise


class ShapeFit(NamedTuple):
    """points: (N, C, 2) fitted landmarks; coeffs: (N, K) shape coefficients b; similarity: (N, 4) = (a, c, tx, ty)
    with x = [[a, -c], [c, a]] (mean + modes b) + t."""

    points: torch.Tensor
    coeffs: torch.Tensor
    similarity: torch.Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# The reduction: per landmark and threshold, the weight and weighted centroid of the pixels that are equations.

def fit_shape_stats_ref(heatmaps: torch.Tensor, peak: torch.Tensor, centers: Optional[torch.Tensor], radius: float,
                        thresholds) -> torch.Tensor:
    """heatmaps: (N, C, H, W); peak: (N, C) channel maxima; centers: (N, C, 2) window centres (x, y) or None for the
    whole map; radius: window radius in px (pixels with (x-cx)^2 + (y-cy)^2 <= radius^2); thresholds: T values.

    Returns (N, C, T, 3) = (W, mu_x, mu_y) over pixels with value > max(thresholds[t] * peak, 0) in the window,
    float32 (float64 for float64 maps). mu is the window centre (the map centre for None) where W = 0. Plain torch.
    """
    n, c, h, w = heatmaps.shape
    dt = _acc_dtype(heatmaps.dtype)
    v = heatmaps.to(dt)
    xs = torch.arange(w, dtype=dt, device=v.device)
    ys = torch.arange(h, dtype=dt, device=v.device)
    if centers is None:
        ref = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=dt, device=v.device).expand(n, c, 2)
    else:
        ref = centers.to(dt)
    dx = xs - ref[..., 0, None, None]
    dy = ys[:, None] - ref[..., 1, None, None]
    inside = torch.ones((), dtype=torch.bool, device=v.device)
    if centers is not None:
        r = torch.tensor(radius, dtype=dt)
        inside = dx * dx + dy * dy <= r * r
    out = []
    for t in thresholds:
        floor = (torch.tensor(t, dtype=dt) * peak.to(dt)).clamp_min(0.0)[..., None, None]
        wgt = torch.where(inside & (v > floor), v, torch.zeros((), dtype=dt, device=v.device))
        total = wgt.sum(dim=(2, 3))
        safe = torch.where(total > 0, total, torch.ones_like(total))
        mx = ref[..., 0] + (wgt * dx).sum(dim=(2, 3)) / safe
        my = ref[..., 1] + (wgt * dy).sum(dim=(2, 3)) / safe
        out.append(torch.stack((total, mx, my), dim=-1))
    return torch.stack(out, dim=2)


def _ext_stats(heatmaps, peak, centers, radius, thresholds):
    return torch.ops.lgc_fast_C.fit_shape_stats(heatmaps, peak, centers, radius, thresholds)


def _triton_stats(heatmaps, peak, centers, radius, thresholds):
    module = importlib.import_module("lgc_fast.kernels.fit_shape")
    return module.fit_shape_stats_triton(heatmaps, peak, centers, radius, thresholds)


_IMPLS = {"cuda": _ext_stats, "cpu": _ext_stats, "triton": _triton_stats, "ref": fit_shape_stats_ref}


@custom_op("lgc_fast::fit_shape_stats", mutates_args=())
def _stats_op(heatmaps: torch.Tensor, peak: torch.Tensor, centers: Optional[torch.Tensor], radius: float,
              thresholds: List[float], backend: str) -> torch.Tensor:
    if heatmaps.numel() == 0:
        n, c = heatmaps.shape[:2]
        out = heatmaps.new_zeros((n, c, len(thresholds), 3), dtype=_acc_dtype(heatmaps.dtype))
        return out
    return _IMPLS[backend](heatmaps, peak, centers, radius, list(thresholds))


@_stats_op.register_fake
def _(heatmaps, peak, centers, radius, thresholds, backend):
    n, c = heatmaps.shape[:2]
    return heatmaps.new_empty((n, c, len(thresholds), 3), dtype=_acc_dtype(heatmaps.dtype))


def _check_stats_inputs(heatmaps, peak, centers, radius, thresholds) -> None:
    check_maps(heatmaps, "heatmaps")
    n, c = heatmaps.shape[:2]
    if not isinstance(peak, torch.Tensor) or peak.shape != (n, c) or not peak.dtype.is_floating_point:
        raise ValueError(f"peak must be a float tensor of shape (N, C) = {(n, c)}, got "
                         f"{tuple(peak.shape) if isinstance(peak, torch.Tensor) else type(peak).__name__}")
    if centers is not None:
        if not isinstance(centers, torch.Tensor) or centers.shape != (n, c, 2) or not centers.dtype.is_floating_point:
            raise ValueError(f"centers must be None or a float tensor of shape (N, C, 2) = {(n, c, 2)}")
        check_number("radius", radius, lambda v: v >= 0, "a finite number >= 0")
    for name, t in (("peak", peak), ("centers", centers)):
        if t is not None and t.device != heatmaps.device:
            raise ValueError(f"{name} must be on the device of heatmaps ({heatmaps.device}), got {t.device}")
    if not 1 <= len(thresholds) <= MAX_THRESHOLDS or not all(np.isfinite(t) and t >= 0 for t in thresholds):
        raise ValueError(f"thresholds must be 1 to {MAX_THRESHOLDS} finite values >= 0, got {list(thresholds)!r}")


def fit_shape_stats(heatmaps: torch.Tensor, peak: torch.Tensor, centers: Optional[torch.Tensor] = None,
                    radius: float = 0.0, thresholds=(0.01,), backend: str | None = None) -> torch.Tensor:
    """The landmark-level statistics of the pixel equations, one pass over the maps (or the windows).

    heatmaps: (N, C, H, W) any float dtype; peak: (N, C) channel maxima; centers: (N, C, 2) or None (whole map);
    radius: px; thresholds: 1 to 4 values relative to peak. Returns (N, C, T, 3) = (W, mu_x, mu_y), float32 (float64
    for float64 maps). Equivalent to ``fit_shape_stats_ref``. backend: ``"cuda" | "triton" | "cpu" | "ref"``.
    """
    _check_stats_inputs(heatmaps, peak, centers, radius, thresholds)
    name = _backend.choose("fit_shape_stats", heatmaps.device, backend)
    return _stats_op(heatmaps, peak, centers, float(radius), [float(t) for t in thresholds], name)


# ---------------------------------------------------------------------------------------------------------------------
# Validation shared by the batched fit and the oracle.

def _check_fit_args(heatmaps, model, windows, threshold, bound_sigma, kabsch_threshold) -> tuple:
    check_maps(heatmaps, "heatmaps", non_empty=True)
    if not isinstance(model, ShapeModel):
        raise TypeError(f"model must be a lgc_fast.shape.ShapeModel, got {type(model).__name__}")
    if heatmaps.shape[1] != model.n_landmarks:
        raise ValueError(f"heatmaps has {heatmaps.shape[1]} channels but the shape model has {model.n_landmarks} "
                         "landmarks")
    windows = tuple(windows)
    if not windows or windows[0] is not None:
        raise ValueError(f"windows must start with None (the whole-map fit), got {windows!r}")
    for r in windows[1:]:
        if r is not None:
            check_number("windows", r, lambda v: v > 0, "None or radii > 0 in px (after the first)")
    for name, value in (("threshold", threshold), ("kabsch_threshold", kabsch_threshold)):
        check_number(name, value, lambda v: 0 <= v < 1, "a number in [0, 1)")
    if bound_sigma is not None:
        check_number("bound_sigma", bound_sigma, lambda v: v > 0, "None or a number > 0")
    return windows


def _check_peaks(peak: torch.Tensor) -> None:
    """peak: (N, C). One host round trip for the whole batch."""
    bad_value = ~torch.isfinite(peak).all(dim=1)
    empty = ~(peak > 0).any(dim=1)
    flags = torch.stack((bad_value, empty)).cpu()
    if flags[0].any():
        raise ValueError(f"heatmaps has NaN or infinite values (face {int(flags[0].nonzero()[0])})")
    if flags[1].any():
        raise ValueError(f"heatmaps of face {int(flags[1].nonzero()[0])} have no positive value: nothing to fit")


# ---------------------------------------------------------------------------------------------------------------------
# The batched fit.

def _kabsch(shape: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """shape, target: (N, C, 2); weight: (N, C) -> (cos, sin) (N,) of the rotation best turning shape onto target."""
    wsum = weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)[..., None]
    qc = shape - (weight[..., None] * shape).sum(dim=1, keepdim=True) / wsum
    mc = target - (weight[..., None] * target).sum(dim=1, keepdim=True) / wsum
    dot = (weight * (qc * mc).sum(dim=-1)).sum(dim=1)
    cross = (weight * (qc[..., 0] * mc[..., 1] - qc[..., 1] * mc[..., 0])).sum(dim=1)
    angle = torch.atan2(cross, dot)
    return torch.cos(angle), torch.sin(angle)


def _design(mean: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """(C, 2, K+3): the columns of R^T x_j = s mean_j + P_j beta + t' for unknowns (s, beta, t'_x, t'_y)."""
    c = mean.shape[0]
    eye = torch.eye(2, dtype=mean.dtype, device=mean.device).expand(c, 2, 2)
    return torch.cat((mean[..., None], modes.permute(1, 2, 0), eye), dim=-1)


def _solve_batched(weight, target, cos, sin, design, gram_terms, limit):
    """Weighted least squares of stage step 3-4 for all faces.

    weight: (N, C); target: (N, C, 2) = mu; (cos, sin): (N,) rotation; design: (C, 2, P) with P = K+3;
    gram_terms: (C, P*P) = design_c^T design_c flattened; limit: (K,) bounds or None.
    Returns scale (N,), coeffs (N, K), translation (N, 2).
    """
    n, c = weight.shape
    p = design.shape[-1]
    k = p - 3
    y = torch.stack((cos[:, None] * target[..., 0] + sin[:, None] * target[..., 1],
                     -sin[:, None] * target[..., 0] + cos[:, None] * target[..., 1]), dim=-1)
    gram = (weight @ gram_terms).view(n, p, p)
    rhs = (weight[..., None] * y).reshape(n, 2 * c) @ design.reshape(2 * c, p)
    eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
    fixed = fixed_value = None  # no coefficient at a bound yet
    g, r = gram, rhs
    for _ in range(k + 1):
        if fixed is not None:
            # Reparametrise theta = T u: u_0 = s scales mean + sum_fixed value_k P_k, fixed beta_k are pinned to 0.
            pinned = torch.cat((torch.zeros_like(fixed[:, :1]), fixed, torch.zeros_like(fixed[:, :2])), dim=1)
            transform = eye.expand(n, p, p).clone()
            transform[:, 1:k + 1, 0] = fixed_value
            transform = transform * (~pinned)[:, None, :]
            g = transform.transpose(1, 2) @ gram @ transform + torch.diag_embed(pinned.to(gram.dtype))
            r = (transform.transpose(1, 2) @ rhs[..., None])[..., 0]
        g = g + (_RIDGE * g.diagonal(dim1=1, dim2=2).mean(dim=1))[:, None, None] * eye
        chol, _ = torch.linalg.cholesky_ex(g)
        u = torch.cholesky_solve(r[..., None], chol)[..., 0]
        scale = u[:, 0]
        safe = torch.where(scale.abs() > 0, scale, torch.ones_like(scale))
        coeffs = u[:, 1:k + 1] / safe[:, None]
        if fixed is not None:
            coeffs = torch.where(fixed, fixed_value, coeffs)
        if limit is None:
            break
        over = coeffs.abs() > limit
        if fixed is not None:
            over &= ~fixed
        if not bool(over.any()):
            break
        fixed = over if fixed is None else fixed | over
        fixed_value = torch.where(over, torch.sign(coeffs) * limit, 0.0 if fixed_value is None else fixed_value)
    if limit is not None:
        coeffs = torch.minimum(torch.maximum(coeffs, -limit), limit)
    tp = u[:, k + 1:]
    translation = torch.stack((cos * tp[:, 0] - sin * tp[:, 1], sin * tp[:, 0] + cos * tp[:, 1]), dim=-1)
    return scale, coeffs, translation


def _similarity_points(mean, modes, scale, cos, sin, coeffs, translation):
    q = mean + torch.einsum("nk,kcd->ncd", coeffs, modes)
    a, c = scale * cos, scale * sin
    sim = torch.stack((a, c, translation[:, 0], translation[:, 1]), dim=1)
    x = a[:, None] * q[..., 0] - c[:, None] * q[..., 1] + translation[:, 0, None]
    y = c[:, None] * q[..., 0] + a[:, None] * q[..., 1] + translation[:, 1, None]
    return torch.stack((x, y), dim=-1), sim


@torch.no_grad()
def fit_shape(heatmaps: torch.Tensor, model: ShapeModel, windows=(None, 20, 7), threshold: float = 0.01,
              bound_sigma: float | None = 3.0, kabsch_threshold: float = 0.1, backend: str | None = None) -> ShapeFit:
    """Fit the shape model to every face of a batch (algorithm in the module docstring).

    heatmaps: (N, C, H, W) with C = model.n_landmarks, any float dtype, on any device; windows: None (whole map) then
    radii in px, e.g. (None, 20, 7) as in the paper (repeat a radius to iterate it); threshold: pixels above
    threshold x channel maximum are equations; bound_sigma: |b_k| <= bound_sigma * stddev_k, None for no bounds;
    kabsch_threshold: the pixels used for the first rotation. backend: of the statistics pass (``fit_shape_stats``).
    Returns ShapeFit(points (N, C, 2), coeffs (N, K), similarity (N, 4)), float32 (float64 for float64 maps), on the
    maps' device. Raises ValueError naming the argument for bad input (NaN, a face with no positive value, ...).
    """
    windows = _check_fit_args(heatmaps, model, windows, threshold, bound_sigma, kabsch_threshold)
    out_dtype = _acc_dtype(heatmaps.dtype)
    dev = heatmaps.device
    n = heatmaps.shape[0]
    mean, modes, stddev = model.tensors(torch.float64, dev)
    if n == 0:
        empty = torch.empty
        return ShapeFit(empty(0, model.n_landmarks, 2, dtype=out_dtype, device=dev),
                        empty(0, model.n_modes, dtype=out_dtype, device=dev), empty(0, 4, dtype=out_dtype, device=dev))
    peak = heatmaps.amax(dim=(2, 3))
    _check_peaks(peak)
    name = _backend.choose("fit_shape_stats", dev, backend)
    design = _design(mean, modes)
    gram_terms = torch.einsum("cip,ciq->cpq", design, design).reshape(mean.shape[0], -1)
    limit = None if bound_sigma is None else bound_sigma * stddev
    coeffs = torch.zeros(n, model.n_modes, dtype=torch.float64, device=dev)
    points = sim = None
    for radius in windows:
        if radius is None:
            stats = _stats_op(heatmaps, peak, None, 0.0, [float(kabsch_threshold), float(threshold)], name).double()
            rot_stats, fit_stats = stats[:, :, 0], stats[:, :, 1]
        else:
            centers = points.to(_acc_dtype(heatmaps.dtype))
            fit_stats = _stats_op(heatmaps, peak, centers, float(radius), [float(threshold)], name)[:, :, 0].double()
            rot_stats = fit_stats
        shape = mean + torch.einsum("nk,kcd->ncd", coeffs, modes)
        cos, sin = _kabsch(shape, rot_stats[..., 0], rot_stats[..., 1:])
        scale, new_coeffs, translation = _solve_batched(fit_stats[..., 0], fit_stats[..., 1:], cos, sin, design,
                                                        gram_terms, limit)
        new_points, new_sim = _similarity_points(mean, modes, scale, cos, sin, new_coeffs, translation)
        if points is None:
            points, coeffs, sim = new_points, new_coeffs, new_sim
        else:
            seen = (fit_stats[..., 0].sum(dim=1) > 0)[:, None]
            points = torch.where(seen[..., None], new_points, points)
            coeffs = torch.where(seen, new_coeffs, coeffs)
            sim = torch.where(seen, new_sim, sim)
    return ShapeFit(points.to(out_dtype), coeffs.to(out_dtype), sim.to(out_dtype))


# ---------------------------------------------------------------------------------------------------------------------
# The oracle: per face, NumPy, one weighted equation per pixel.

def _ref_pixels(maps, peak, thr, centers, radius):
    """maps: (C, H, W) float64 -> landmark index, x, y, weight of every pixel that is an equation."""
    c, h, w = maps.shape
    keep = maps > np.maximum(thr * peak, 0.0)[:, None, None]
    if centers is not None:
        dx = np.arange(w)[None, None, :] - centers[:, 0, None, None]
        dy = np.arange(h)[None, :, None] - centers[:, 1, None, None]
        keep &= dx * dx + dy * dy <= radius * radius
    j, y, x = np.nonzero(keep)
    return j, x.astype(np.float64), y.astype(np.float64), maps[j, y, x]


def _ref_face(maps, model, windows, threshold, bound_sigma, kabsch_threshold):
    mean, modes, stddev = model.mean, model.modes, model.stddev
    k = model.n_modes
    limit = None if bound_sigma is None else bound_sigma * stddev
    peak = maps.reshape(maps.shape[0], -1).max(axis=1)
    coeffs = np.zeros(k)
    result = None
    for radius in windows:
        centers = None if radius is None else result[0]
        j, x, y, w = _ref_pixels(maps, peak, threshold, centers, radius)
        if w.sum() == 0:
            continue
        rj, rx, ry, rw = _ref_pixels(maps, peak, kabsch_threshold, None, None) if radius is None else (j, x, y, w)
        # Kabsch over the pixels: model point of each pixel's landmark against the pixel position.
        q = (mean + np.einsum("k,kcd->cd", coeffs, modes))[rj]
        q = q - (rw[:, None] * q).sum(0) / rw.sum()
        px = np.stack((rx, ry), 1)
        px = px - (rw[:, None] * px).sum(0) / rw.sum()
        angle = np.arctan2((rw * (q[:, 0] * px[:, 1] - q[:, 1] * px[:, 0])).sum(), (rw * (q * px).sum(1)).sum())
        cos, sin = np.cos(angle), np.sin(angle)
        # One equation pair per pixel: R^T p = s q0_j + P_j beta + t', weighted by the pixel value.
        target = np.stack((cos * x + sin * y, -sin * x + cos * y), 1).ravel()
        sqrt_w = np.repeat(np.sqrt(w), 2)
        fixed = np.zeros(k, bool)
        fixed_value = np.zeros(k)
        while True:
            base = mean + np.einsum("k,kcd->cd", np.where(fixed, fixed_value, 0.0), modes)
            free = np.flatnonzero(~fixed)
            cols = [base[j].reshape(-1)] + [modes[f][j].reshape(-1) for f in free]
            cols += [np.tile([1.0, 0.0], len(j)), np.tile([0.0, 1.0], len(j))]
            a = np.stack(cols, 1)
            sol, *_ = np.linalg.lstsq(a * sqrt_w[:, None], target * sqrt_w, rcond=None)
            scale = sol[0]
            b = fixed_value.copy()
            b[free] = sol[1:1 + len(free)] / (scale if scale != 0 else 1.0)
            if limit is None:
                break
            over = (np.abs(b) > limit) & ~fixed
            if not over.any():
                break
            fixed |= over
            fixed_value[over] = np.sign(b[over]) * limit[over]
        if limit is not None:
            b = np.clip(b, -limit, limit)
        coeffs = b
        t = np.array([cos * sol[-2] - sin * sol[-1], sin * sol[-2] + cos * sol[-1]])
        qm = mean + np.einsum("k,kcd->cd", coeffs, modes)
        rot = scale * np.array([[cos, -sin], [sin, cos]])
        result = (qm @ rot.T + t, coeffs, np.array([scale * cos, scale * sin, t[0], t[1]]))
    return result


def fit_shape_ref(heatmaps: torch.Tensor, model: ShapeModel, windows=(None, 20, 7), threshold: float = 0.01,
                  bound_sigma: float | None = 3.0, kabsch_threshold: float = 0.1) -> ShapeFit:
    """``fit_shape`` face by face in NumPy float64, building the pixel-level weighted system literally (one equation
    per heatmap pixel) and solving it with ``numpy.linalg.lstsq``. The test oracle; slow. Same arguments and result."""
    windows = _check_fit_args(heatmaps, model, windows, threshold, bound_sigma, kabsch_threshold)
    maps = heatmaps.detach().cpu().double().numpy()
    out_dtype = _acc_dtype(heatmaps.dtype)
    if len(maps):
        _check_peaks(torch.from_numpy(maps.reshape(*maps.shape[:2], -1).max(axis=2)))
    fits = [_ref_face(face, model, windows, threshold, bound_sigma, kabsch_threshold) for face in maps]
    shapes = ((model.n_landmarks, 2), (model.n_modes,), (4,))
    parts = [torch.as_tensor(np.stack([f[i] for f in fits]) if fits else np.zeros((0,) + shapes[i]))
             for i in range(3)]
    return ShapeFit(*(p.to(out_dtype).to(heatmaps.device) for p in parts))
