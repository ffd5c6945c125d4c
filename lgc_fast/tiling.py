"""Bounded-memory inference on large images: run the fully convolutional network tile by tile.

Every layer of the network has stride 1 and zero padding, so an output pixel depends only on the input pixels within
``model.receptive_radius`` of it (the local stack, the 45x45 kernel convolution's radius 22 and the dilated global
stack's 7 x 4 = 28). A tile's core is therefore exact when the network sees the core plus a halo at least that wide
on every side where the image continues; where the tile touches the image border, the tile's own zero padding is the
full image's zero padding. Cores partition the image, so stitching them reproduces the untiled output (up to the
floating-point reassociation the convolution algorithms choose for a different input size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from lgc_fast.errors import LgcError

MIN_TILE = 16  # smaller cores spend almost all the work on the halo
# Working set per input pixel of an eval-mode forward, in activation-sized values: a conv block holds its input, the
# conv, batch-norm, ReLU and scaling outputs and the convolution's layout copies (~8 feature widths); the landmark-sized
# maps alive at once (local output, branch, their kernel convolution, global output, omega) add ~6 x C. Measured on
# the CPU (VmHWM, release variant, C = 68): 394, 600 and 1279 values per pixel at widths 8, 32 and 128, against 472,
# 664 and 1432 from this estimate.
_WIDTH_FACTOR = 8
_LANDMARK_FACTOR = 6
# Share of a memory cap given to the estimate; the rest absorbs what it leaves out (allocator slack, the input slice,
# per-call buffers). On the CPU, glibc keeps freed blocks below its (dynamically raised) mmap threshold resident
# between tiles: small tiles then peak well above the estimate (bench/bench_inference.py: 700 MiB under a 512 MiB
# cap at width 8); MALLOC_MMAP_THRESHOLD_=1048576 in the environment avoids that.
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class Tile:
    """One tile: the core (output) region [y0, y1) x [x0, x1) and the input region [iy0, iy1) x [ix0, ix1) it is
    computed from (the core plus the halo, clipped to the image)."""

    y0: int
    y1: int
    x0: int
    x1: int
    iy0: int
    iy1: int
    ix0: int
    ix1: int


def plan_tiles(height: int, width: int, tile: int, halo: int) -> list[Tile]:
    """Row-major tiles whose cores (at most tile x tile) partition a height x width image."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    tiles = []
    for y0 in range(0, height, tile):
        y1 = min(y0 + tile, height)
        for x0 in range(0, width, tile):
            x1 = min(x0 + tile, width)
            tiles.append(Tile(y0, y1, x0, x1, max(y0 - halo, 0), min(y1 + halo, height),
                              max(x0 - halo, 0), min(x1 + halo, width)))
    return tiles


def bytes_per_pixel(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Estimated peak memory of an eval-mode forward per input pixel (batch 1), outputs included, in bytes."""
    width = getattr(model, "width", None)
    if width is None:  # not an LGCN: its widest hidden convolution
        width = max((m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), default=1)
    n_landmarks = int(getattr(model, "n_landmarks", 68))
    return (_WIDTH_FACTOR * int(width) + _LANDMARK_FACTOR * n_landmarks) * torch.empty((), dtype=dtype).element_size()


def tile_for_memory(model: torch.nn.Module, max_memory_bytes: int, halo: int, batch: int = 1,
                    dtype: torch.dtype = torch.float32) -> int:
    """The largest core side whose tile (core + 2 halo) fits MEMORY_HEADROOM x the budget by ``bytes_per_pixel``
    (the stitched full-size result of ``tiled_forward`` is not part of it)."""
    if max_memory_bytes <= 0:
        raise ValueError(f"max_memory_bytes must be positive, got {max_memory_bytes}")
    pixels = MEMORY_HEADROOM * max_memory_bytes / (bytes_per_pixel(model, dtype) * batch)
    tile = int(math.isqrt(int(pixels))) - 2 * halo
    if tile < MIN_TILE:
        need = math.ceil((MIN_TILE + 2 * halo) ** 2 * bytes_per_pixel(model, dtype) * batch / MEMORY_HEADROOM)
        raise LgcError(f"max_memory_bytes={max_memory_bytes} is too small for this model: a {MIN_TILE}px tile with a "
                       f"{halo}px halo needs about {need} bytes")
    return tile


def _check_image(image) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (N, 1, H, W) tensor, got {shape}")
    if image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"image must have a non-empty spatial size, got {tuple(image.shape)}")


def _resolve(model, image, tile, halo, max_memory_bytes) -> tuple[int, int]:
    _check_image(image)
    radius = int(model.receptive_radius)
    if halo is None:
        halo = radius
    elif halo < radius:
        raise ValueError(f"halo must be >= model.receptive_radius ({radius}) for an exact result, got {halo}")
    if max_memory_bytes is not None:
        budget_tile = tile_for_memory(model, max_memory_bytes, halo, image.shape[0], image.dtype)
        tile = budget_tile if tile is None else min(tile, budget_tile)
    if tile is None:
        tile = max(image.shape[2], image.shape[3])
    return int(tile), int(halo)


def iter_tiles(model: torch.nn.Module, image: torch.Tensor, tile: int | None = 512, halo: int | None = None,
               max_memory_bytes: int | None = None) -> Iterator[tuple[Tile, torch.Tensor, torch.Tensor]]:
    """Yield (tile, local, omega) per tile: the network outputs over the tile's core, each (N, C, y1-y0, x1-x0).

    For consumers that reduce each tile right away (candidate search, statistics) so that the full-size output is
    never held. Runs without autograd; the model should be in eval mode (dropout and batch statistics are not local).
    """
    tile, halo = _resolve(model, image, tile, halo, max_memory_bytes)
    _, _, height, width = image.shape
    with torch.no_grad():
        for t in plan_tiles(height, width, tile, halo):
            local, omega = model(image[:, :, t.iy0:t.iy1, t.ix0:t.ix1])
            core = (slice(None), slice(None), slice(t.y0 - t.iy0, t.y1 - t.iy0), slice(t.x0 - t.ix0, t.x1 - t.ix0))
            yield t, local[core], omega[core]


def tiled_forward(model: torch.nn.Module, image: torch.Tensor, tile: int | None = 512, halo: int | None = None,
                  max_memory_bytes: int | None = None, out_device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's (local, omega), each (N, C, H, W), for image (N, 1, H, W) in [0, 255], computed tile by tile.

    tile: core side in pixels (None: one tile); halo: context around each core, default and minimum
    ``model.receptive_radius``; max_memory_bytes: cap on the forward's working memory, which picks (or shrinks) the
    tile size (see ``tile_for_memory``; the returned maps themselves are not counted); out_device: where the result
    is assembled (default: the image's device), e.g. "cpu" to keep a GPU's memory for the tiles only.
    """
    _check_image(image)
    n, _, height, width = image.shape
    out_device = image.device if out_device is None else torch.device(out_device)
    local_out = omega_out = None
    for t, local, omega in iter_tiles(model, image, tile, halo, max_memory_bytes):
        if local_out is None:
            local_out = torch.empty((n, local.shape[1], height, width), dtype=local.dtype, device=out_device)
            omega_out = torch.empty((n, omega.shape[1], height, width), dtype=omega.dtype, device=out_device)
        local_out[:, :, t.y0:t.y1, t.x0:t.x1] = local
        omega_out[:, :, t.y0:t.y1, t.x0:t.x1] = omega
    return local_out, omega_out
