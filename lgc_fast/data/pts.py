"""300-W ``.pts`` landmark files.

Layout: ``version: 1``, ``n_points: P``, ``{``, P lines ``x y``, ``}``. Coordinates in the file are 1-based (the
300-W / Matlab convention); in memory they are 0-based pixel coordinates with pixel centres at integers. An unlabelled
point is written ``nan nan`` and read as NaN.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lgc_fast._io import atomic_write_text
from lgc_fast.errors import LgcError


def _bad_point_line(line: str, where: str) -> str | None:
    """Why one point line is malformed, or None if it is fine."""
    tokens = line.split()
    if len(tokens) != 2:
        return f"{where}: expected two coordinates 'x y', got {line!r}"
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            return f"{where}: {token!r} is not a number"
        if math.isinf(values[-1]):
            return f"{where}: coordinate {token!r} is infinite"
    if math.isnan(values[0]) != math.isnan(values[1]):
        return f"{where}: x and y must both be numbers or both be nan, got {line!r}"
    return None


def read_pts(path, n_points: int | None = None) -> np.ndarray:
    """Read a 300-W ``.pts`` file -> (P, 2) float64 0-based (x, y); NaN rows are unlabelled points.

    Raises LgcError naming the file (and line) when it is unreadable or malformed, when the ``n_points`` header
    disagrees with the number of point lines, or when ``n_points`` is given and differs from P.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LgcError(f"{path}: cannot read landmark file ({exc})") from None
    lines = text.splitlines()

    header_count = None
    opening = None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if line == "{":
            if header_count is None:
                raise LgcError(f"{where}: '{{' before the 'n_points:' header")
            opening = number
            break
        key, sep, value = line.partition(":")
        if not sep:
            raise LgcError(f"{where}: expected a 'key: value' header line or '{{', got {line!r}")
        if key.strip() == "n_points":
            try:
                header_count = int(value.strip())
            except ValueError:
                raise LgcError(f"{where}: n_points must be an integer, got {value.strip()!r}") from None
            if header_count < 0:
                raise LgcError(f"{where}: n_points must be >= 0, got {header_count}")
    if opening is None:
        raise LgcError(f"{path}: no '{{' line: not a .pts landmark file")

    numbered = [(n, raw.strip()) for n, raw in enumerate(lines[opening:], start=opening + 1) if raw.strip()]
    closing = next((i for i, (_, line) in enumerate(numbered) if line == "}"), None)
    if closing is None:
        raise LgcError(f"{path}:{len(lines)}: missing the closing '}}'")
    if closing + 1 < len(numbered):
        number, line = numbered[closing + 1]
        raise LgcError(f"{path}:{number}: unexpected text after the closing '}}': {line!r}")
    body = numbered[:closing]
    try:  # all lines at once; on failure the line-by-line pass below names the first bad line
        points = np.array([line.split() for _, line in body], dtype=np.float64).reshape(len(body), 2)
    except ValueError:
        points = None
    if points is None or np.isinf(points).any() or (np.isnan(points[:, 0]) != np.isnan(points[:, 1])).any():
        for number, line in body:
            problem = _bad_point_line(line, f"{path}:{number}")
            if problem:
                raise LgcError(problem)
        points = np.array([[float(t) for t in line.split()] for _, line in body], dtype=np.float64)
    if len(body) != header_count:
        raise LgcError(f"{path}: header says n_points: {header_count} but {len(body)} point lines follow")
    if n_points is not None and len(body) != n_points:
        raise LgcError(f"{path}: has {len(body)} points, expected {n_points}")
    return points - 1.0


def write_pts(path, points) -> None:
    """Write (P, 2) 0-based points as a 1-based 300-W ``.pts`` file, atomically; NaN rows are written ``nan nan``."""
    path = Path(path)
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (P, 2), got {points.shape}")
    if np.isinf(points).any():
        raise ValueError("points must be finite or NaN, got an infinite coordinate")
    if (np.isnan(points[:, 0]) != np.isnan(points[:, 1])).any():
        raise ValueError("points: x and y of a point must both be NaN (unlabelled) or both be numbers")
    lines = ["version: 1", f"n_points: {len(points)}", "{"]
    for x, y in points + 1.0:
        lines.append("nan nan" if math.isnan(x) else f"{float(x)!r} {float(y)!r}")
    lines.append("}")
    atomic_write_text(path, "\n".join(lines) + "\n")
