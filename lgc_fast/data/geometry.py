"""Face boxes, crop affines, image warping and the iBUG 68-point mirror permutation.

Coordinates everywhere are 0-based pixel coordinates with pixel centres at integers (OpenCV's convention): pixel
(i, j) covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]. An affine is a (2, 3) array A with p' = A[:, :2] @ p + A[:, 2].
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from lgc_fast.errors import LgcError

# Index i of a mirrored face takes the point MIRROR_68[i] of the original (0-based iBUG / 300-W order).
# It is an involution: left and right features swap; points on the symmetry axis stay.
_PAIRS = (
    [(i, 16 - i) for i in range(8)]  # jaw 0..16, chin 8 fixed
    + [(17 + i, 26 - i) for i in range(5)]  # brows 17..21 <-> 26..22
    + [(31, 35), (32, 34)]  # nose base, 33 (tip) fixed; bridge 27..30 fixed
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes: corners swap, lids swap in reverse order
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lip, 51 and 57 fixed
    + [(60, 64), (61, 63), (65, 67)]  # inner lip, 62 and 66 fixed
)


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(68)
    for a, b in _PAIRS:
        perm[a], perm[b] = b, a
    perm.setflags(write=False)
    return perm


MIRROR_68 = _mirror_permutation()


def face_box(points, labelled=None, enlarge: float = 1.17) -> tuple[float, float, float]:
    """The tight square box around the labelled points, its side enlarged by `enlarge` -> (cx, cy, size).

    points: (P, 2); labelled: (P,) bool or None (then the non-NaN points). This is the paper's protocol where a data set
    gives no boxes (tight box around the ground truth, enlarged by 17 %).
    """
    points = np.asarray(points, dtype=np.float64)
    if labelled is None:
        labelled = ~np.isnan(points).any(axis=1)
    used = points[np.asarray(labelled, dtype=bool)]
    if len(used) == 0:
        raise LgcError("cannot place a face box: no labelled points")
    lo, hi = used.min(axis=0), used.max(axis=0)
    size = float((hi - lo).max()) * enlarge
    if not size > 0:
        raise LgcError(f"cannot place a face box: the labelled points span no area ({len(used)} point(s))")
    cx, cy = (lo + hi) / 2.0
    return float(cx), float(cy), size


def box_to_square(box) -> tuple[float, float, float]:
    """(x0, y0, x1, y1) -> (cx, cy, size): the square with the box's centre and its longer side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, max(x1 - x0, y1 - y0)


def square_to_box(cx: float, cy: float, size: float) -> tuple[float, float, float, float]:
    """(cx, cy, size) -> the square's (x0, y0, x1, y1); the inverse of box_to_square on squares."""
    half = size / 2.0
    return cx - half, cy - half, cx + half, cy + half


def crop_transform(center, size: float, out_size: int = 96, scale: float = 1.0, angle_deg: float = 0.0,
                   mirror: bool = False) -> np.ndarray:
    """(2, 3) float64 affine from image pixels to crop pixels.

    The square of side `size` centred on `center` = (cx, cy) fills the out_size x out_size crop (its edges land on the
    crop's outer pixel edges, -0.5 and out_size - 0.5). Then, about the crop centre, the face is magnified by `scale`,
    rotated by `angle_deg` (positive turns +x towards +y, i.e. clockwise on screen) and, if `mirror`, flipped
    left-right. Mirroring moves points, it does not relabel them: apply MIRROR_68 to the point order as well.
    """
    if not size > 0:
        raise ValueError(f"size must be > 0, got {size}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    zoom = out_size / size * scale
    theta = math.radians(angle_deg)
    linear = zoom * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    if mirror:
        linear[0] = -linear[0]
    mid = (out_size - 1) / 2.0
    offset = np.array([mid, mid]) - linear @ np.asarray(center, dtype=np.float64)
    return np.hstack([linear, offset[:, None]])


def compose(outer, inner) -> np.ndarray:
    """(2, 3) affines -> the (2, 3) affine applying `inner` first, then `outer`."""
    outer = np.asarray(outer, dtype=np.float64)
    inner = np.asarray(inner, dtype=np.float64)
    return np.hstack([outer[:, :2] @ inner[:, :2], (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]])


def transform_points(points, affine) -> np.ndarray:
    """points: (P, 2), affine: (2, 3) -> (P, 2) float64; NaN (unlabelled) points stay NaN."""
    points = np.asarray(points, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    return points @ affine[:, :2].T + affine[:, 2]


def invert_affine(affine) -> np.ndarray:
    """(2, 3) affine -> its inverse (2, 3)."""
    affine = np.asarray(affine, dtype=np.float64)
    linear = np.linalg.inv(affine[:, :2])
    return np.hstack([linear, -(linear @ affine[:, 2])[:, None]])


def warp_image(gray, affine, out_size: int = 96) -> np.ndarray:
    """gray: (H, W) uint8 or float -> (out_size, out_size) float32: bilinear, 0 outside the image.

    `affine` maps image pixels to output pixels (as from crop_transform). Interpolation runs in float32, so the
    output is not rounded to whole grey levels.
    """
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"gray must be a 2-D (H, W) image, got shape {gray.shape}")
    return cv2.warpAffine(gray.astype(np.float32, copy=False), np.asarray(affine, dtype=np.float64),
                          (out_size, out_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0.0)
