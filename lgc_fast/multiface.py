"""The multi-face search of ``Detector.detect`` (paper section 4.3) in pieces: pure functions of arrays and maps,
so that each can be tested on its own. The pyramid's levels (``pyramid_shapes``, ``build_pyramid``), their
combination by a pixel-wise maximum (``combine_levels``, ``sample_levels``), candidates at local maxima
(``find_candidates``), face-centre votes and their clustering (``face_votes``, ``cluster_votes``), hypotheses as
similarities fitted to the mean shape (``face_hypotheses``), their crops of the combined maps (``crop_maps``) and the
plausibility filters with overlap suppression (``select_faces``). ``lgc_fast.detect`` runs them; the steps are
described there."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lgc_fast.data.geometry import invert_affine, transform_points

CROP = 96  # training crop side (paper section 3.1); a checkpoint's "image_size" overrides it
ENLARGE = 1.17  # training boxes: tight box around the points, enlarged by 17 %
PYRAMID_STEP = 2.0  # paper section 4.3: the image, then halved again and again
# The levels' pixels sum to about 1 / (1 - step^-2) times the image's (1.33 at 2, 5.8 at 1.1), and the search keeps
# 68 heatmaps of each; a step near 1 would ask for thousands of levels.
MIN_PYRAMID_STEP = 1.1
# Defaults of detect() (documented there): threshold and support give the best F1 of bench/bench_detect.py with the
# bundled model (24 scenes, 49 held-out faces; bench/results/cpu-amd-epyc.json); the Mahalanobis bound stays 8 (12
# scores 0.014 more F1 there: one face in 49, within the noise of 24 scenes).
THRESHOLD, MIN_LANDMARKS, MIN_SUPPORT, MAX_MAHALANOBIS, SCALE_TOLERANCE, MAX_OVERLAP = 0.5, 8, 30, 8.0, 1.5, 0.3


@dataclass
class Face:
    """One face: points (68, 2) in image pixels (x, y); confidence (68,) the heatmap value at each point, clipped to
    [0, 1]; score their mean; box (x0, y0, x1, y1): from ``landmarks`` the square the network saw, from ``detect``
    the training-style box of the found points (their tight square enlarged by 17 %, usable as a ``landmarks`` box)."""

    points: np.ndarray
    confidence: np.ndarray
    score: float
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 4),
                "points": np.round(self.points, 3).tolist(), "confidence": np.round(self.confidence, 4).tolist()}




def check_pyramid_step(step, name: str = "the pyramid step") -> None:
    """ValueError naming `name` unless step >= MIN_PYRAMID_STEP."""
    if not step >= MIN_PYRAMID_STEP:
        raise ValueError(f"{name} must be at least {MIN_PYRAMID_STEP:g} (finer pyramids hold over 5.8 times the "
                         f"image's pixels in heatmaps), got {step!r}")


def pyramid_shapes(height: int, width: int, min_side: int = CROP, step: float = PYRAMID_STEP) -> list[tuple[int, int]]:
    """Level sizes (h, w): level k is ceil(size / step^k) (step 2: halved, rounding up), at least 1 px, down to the
    first level whose short side < min_side."""
    check_pyramid_step(step)
    shapes = [(int(height), int(width))]
    while min(shapes[-1]) >= min_side:
        factor = step ** len(shapes)
        shapes.append((max(1, math.ceil(height / factor - 1e-9)), max(1, math.ceil(width / factor - 1e-9))))
    return shapes


def build_pyramid(gray: np.ndarray, min_side: int = CROP, step: float = PYRAMID_STEP) -> list[np.ndarray]:
    """gray (H, W) float32 -> the pyramid levels (area averaging, each from the one before), level 0 `gray` itself."""
    levels = [gray]
    for h, w in pyramid_shapes(*gray.shape, min_side, step)[1:]:
        levels.append(cv2.resize(levels[-1], (w, h), interpolation=cv2.INTER_AREA))
    return levels


def _normalised_grid(xy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # grid_sample's normalised coordinates span the image's outer pixel edges, so the same grid addresses every
    # pyramid level: level pixel u = (x + 0.5) * w_l / W - 0.5 is the bilinear upsampling used by the combination.
    return torch.stack(((2 * xy[..., 0] + 1) / width - 1, (2 * xy[..., 1] + 1) / height - 1), dim=-1)


def sample_levels(levels: list[torch.Tensor], height: int, width: int, xy: torch.Tensor,
                  channels: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined map at arbitrary points: max over levels of each level's map upsampled bilinearly to the
    height x width original resolution (border values continue outwards).

    levels: list of (C, h_l, w_l); xy: (P, Q, 2) original-image pixel coordinates.
    Returns (values (C', P, Q), winning level index (C', P, Q) int64) for the selected channels.
    """
    grid = _normalised_grid(xy.to(levels[0].device, levels[0].dtype), height, width)[None]
    best = winner = None
    for index, level in enumerate(levels):
        vals = F.grid_sample(level[None, channels], grid, mode="bilinear", padding_mode="border",
                             align_corners=False)[0]
        if best is None:
            best, winner = vals, torch.zeros(vals.shape, dtype=torch.int64, device=vals.device)
        else:
            better = vals > best
            best = torch.where(better, vals, best)
            winner = torch.where(better, index, winner)
    return best, winner


def combine_levels(levels: list[torch.Tensor], height: int, width: int,
                   channels: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined maps over the whole image: pixel-wise max over levels of each level upsampled bilinearly to
    height x width (``sample_levels`` at every pixel centre, computed with F.interpolate, which is faster).

    levels: list of (C, h_l, w_l), level 0 of size height x width. Returns (values (C', H, W), level (C', H, W) int8).
    """
    best = levels[0][channels].clone()
    winner = torch.zeros(best.shape, dtype=torch.int8, device=best.device)
    for index, level in enumerate(levels[1:], start=1):
        up = F.interpolate(level[None, channels], size=(height, width), mode="bilinear", align_corners=False)[0]
        better = up > best
        winner.masked_fill_(better, index)
        torch.maximum(best, up, out=best)
    return best, winner


def square_max(values: torch.Tensor, radius: int) -> torch.Tensor:
    """values (C, H, W) -> the maximum over each pixel's (2 radius + 1)^2 neighbourhood inside the image (what
    max_pool2d with stride 1 gives), as row then column maxima of shifted views: whole-array vectorised passes,
    several times faster than max_pool2d's stride-1 loops on the CPU."""
    out = values.clone()
    for axis in (2, 1):
        src = out.clone()
        size = src.shape[axis]
        for shift in range(1, min(radius, size - 1) + 1):
            torch.maximum(out.narrow(axis, 0, size - shift), src.narrow(axis, shift, size - shift),
                          out=out.narrow(axis, 0, size - shift))
            torch.maximum(out.narrow(axis, shift, size - shift), src.narrow(axis, 0, size - shift),
                          out=out.narrow(axis, shift, size - shift))
    return out


def find_candidates(levels: list[torch.Tensor], height: int, width: int, threshold: float, radius: int = 2,
                    per_channel: int = 64, chunk_bytes: int = 1 << 28) -> np.ndarray:
    """Local maxima of the combined maps above `threshold` -> (M, 5) float64 rows (channel, x, y, value, level).

    A pixel is a maximum when it equals the maximum of its (2 radius + 1)^2 neighbourhood; at most `per_channel`
    strongest per channel. Channels are combined a few at a time so that about chunk_bytes are held at once.
    """
    n_channels = levels[0].shape[0]
    chunk = int(max(1, min(n_channels, chunk_bytes // (16 * height * width))))
    rows = []
    for c0 in range(0, n_channels, chunk):
        values, winner = combine_levels(levels, height, width, slice(c0, c0 + chunk))
        pooled = square_max(values, radius)
        k, y, x = torch.nonzero((values == pooled) & (values > threshold), as_tuple=True)
        rows.append(torch.stack([(k + c0).double(), x.double(), y.double(), values[k, y, x].double(),
                                 winner[k, y, x].double()], dim=1).cpu().numpy())
    found = np.concatenate(rows)
    # By channel, strongest first, then raster order; equal neighbours (plateaus, e.g. a peak upsampled between two
    # pixels) keep only their first pixel.
    found = found[np.lexsort((found[:, 1], found[:, 2], -found[:, 3], found[:, 0]))]
    keep = np.ones(len(found), dtype=bool)
    for start, stop in zip(*_runs(found[:, 0])):
        for i in range(start, stop):
            if keep[i]:
                near = np.abs(found[i + 1:stop, 1:3] - found[i, 1:3]).max(axis=1) <= radius
                keep[i + 1:stop][near] = False
    found = found[keep]
    rank = np.arange(len(found)) - np.searchsorted(found[:, 0], found[:, 0])
    return found[rank < per_channel]


def _runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the runs of equal values in a sorted 1-D array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    return np.concatenate(([0], edges)), np.concatenate((edges, [len(sorted_keys)]))


def canonical_mean(shape_model, crop: int = CROP) -> tuple[np.ndarray, float]:
    """The shape model's mean placed in a crop x crop training crop (tight box enlarged by 17 %, centred) ->
    (points (C, 2) crop pixels, crop pixels per mean-shape unit)."""
    mean = np.asarray(shape_model.mean, dtype=np.float64)
    lo, hi = mean.min(axis=0), mean.max(axis=0)
    scale = crop / (float((hi - lo).max()) * ENLARGE)
    return (mean - (lo + hi) / 2) * scale + (crop - 1) / 2, scale


def face_votes(candidates: np.ndarray, mean_crop: np.ndarray, level_scales: np.ndarray,
               crop: int = CROP) -> np.ndarray:
    """Face-centre votes (M, 2): each candidate (channel, x, y, value, level) minus its landmark's offset from the
    crop centre in `mean_crop` (C, 2), scaled by its level's original-pixels-per-level-pixel factor."""
    channel = candidates[:, 0].astype(np.int64)
    scale = level_scales[candidates[:, 4].astype(np.int64)]
    return candidates[:, 1:3] - scale[:, None] * (mean_crop[channel] - (crop - 1) / 2)


def cluster_votes(votes: np.ndarray, weights: np.ndarray, scales: np.ndarray, radius: float = 0.25,
                  iterations: int = 20, crop: int = CROP) -> np.ndarray:
    """Greedy weighted mean shift -> a cluster label per vote (M,), -1 for votes that joined no cluster.

    Seeds are taken strongest first; a cluster gathers the unlabelled votes within radius * crop * scale of its centre
    (scale: the seed's level factor) whose scale is within a factor of two of the seed's, and its centre moves to
    their weighted mean until it settles.
    """
    m = len(votes)
    labels = np.full(m, -1, dtype=np.int64)
    tried = np.zeros(m, dtype=bool)
    label = 0
    for seed in np.argsort(-weights, kind="stable"):
        if labels[seed] >= 0 or tried[seed]:
            continue
        tried[seed] = True
        reach = radius * crop * scales[seed]
        free = (labels < 0) & (scales <= 2.01 * scales[seed]) & (scales >= scales[seed] / 2.01)
        centre = votes[seed]
        for _ in range(iterations):
            members = free & (np.linalg.norm(votes - centre, axis=1) <= reach)
            if not members.any():
                break
            moved = np.average(votes[members], axis=0, weights=weights[members])
            done = np.linalg.norm(moved - centre) < 1e-3 * reach
            centre = moved
            if done:
                break
        members = free & (np.linalg.norm(votes - centre, axis=1) <= reach)
        if members.any():
            labels[members] = label
            label += 1
    return labels


def fit_similarity(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[complex, complex]:
    """Weighted least-squares similarity dst ~ q src + t in complex form -> (q, t): |q| scale, arg q rotation."""
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    w = weights / weights.sum()
    ms, md = (w * zs).sum(), (w * zd).sum()
    q = (w * np.conj(zs - ms) * (zd - md)).sum() / (w * np.abs(zs - ms) ** 2).sum()
    return complex(q), complex(md - q * ms)


def similarity_affine(q: complex, t: complex) -> np.ndarray:
    """The (2, 3) affine of z -> q z + t."""
    return np.array([[q.real, -q.imag, t.real], [q.imag, q.real, t.imag]])


def face_hypotheses(candidates: np.ndarray, labels: np.ndarray, mean_crop: np.ndarray, level_scales: np.ndarray,
                    min_landmarks: int = 8) -> list[np.ndarray]:
    """One (2, 3) image -> crop affine per cluster with at least `min_landmarks` distinct landmarks: the similarity
    that maps the cluster's strongest candidate per landmark onto `mean_crop`, scaled within a factor of two of the
    cluster's level."""
    hypotheses = []
    for label in range(labels.max() + 1 if len(labels) else 0):
        rows = candidates[labels == label]
        rows = rows[np.argsort(-rows[:, 3], kind="stable")]
        _, first = np.unique(rows[:, 0], return_index=True)
        rows = rows[first]
        if len(rows) < min_landmarks:
            continue
        q, t = fit_similarity(mean_crop[rows[:, 0].astype(np.int64)], rows[:, 1:3], rows[:, 3])
        level_scale = np.average(level_scales[rows[:, 4].astype(np.int64)], weights=rows[:, 3])
        if not 0.5 <= abs(q) / level_scale <= 2.0:
            continue
        hypotheses.append(invert_affine(similarity_affine(q, t)))
    return hypotheses


def crop_maps(levels: list[torch.Tensor], level_scales: np.ndarray, height: int, width: int,
              affines: list[np.ndarray], mean_crop: np.ndarray, window: float = 0.4, crop: int = CROP) -> torch.Tensor:
    """Each hypothesis' heatmaps in its crop frame -> (N, C, crop, crop).

    The combined maps of the levels whose scale is within a factor of two of the hypothesis' (the nearest level if
    none is), so that a much larger or smaller face nearby does not leak into the fit; channel j is kept only within
    window * crop px of the mean shape's landmark j (``mean_crop`` (C, 2)), so that neighbouring faces of the same
    scale do not either.
    """
    n_channels = levels[0].shape[0]
    u = np.arange(crop, dtype=np.float64)
    uv = np.stack(np.meshgrid(u, u, indexing="xy"), axis=-1)
    dist = np.linalg.norm(uv[None] - mean_crop[:, None, None], axis=-1)
    device = levels[0].device
    keep = torch.from_numpy(dist <= window * crop).to(device)
    out = torch.zeros((len(affines), n_channels, crop, crop), device=device)
    for i, affine in enumerate(affines):
        scale = 1.0 / np.sqrt(abs(np.linalg.det(np.asarray(affine)[:, :2])))  # image px per crop px
        ratio = level_scales / scale
        chosen = np.flatnonzero((ratio >= 0.5) & (ratio <= 2.0))
        if chosen.size == 0:
            chosen = [int(np.argmin(np.abs(np.log(ratio))))]
        xy = transform_points(uv.reshape(-1, 2), invert_affine(affine)).reshape(crop, crop, 2)
        values, _ = sample_levels([levels[k] for k in chosen], height, width, torch.from_numpy(xy).float())
        out[i] = torch.where(keep, values, 0.0)
    return out


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def suppress_overlaps(faces: list[Face], max_iou: float) -> list[Face]:
    """Faces sorted by score, dropping any whose box overlaps a kept one by more than `max_iou` (intersection over
    union: a face inside a much larger one is kept, since either may be the false one)."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(box_iou(face.box, k.box) <= max_iou for k in kept):
            kept.append(face)
    return kept



@dataclass
class Hypothesis:
    """A fitted face of ``detect`` before its plausibility filters: support, the fitted points on activations above
    the threshold; mahalanobis, of the shape coefficients; scale_ratio, the fitted face size over the crop's."""

    face: Face
    support: int
    mahalanobis: float
    scale_ratio: float


def select_faces(hypotheses: list[Hypothesis], min_support: int = MIN_SUPPORT,
                 max_mahalanobis: float = MAX_MAHALANOBIS, scale_tolerance: float = SCALE_TOLERANCE,
                 max_overlap: float = MAX_OVERLAP) -> list[Face]:
    """The plausible hypotheses' faces, overlaps suppressed (arguments as in ``Detector.detect``)."""
    kept = [h.face for h in hypotheses if h.support >= min_support and h.mahalanobis <= max_mahalanobis
            and 1 / scale_tolerance <= h.scale_ratio <= scale_tolerance]
    return suppress_overlaps(kept, max_overlap)
