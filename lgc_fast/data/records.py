"""Finding annotated faces on disk, optional face boxes, and the person-disjoint train/validation split."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lgc_fast.data.geometry import face_box
from lgc_fast.data.pts import read_pts
from lgc_fast.errors import LgcError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ON_ERROR = ("skip", "raise")
# "Person_Name_NN" (a two-digit frame number, as in the YouTube Faces frames) -> "Person_Name".
_PERSON_FRAME = re.compile(r"^(.*[^\W\d].*)_\d\d$")


@dataclass
class FaceRecord:
    """One annotated face.

    image_path: the image file; points: (P, 2) float64 0-based (x, y), NaN where unlabelled; labelled: (P,) bool;
    box: optional (x0, y0, x1, y1) face box in the same pixel coordinates (None: use face_box(points, labelled)).
    """

    image_path: Path
    points: np.ndarray
    labelled: np.ndarray
    box: tuple[float, float, float, float] | None = None

    @property
    def person(self) -> str:
        return person_of(self.image_path.stem)


def person_of(name: str) -> str:
    """'Person_Name_NN' (NN two digits, a letter in the name) -> 'Person_Name'; any other name is its own person."""
    match = _PERSON_FRAME.match(name)
    return match.group(1) if match else name


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")


def _check_box(values, where: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LgcError(f"{where}: a box must be four numbers x0 y0 x1 y1, got {values!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise LgcError(f"{where}: a box must be four finite numbers x0 y0 x1 y1, got {values!r}")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise LgcError(f"{where}: a box needs x1 > x0 and y1 > y0, got {values!r}")
    return box


def load_boxes(source) -> dict[str, tuple[float, float, float, float]]:
    """Face boxes: image key -> (x0, y0, x1, y1), 0-based pixel coordinates like the points (pixel centres at integers).

    `source` is a mapping, or a file: ``*.json`` holds one object {"KEY": [x0, y0, x1, y1], ...}; any other file is
    text with one box per line, ``KEY x0 y0 x1 y1`` (blank lines and lines starting with '#' are ignored; KEY may
    contain spaces). KEY is the image path relative to the scanned root with '/' separators
    (``sub/dir/Name_01.jpg``) or the bare file name (``Name_01.jpg``); the relative path wins when both match.
    """
    if isinstance(source, Mapping):
        return {str(key): _check_box(value, f"boxes[{key!r}]") for key, value in source.items()}
    return {key: _check_box(values, where) for key, values, where in read_boxes_file(source)}


def read_boxes_file(path, expected: str = "[x0, y0, x1, y1]") -> Iterator[tuple[str, object, str]]:
    """The entries of a boxes file, in file order, as (KEY, value, where), values unchecked.

    A ``*.json`` file holds one object {"KEY": value, ...}; any other file is text, ``KEY x0 y0 x1 y1`` per line (the
    value is the four fields as strings; blank lines and lines starting with '#' are skipped). `where` names the file
    and the entry or line for error messages; `expected` describes a value in the error for JSON that is no object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LgcError(f"{path}: cannot read boxes file ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LgcError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise LgcError(f"{path}: expected a JSON object mapping image names to {expected}")
        for key, value in data.items():
            yield key, value, f"{path}: entry {key!r}"
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=4)
        if len(fields) != 5:
            raise LgcError(f"{path}:{number}: expected 'KEY x0 y0 x1 y1', got {line!r}")
        yield fields[0], fields[1:], f"{path}:{number}"


def scan_folder(root, n_points: int = 68, boxes=None, on_error: str = "skip") -> tuple[list[FaceRecord], list[str]]:
    """Find every image (jpg, jpeg, png, bmp; any depth) under `root` with a ``.pts`` file of the same stem beside it.

    Returns (records sorted by path relative to root, problems). A problem is a one-line message naming the file: an
    image without a .pts, a .pts without an image, a malformed .pts or one with a point count other than n_points, or
    a face with neither a box nor enough labelled points for face_box. With on_error="skip" such files are left out
    and reported; with "raise" the first one raises LgcError. `boxes`: see load_boxes (None: boxes from the points).
    Images are not decoded here; LandmarkDataset reports unreadable ones when it loads them.
    """
    check_on_error(on_error)
    root = Path(root)
    if not root.is_dir():
        raise LgcError(f"{root}: not a folder")
    box_map = {} if boxes is None else load_boxes(boxes)
    problems: list[str] = []

    def report(message: str) -> None:
        if on_error == "raise":
            raise LgcError(message)
        problems.append(message)

    def key(p: Path) -> str:
        return p.relative_to(root).as_posix()

    files = sorted((p for p in root.rglob("*") if p.is_file()), key=key)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    annotations = {p for p in files if p.suffix == ".pts"}
    records = []
    for image in images:
        pts_path = image.with_suffix(".pts")
        if pts_path not in annotations:
            report(f"{image}: no landmark file {pts_path.name} beside it")
            continue
        annotations.discard(pts_path)
        try:
            points = read_pts(pts_path, n_points)
        except LgcError as exc:
            report(str(exc))
            continue
        labelled = ~np.isnan(points).any(axis=1)
        box = box_map.get(key(image), box_map.get(image.name))
        if box is None:
            try:
                face_box(points, labelled)
            except LgcError as exc:
                report(f"{pts_path}: {exc}")
                continue
        records.append(FaceRecord(image, points, labelled, box))
    for orphan in sorted(annotations, key=key):
        report(f"{orphan}: no image ({', '.join(IMAGE_SUFFIXES)}) beside this landmark file")
    return records, problems


def split_by_person(records, val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Deterministic person-disjoint split -> (train, val), each in the input order.

    People (see person_of) are shuffled with `seed` (in name order first, so the input order does not matter) and
    moved to validation until it holds at least val_fraction of the records.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = list(records)
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(person_of(Path(record.image_path).stem), []).append(i)
    target = math.ceil(val_fraction * len(records))
    if target > 0 and len(groups) < 2:
        raise LgcError(f"cannot split {len(records)} faces of {len(groups)} person(s) into train and validation")
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    in_val = np.zeros(len(records), dtype=bool)
    taken = 0
    for g in order:
        if taken >= target:
            break
        in_val[groups[names[g]]] = True
        taken += len(groups[names[g]])
    if in_val.all():
        raise LgcError(f"cannot split {len(records)} faces: validation would take every person")
    return [r for r, v in zip(records, in_val) if not v], [r for r, v in zip(records, in_val) if v]
