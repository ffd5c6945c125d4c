"""Landmark error metrics for 68-point iBUG / 300-W annotations (0-based point indices).

Per image, the normalised mean error (NME) is the mean Euclidean distance between predicted and ground-truth points
over the labelled points of a subset, divided by a normalising distance:
- inter-ocular: the outer eye corners, points 36 and 45;
- inter-pupil: the eye centres, the means of the labelled points 36-41 and 42-47;
- box: sqrt(w * h) of the ground-truth box, the tight box around the labelled ground-truth points.
Subsets: all 68 points, or the 51 inner points 17..67 (without the face outline).
An image whose normaliser is undefined (its points unlabelled) or that has no labelled point in the subset gets NaN
and is left out of that metric's statistics (the count says how many images entered).

Over a set of images: mean, median, the failure rate at a threshold t (fraction of images with NME > t) and the
area under the cumulative error distribution (CED) up to t, normalised to 1:
AUC_t = (1/t) * integral_0^t CED(e) de = mean_i max(0, t - e_i) / t, computed exactly (no sampling of the curve).
"""
from __future__ import annotations

import math

import numpy as np

N_POINTS = 68
OUTER_EYE_CORNERS = (36, 45)
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
SUBSETS = {"68": tuple(range(68)), "51": tuple(range(17, 68))}
NORMALISERS = ("inter_ocular", "inter_pupil", "box")
THRESHOLDS = (0.08, 0.10)


def _as_arrays(gt, labelled):
    g = np.asarray(gt, dtype=np.float64)
    if g.ndim != 3 or g.shape[1:] != (N_POINTS, 2):
        raise ValueError(f"ground truth must have shape (N, {N_POINTS}, 2), got {g.shape}")
    lab = np.ones(g.shape[:2], dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    if lab.shape != g.shape[:2]:
        raise ValueError(f"labelled must have shape {g.shape[:2]}, got {lab.shape}")
    return g, lab


def inter_ocular(gt, labelled=None) -> np.ndarray:
    """gt: (N, 68, 2), labelled: (N, 68) bool -> (N,) distance between points 36 and 45 (NaN if either unlabelled)."""
    g, lab = _as_arrays(gt, labelled)
    a, b = OUTER_EYE_CORNERS
    d = np.linalg.norm(g[:, a] - g[:, b], axis=1)
    return np.where(lab[:, a] & lab[:, b], d, np.nan)


def inter_pupil(gt, labelled=None) -> np.ndarray:
    """gt: (N, 68, 2) -> (N,) distance between the eye centres (means of the labelled 36-41 and 42-47)."""
    g, lab = _as_arrays(gt, labelled)

    def centre(idx):
        m = lab[:, idx].astype(np.float64)
        count = m.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (g[:, idx] * m[..., None]).sum(axis=1) / count[:, None]

    return np.linalg.norm(centre(list(RIGHT_EYE)) - centre(list(LEFT_EYE)), axis=1)


def box_size(gt, labelled=None) -> np.ndarray:
    """gt: (N, 68, 2) -> (N,) sqrt(w * h) of the tight box around the labelled points (NaN if none labelled)."""
    g, lab = _as_arrays(gt, labelled)
    lo = np.where(lab[..., None], g, np.inf).min(axis=1)
    hi = np.where(lab[..., None], g, -np.inf).max(axis=1)
    with np.errstate(invalid="ignore"):
        size = np.sqrt(np.prod(hi - lo, axis=1))
    return np.where(lab.any(axis=1), size, np.nan)


NORMALISER_FUNCTIONS = {"inter_ocular": inter_ocular, "inter_pupil": inter_pupil, "box": box_size}


def point_errors(pred, gt, labelled=None) -> np.ndarray:
    """pred, gt: (N, 68, 2) -> (N, 68) Euclidean distances, NaN at unlabelled points."""
    g, lab = _as_arrays(gt, labelled)
    p = np.asarray(pred, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"predictions must have the shape of the ground truth {g.shape}, got {p.shape}")
    return np.where(lab, np.linalg.norm(p - g, axis=2), np.nan)


def nme(pred, gt, labelled=None, normaliser: str = "inter_ocular", subset: str = "68") -> np.ndarray:
    """(N,) per-image NME over the labelled points of `subset` ("68" or "51") divided by `normaliser`."""
    if normaliser not in NORMALISER_FUNCTIONS:
        raise ValueError(f"normaliser must be one of {', '.join(NORMALISERS)}, not {normaliser!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}, not {subset!r}")
    err = point_errors(pred, gt, labelled)[:, list(SUBSETS[subset])]
    norm = NORMALISER_FUNCTIONS[normaliser](gt, labelled)
    count = np.sum(~np.isnan(err), axis=1)
    mean_err = np.where(count > 0, np.nansum(err, axis=1) / np.maximum(count, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = mean_err / norm
    return np.where(np.isfinite(out), out, np.nan)


def failure_rate(errors, threshold: float) -> float:
    """Fraction of the (non-NaN) images with error > threshold; NaN for no images."""
    e = _valid(errors)
    return float(np.mean(e > threshold)) if e.size else math.nan


def auc(errors, threshold: float) -> float:
    """Area under the CED curve on [0, threshold], divided by threshold (1 = every error is 0)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    e = _valid(errors)
    return float(np.mean(np.clip(threshold - e, 0.0, None)) / threshold) if e.size else math.nan


def ced(errors, max_error: float, steps: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """The cumulative error distribution sampled at `steps` points of [0, max_error]: (x, fraction with error <= x)."""
    e = np.sort(_valid(errors))
    x = np.linspace(0.0, max_error, steps)
    y = np.searchsorted(e, x, side="right") / max(e.size, 1)
    return x, y


def summarize(errors, thresholds=THRESHOLDS) -> dict:
    """count, mean, median, and failure_rate/auc at each threshold (keys like ``failure_rate@0.08``)."""
    e = _valid(errors)
    out = {"count": int(e.size),
           "mean": float(e.mean()) if e.size else math.nan,
           "median": float(np.median(e)) if e.size else math.nan}
    for t in thresholds:
        out[f"failure_rate@{t:g}"] = failure_rate(e, t)
        out[f"auc@{t:g}"] = auc(e, t)
    return out


def all_errors(pred, gt, labelled=None) -> dict[str, np.ndarray]:
    """Per-image NME for every normaliser and subset: {"inter_ocular/68": (N,), "inter_ocular/51": ..., ...}."""
    return {f"{n}/{s}": nme(pred, gt, labelled, n, s) for n in NORMALISERS for s in SUBSETS}


def _valid(errors) -> np.ndarray:
    e = np.asarray(errors, dtype=np.float64).ravel()
    return e[~np.isnan(e)]
