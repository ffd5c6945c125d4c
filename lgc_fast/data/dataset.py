"""The torch Dataset: crops of annotated faces, optionally augmented (section 4 of the paper) on the CPU with OpenCV."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch

from lgc_fast.data.geometry import MIRROR_68, box_to_square, crop_transform, face_box, transform_points, warp_image
from lgc_fast.data.records import check_on_error
from lgc_fast.errors import LgcError

log = logging.getLogger(__name__)


def read_gray(path) -> np.ndarray | None:
    """The image at `path` as (H, W) uint8 grayscale, or None when it cannot be read or decoded."""
    try:
        encoded = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if encoded.size == 0:
        return None
    gray = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    if gray is None or gray.size == 0:
        return None
    return gray


class ImageFiles:
    """Image files read on demand as (H, W) uint8 grey, standing in the next readable file for an unreadable one.

    An unreadable file raises LgcError naming it with on_error="raise"; with "skip" it is reported once in
    ``problems`` and in the log and skipped from then on. `kind` ("face", "background") names the files in the log.
    """

    def __init__(self, paths, on_error: str, kind: str):
        check_on_error(on_error)
        self.paths = list(paths)
        self.on_error, self.kind = on_error, kind
        self.problems: list[str] = []
        self._unreadable: set[int] = set()

    def first_readable(self, start: int) -> tuple[int, np.ndarray]:
        """(index, image) of the first readable file at or after position `start`, wrapping around."""
        n = len(self.paths)
        for step in range(n):
            candidate = (start + step) % n
            if candidate in self._unreadable:
                continue
            gray = read_gray(self.paths[candidate])
            if gray is not None:
                return candidate, gray
            message = f"{self.paths[candidate]}: cannot read or decode the image"
            if self.on_error == "raise":
                raise LgcError(message)
            self._unreadable.add(candidate)
            self.problems.append(message)
            log.warning("%s; using the next readable %s instead", message, self.kind)
        raise LgcError(f"none of the {n} images can be read (first: {self.paths[0]})")


class EpochDataset(torch.utils.data.Dataset):
    """Base of the training datasets: items read from ``self._images`` (ImageFiles) with random draws fixed by
    (seed, epoch, index)."""

    epoch = 0
    _images: ImageFiles

    @property
    def problems(self) -> list[str]:
        """The unreadable images met so far in this process."""
        return self._images.problems

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of `epoch`: the same (seed, epoch, index) always gives the same item."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)


def draw_augmentation(rng: np.random.Generator, scale: float, rotation_deg: float, mirror: bool,
                      grid: bool) -> tuple[float, float, bool]:
    """One draw -> (scale factor, angle in degrees, mirrored).

    Uniform in [1 - scale, 1 + scale] x [-rotation_deg, rotation_deg], mirrored with probability 1/2. With `grid`, the
    paper's 18 combinations instead: factor in {1 - scale, 1, 1 + scale}, angle in {-rotation_deg, 0, rotation_deg}.
    """
    u = rng.random(3)
    if grid:
        factor = 1.0 + scale * (np.floor(3 * u[0]) - 1)
        angle = rotation_deg * (np.floor(3 * u[1]) - 1)
    else:
        factor = 1.0 + scale * (2 * u[0] - 1)
        angle = rotation_deg * (2 * u[1] - 1)
    return float(factor), float(angle), bool(mirror and u[2] < 0.5)


class LandmarkDataset(EpochDataset):
    """Face crops for training and evaluation.

    Each item is a dict: ``image`` (1, out_size, out_size) float32 grey levels in [0, 255]; ``points`` (P, 2) float32
    in crop pixels (0-based; 0 where unlabelled); ``labelled`` (P,) bool; ``index`` int (the record actually
    returned); ``affine`` (2, 3) float32 image -> crop; ``mirrored`` bool (points already reordered by MIRROR_68).

    The crop is the record's box (squared) or face_box(points). With `augment`, the crop is also scaled, rotated and
    mirrored (see draw_augmentation) with draws fixed by (seed, epoch, index): call set_epoch(e) before each epoch
    (with DataLoader workers, before creating the iterator; persistent workers would keep a stale epoch).

    An unreadable image raises LgcError naming it with on_error="raise"; with "skip" the item is replaced by the next
    readable record in index order (wrapping around), the file is reported once in ``problems`` and in the log.
    Problems found inside DataLoader worker processes stay in those processes; only the log shows them.
    """

    def __init__(self, records, out_size: int = 96, augment: bool = False, seed: int = 0, on_error: str = "skip",
                 scale: float = 0.125, rotation_deg: float = 30.0, mirror: bool = True, grid: bool = False):
        check_on_error(on_error)
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        if not 0 <= scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.records = list(records)
        self.out_size = int(out_size)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.on_error = on_error
        self.scale, self.rotation_deg, self.mirror, self.grid = float(scale), float(rotation_deg), bool(mirror), grid
        self._images = ImageFiles([record.image_path for record in self.records], on_error, "face")
        self._squares = []
        for record in self.records:
            if record.points.ndim != 2 or record.points.shape[1] != 2:
                raise LgcError(f"{record.image_path}: points must have shape (P, 2), got {record.points.shape}")
            if self.augment and self.mirror and len(record.points) != len(MIRROR_68):
                raise LgcError(f"{record.image_path}: mirroring needs the 68 iBUG points, got {len(record.points)}")
            try:
                square = box_to_square(record.box) if record.box is not None else face_box(record.points,
                                                                                            record.labelled)
            except LgcError as exc:
                raise LgcError(f"{record.image_path}: {exc}") from None
            self._squares.append(square)

    def __len__(self) -> int:
        return len(self.records)

    def augmentation(self, index: int) -> tuple[float, float, bool]:
        """(scale factor, angle in degrees, mirrored) used for record `index` in the current epoch."""
        if not self.augment:
            return 1.0, 0.0, False
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return draw_augmentation(rng, self.scale, self.rotation_deg, self.mirror, self.grid)

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} faces")
        return self._item(*self._images.first_readable(index % n))

    def _item(self, index: int, gray: np.ndarray) -> dict:
        record = self.records[index]
        cx, cy, size = self._squares[index]
        factor, angle, mirrored = self.augmentation(index)
        affine = crop_transform((cx, cy), size, self.out_size, factor, angle, mirrored)
        image = warp_image(gray, affine, self.out_size)
        points = transform_points(record.points, affine)
        labelled = np.asarray(record.labelled, dtype=bool) & ~np.isnan(points).any(axis=1)
        if mirrored:
            points, labelled = points[MIRROR_68], labelled[MIRROR_68]
        points = np.where(labelled[:, None], points, 0.0)
        return {
            "image": torch.from_numpy(image[None].copy()),
            "points": torch.from_numpy(points.astype(np.float32)),
            "labelled": torch.from_numpy(labelled),
            "index": index,
            "affine": torch.from_numpy(affine.astype(np.float32)),
            "mirrored": mirrored,
        }
