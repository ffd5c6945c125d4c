"""Non-face training samples (paper section 4.3: training with background images for detection-free use).

A background sample is a crop that holds no face, with all landmarks labelled and far outside the crop. Eq. 3 then
gives every channel the weight 1/10 (labelled, not visible, no visible landmark in the face) and a zero target, so
the loss pushes all of the sample's heatmaps towards zero without outweighing the faces (visible landmarks weigh
1.1 to 1.6). Backgrounds come from a folder of images of any kind or are drawn procedurally (``"synthetic"``: the
clutter of ``lgc_fast.data.composite.clutter_background``).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from lgc_fast.data.composite import clutter_background
from lgc_fast.data.dataset import EpochDataset, ImageFiles
from lgc_fast.data.geometry import warp_image
from lgc_fast.errors import LgcError

SYNTHETIC = "synthetic"
# Crop pixels: even after the +-12.5 % scaling and 30 degree rotation of the batch augmentation a point there stays
# about 10^4 px from the crop, far beyond the 22 px radius of the kernel K, so its target is exactly 0.
OUTSIDE = -1.0e4
BACKGROUND_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".jp2")
_STREAM = 0x6267  # separates the background draws of (seed, epoch, index) from the faces' augmentation draws


def scan_backgrounds(folder) -> list[Path]:
    """The image files (by BACKGROUND_SUFFIXES, any depth, hidden files left out) under `folder`, in path order.
    LgcError when `folder` is not a folder or holds no image file. Whether they decode is not checked here."""
    root = Path(folder)
    if not root.is_dir():
        raise LgcError(f"--backgrounds {root}: not a folder (or the word '{SYNTHETIC}')")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in BACKGROUND_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise LgcError(f"--backgrounds {root}: no image files ({', '.join(BACKGROUND_SUFFIXES)})")
    return files


def background_count(n_faces: int, fraction: float) -> int:
    """How many backgrounds make them `fraction` of n_faces + backgrounds (rounded, at least 1 for fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return 0
    return max(1, round(n_faces * fraction / (1.0 - fraction)))


def random_square_crop(rng: np.random.Generator, gray: np.ndarray, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """gray: (H, W) -> (crop (out_size, out_size) float32, affine (2, 3) float64 image -> crop).

    A square of random side in [out_size, min(H, W)] at a random position, scaled to out_size (the same bilinear warp
    as the face crops, so faces and backgrounds do not differ in resampling); an image with a side shorter than
    out_size is resized whole instead (bilinear, edge pixels repeated rather than blended with black).
    """
    h, w = gray.shape
    whole = min(h, w) < out_size
    if whole:
        x0, y0, region_w, region_h = 0, 0, w, h
    else:
        side = int(rng.integers(out_size, min(h, w) + 1))
        x0, y0, region_w, region_h = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side, side
    # Pixel edges x0 - 0.5 .. x0 + region_w - 0.5 land on the crop's outer edges -0.5 .. out_size - 0.5.
    sx, sy = out_size / region_w, out_size / region_h
    affine = np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5], [0.0, sy, (0.5 - y0) * sy - 0.5]])
    if whole:
        return cv2.resize(gray.astype(np.float32), (out_size, out_size), interpolation=cv2.INTER_LINEAR), affine
    return warp_image(gray, affine, out_size), affine


class BackgroundDataset(EpochDataset):
    """`count` background samples per epoch, from image files or drawn procedurally.

    source: a sequence of image paths, or SYNTHETIC. Item `index` of epoch e uses the image at position
    (e * count + index) mod len(source), so the epochs walk through a folder larger than `count`, and a random crop
    of it (random_square_crop) drawn from (seed, e, index); a synthetic item is a clutter canvas of random size in
    [out_size, 3 out_size]^2 drawn from the same generator. Call set_epoch(e) before each epoch.

    Items have the keys of LandmarkDataset's: ``image`` (1, out_size, out_size) float32 in [0, 255]; ``points``
    (n_points, 2) float32, all OUTSIDE; ``labelled`` (n_points,) bool, all True; ``index``; ``affine`` (2, 3) float32
    image -> crop; ``mirrored`` False; plus ``background`` True.

    An image that cannot be read raises LgcError naming it with on_error="raise"; with "skip" the next readable image
    (wrapping around) is used and the file is reported once in ``problems`` and in the log.
    """

    def __init__(self, source, count: int, out_size: int = 96, seed: int = 0, on_error: str = "skip",
                 n_points: int = 68):
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        self.synthetic = isinstance(source, str) and source == SYNTHETIC
        self._images = ImageFiles([] if self.synthetic else [Path(p) for p in source], on_error, "background")
        if not self.synthetic and not self._images.paths:
            raise LgcError("no background images given")
        self.count, self.out_size, self.seed = int(count), int(out_size), int(seed)
        self.n_points = int(n_points)

    def __len__(self) -> int:
        return self.count

    def _image(self, index: int, rng: np.random.Generator) -> np.ndarray:
        if self.synthetic:
            h, w = (int(v) for v in rng.integers(self.out_size, 3 * self.out_size + 1, size=2))
            return cv2.cvtColor(clutter_background(rng, h, w), cv2.COLOR_RGB2GRAY)
        return self._images.first_readable((self.epoch * self.count + index) % len(self._images.paths))[1]

    def __getitem__(self, index: int) -> dict:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} backgrounds")
        index %= self.count
        rng = np.random.default_rng([self.seed, self.epoch, index, _STREAM])
        image, affine = random_square_crop(rng, self._image(index, rng), self.out_size)
        return {
            "image": torch.from_numpy(image[None].copy()),
            "points": torch.full((self.n_points, 2), OUTSIDE, dtype=torch.float32),
            "labelled": torch.ones(self.n_points, dtype=torch.bool),
            "index": index,
            "affine": torch.from_numpy(affine.astype(np.float32)),
            "mirrored": False,
            "background": True,
        }


class FacesAndBackgrounds(torch.utils.data.Dataset):
    """Faces (indices 0 .. len(faces) - 1, as LandmarkDataset gives them plus ``background`` False) followed by
    backgrounds (BackgroundDataset), one dataset for one shuffling sampler, so backgrounds mix into the face batches.
    set_epoch(e) reaches both."""

    def __init__(self, faces, backgrounds: BackgroundDataset):
        self.faces, self.backgrounds = faces, backgrounds

    def __len__(self) -> int:
        return len(self.faces) + len(self.backgrounds)

    def set_epoch(self, epoch: int) -> None:
        self.faces.set_epoch(epoch)
        self.backgrounds.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        n_faces = len(self.faces)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if index >= n_faces:
            return self.backgrounds[index - n_faces]
        return {**self.faces[index], "background": False}
