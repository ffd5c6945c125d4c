"""Multi-face scenes composed from real annotated faces, with known truth: for testing and calibrating the
detection-free pipeline (``Detector.detect``), which has no public multi-face set with 68-point truth to run on.

Each face is pasted as the square 1.5x its tight box around the landmarks, scaled so that its training box
(``face_box``) has the requested size; points are mapped with the same affine. Coordinates are 0-based pixels.
"""
from __future__ import annotations

import cv2
import numpy as np

from lgc_fast.data.geometry import face_box, transform_points
from lgc_fast.errors import LgcError

PASTE_HALF = 0.75  # half the side of the pasted square, in training-box sizes


def clutter_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: smooth noise plus random ellipses and lines, a background with edges and blobs (so a
    detector is tested against structure, not a flat canvas) that holds no face."""
    low = rng.uniform(40, 200, size=(max(height // 32, 2), max(width // 32, 2), 3)).astype(np.float32)
    canvas = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    canvas += rng.normal(0, 6, size=canvas.shape).astype(np.float32)
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 12))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(8, max(width // 6, 9))), int(rng.integers(8, max(height // 6, 9))))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(canvas, p0, p1, colour, int(rng.integers(1, 6)))
    return canvas


def paste_faces(faces, placements, height: int, width: int, background: np.ndarray | None = None):
    """Pastes faces onto a canvas.

    faces: sequence of (image, points) with image an RGB (h, w, 3) uint8 array or an image file path, points (68, 2);
    placements: one (box_size, (cx, cy)) per face: the face's training box side and centre on the canvas;
    background: (height, width, 3) uint8 (default flat grey 90).
    Returns (canvas (height, width, 3) uint8 RGB, [points (68, 2) on the canvas, one per face]).
    """
    if len(faces) != len(placements):
        raise ValueError(f"faces and placements differ in length ({len(faces)} != {len(placements)})")
    if background is None:
        canvas = np.full((height, width, 3), 90, np.uint8)
    elif background.shape != (height, width, 3):
        raise ValueError(f"background must have shape {(height, width, 3)}, got {background.shape}")
    else:
        canvas = background.copy()
    truth = []
    for (image, pts), (box_size, centre) in zip(faces, placements):
        if not isinstance(image, np.ndarray):
            bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
            if bgr is None:
                raise LgcError(f"{image}: not a readable image")
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        cx, cy, size = face_box(pts)
        zoom = box_size / size
        affine = np.array([[zoom, 0, centre[0] - zoom * cx], [0, zoom, centre[1] - zoom * cy]])
        warped = cv2.warpAffine(image, affine, (width, height), flags=cv2.INTER_AREA)
        region = np.zeros(image.shape[:2], np.uint8)
        half = PASTE_HALF * size
        region[max(int(cy - half), 0):int(cy + half), max(int(cx - half), 0):int(cx + half)] = 1
        mask = cv2.warpAffine(region, affine, (width, height), flags=cv2.INTER_NEAREST).astype(bool)
        canvas[mask] = warped[mask]
        truth.append(transform_points(pts, affine))
    return canvas, truth


def random_placements(rng: np.random.Generator, count: int, height: int, width: int, min_box: float,
                      max_box: float, tries: int = 200) -> list[tuple[float, tuple[float, float]]]:
    """Up to `count` placements (box_size, (cx, cy)) whose pasted squares lie inside the canvas and do not overlap;
    box sizes log-uniform in [min_box, max_box]. Fewer are returned when the canvas has no room after `tries`."""
    if not 0 < min_box <= max_box:
        raise ValueError(f"need 0 < min_box <= max_box, got {min_box}, {max_box}")
    placed: list[tuple[float, tuple[float, float]]] = []
    for _ in range(tries):
        if len(placed) == count:
            break
        size = float(np.exp(rng.uniform(np.log(min_box), np.log(max_box))))
        half = PASTE_HALF * size  # the pasted square's half side
        if 2 * half >= min(height, width):
            continue
        cx, cy = rng.uniform(half, width - half), rng.uniform(half, height - half)
        if all(max(abs(cx - c[0]), abs(cy - c[1])) > half + PASTE_HALF * s for s, c in placed):
            placed.append((size, (cx, cy)))
    return placed
