"""Batch augmentation on the training device: one affine_grid + grid_sample for the whole batch (CPU or CUDA).

Same geometry as the per-sample OpenCV path: random_affines' point transform for a draw (s, a, m) equals
crop_transform(((size-1)/2,)*2, size, size, s, a, m), i.e. a scale/rotation/mirror of a size x size crop about its
centre. Corners rotated in from outside the crop are 0 (the OpenCV path fills them from the full image instead).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lgc_fast.data.geometry import MIRROR_68


def affines_from_draws(factor: torch.Tensor, angle_deg: torch.Tensor, mirror: torch.Tensor,
                       size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """factor, angle_deg: (n,) float; mirror: (n,) bool -> (theta (n, 2, 3), point affine (n, 2, 3)), float64.

    The point affine maps crop pixels to augmented-crop pixels: p' = c + L (p - c) about the centre c = (size-1)/2.
    theta is its inverse in F.affine_grid's normalised coordinates (align_corners=False): u = (2/size)(p - c), so
    theta = [L^-1 | 0] and grid_sample moves the image exactly as the points move.
    """
    n, dtype, device = factor.shape[0], torch.float64, factor.device
    rad = angle_deg.to(dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    flip = 1.0 - 2.0 * mirror.to(dtype)
    zoom = factor.to(dtype)
    a, b, c, d = flip * zoom * cos, -flip * zoom * sin, zoom * sin, zoom * cos
    linear = torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)
    det = a * d - b * c
    inverse = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[:, None, None]
    mid = torch.full((n, 2, 1), (size - 1) / 2.0, dtype=dtype, device=device)
    point_affine = torch.cat([linear, mid - linear @ mid], dim=2)
    theta = torch.cat([inverse, torch.zeros(n, 2, 1, dtype=dtype, device=device)], dim=2)
    return theta, point_affine


def random_affines(n: int, generator: torch.Generator | None = None, scale: float = 0.125,
                   rotation_deg: float = 30.0, mirror: bool = True, size: int = 96,
                   grid: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random augmentations -> (theta (n, 2, 3), point affine (n, 2, 3), mirror flags (n,) bool).

    Draws as LandmarkDataset's draw_augmentation (uniform scale and angle, mirror with probability 1/2; `grid`: the
    paper's 18 discrete combinations), from `generator` on its device; theta and the point affine are float32.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 3, generator=generator, device=device, dtype=torch.float64)
    if grid:
        factor = 1.0 + scale * (torch.floor(3 * u[:, 0]) - 1)
        angle = rotation_deg * (torch.floor(3 * u[:, 1]) - 1)
    else:
        factor = 1.0 + scale * (2 * u[:, 0] - 1)
        angle = rotation_deg * (2 * u[:, 1] - 1)
    flags = (u[:, 2] < 0.5) & mirror
    theta, point_affine = affines_from_draws(factor, angle, flags, size)
    return theta.float(), point_affine.float(), flags


def apply_affines(images: torch.Tensor, points: torch.Tensor, labelled: torch.Tensor, theta: torch.Tensor,
                  point_affine: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp a batch and its landmarks.

    images: (N, C, S, S) float; points: (N, P, 2) crop pixels; labelled: (N, P) bool; theta, point_affine: (N, 2, 3);
    mirror: (N,) bool (mirrored faces get their points reordered by MIRROR_68, so P must be 68 if any is set).
    Returns (images, points, labelled) like the inputs; unlabelled points are 0. Bilinear, 0 outside the crop.
    """
    _check_batch(images, points, labelled)
    n = images.shape[0]
    for name, value, shape in (("theta", theta, (n, 2, 3)), ("point_affine", point_affine, (n, 2, 3)),
                               ("mirror", mirror, (n,))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    device = images.device
    mirror = mirror.to(device=device, dtype=torch.bool)
    grid = F.affine_grid(theta.to(device=device, dtype=images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    affine = point_affine.to(device=device, dtype=points.dtype)
    moved = points @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]
    if points.shape[1] == len(MIRROR_68):  # permute unconditionally: no device sync to ask whether any is mirrored
        perm = torch.tensor(MIRROR_68, device=device)
        moved = torch.where(mirror[:, None, None], moved[:, perm], moved)
        labelled = torch.where(mirror[:, None], labelled[:, perm], labelled)
    elif bool(mirror.any()):
        raise ValueError(f"mirroring needs the 68 iBUG points, got points with P = {points.shape[1]}")
    moved = torch.where(labelled[..., None], moved, torch.zeros((), dtype=moved.dtype, device=device))
    return warped, moved, labelled


def augment_batch(images: torch.Tensor, points: torch.Tensor, labelled: torch.Tensor,
                  generator: torch.Generator | None = None, scale: float = 0.125, rotation_deg: float = 30.0,
                  mirror: bool = True, grid: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random scale/rotation/mirror of a batch of crops -> (images, points, labelled); see apply_affines for shapes."""
    _check_batch(images, points, labelled)
    theta, point_affine, flags = random_affines(images.shape[0], generator, scale, rotation_deg, mirror,
                                                images.shape[-1], grid)
    return apply_affines(images, points, labelled, theta, point_affine, flags)


def _check_batch(images, points, labelled) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float tensor (N, C, S, S), got {_describe(images)}")
    n, _, h, w = images.shape
    if h != w:
        raise ValueError(f"images must be square crops (N, C, S, S), got shape {tuple(images.shape)}")
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[0] != n or points.shape[2] != 2:
        raise ValueError(f"points must be a tensor (N={n}, P, 2), got {_describe(points)}")
    if not points.dtype.is_floating_point:
        raise ValueError(f"points must be floating point, got {points.dtype}")
    if (not isinstance(labelled, torch.Tensor) or labelled.dtype != torch.bool
            or tuple(labelled.shape) != tuple(points.shape[:2])):
        raise ValueError(f"labelled must be a bool tensor {tuple(points.shape[:2])}, got {_describe(labelled)}")
    if points.device != images.device or labelled.device != images.device:
        raise ValueError(f"images, points and labelled must be on one device, got {images.device}, "
                         f"{points.device}, {labelled.device}")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
