"""Overlay drawing: 68 iBUG landmarks joined along the face's contours, a box and a score per face."""
from __future__ import annotations

import os

import cv2
import numpy as np

from lgc_fast._io import atomic_write_bytes
from lgc_fast.errors import LgcError

# 0-based index ranges of the iBUG 68-point contours and whether each closes on itself.
CONTOURS_68 = (
    (range(0, 17), False),   # jaw
    (range(17, 22), False),  # right brow (subject's right)
    (range(22, 27), False),  # left brow
    (range(27, 31), False),  # nose bridge
    (range(31, 36), False),  # nostrils
    (range(36, 42), True),   # right eye
    (range(42, 48), True),   # left eye
    (range(48, 60), True),   # outer lips
    (range(60, 68), True),   # inner lips
)

POINT_COLOR = (0, 255, 0)  # BGR
LINE_COLOR = (255, 200, 0)
BOX_COLOR = (0, 160, 255)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """(H, W) gray or (H, W, 3) BGR, any numeric dtype in [0, 255] -> a (H, W, 3) uint8 copy to draw on."""
    img = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img.copy()
    raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {img.shape}")


def draw_faces(image: np.ndarray, faces, draw_box: bool = True) -> np.ndarray:
    """A BGR copy of `image` with every face drawn.

    faces: iterable of mappings with "points" (68, 2) in 0-based pixel coordinates (x, y), optional "box"
    (x0, y0, x1, y1) and optional "score". Line widths follow the image size so overlays stay legible.
    """
    out = to_bgr(image)
    thick = max(1, round(max(out.shape[:2]) / 400))
    shift = 4  # sub-pixel drawing: coordinates in 1/16 px
    scale = 1 << shift
    for face in faces:
        pts = np.asarray(face["points"], dtype=np.float64)
        fixed = np.round(pts * scale).astype(np.int32)
        if len(pts) == 68:
            for idx, closed in CONTOURS_68:
                cv2.polylines(out, [fixed[list(idx)]], closed, LINE_COLOR, thick, cv2.LINE_AA, shift)
        for p in fixed:
            cv2.circle(out, (int(p[0]), int(p[1])), (thick + 1) * scale, POINT_COLOR, -1, cv2.LINE_AA, shift)
        box = face.get("box")
        if draw_box and box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            cv2.rectangle(out, (x0, y0), (x1, y1), BOX_COLOR, thick, cv2.LINE_AA)
            if face.get("score") is not None:
                cv2.putText(out, f"{face['score']:.2f}", (x0, max(y0 - 4 * thick, 10 * thick)),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, BOX_COLOR, thick, cv2.LINE_AA)
    return out


def save_image(path, image: np.ndarray) -> None:
    """Write `image` to `path` (format from the extension) atomically: a temp file in the same folder, then rename."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1] or ".png"
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise LgcError(f"{path}: cannot encode an image with extension {ext!r}")
    atomic_write_bytes(path, lambda f: f.write(buf.tobytes()))
