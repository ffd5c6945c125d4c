"""Triton kernels of a conv block's epilogue: BatchNorm (batch or running statistics), ReLU, the activation scale and
dropout, forward and backward, in four memory passes where eager torch takes about twenty.

Every kernel walks a map z: (N, C, H, W) as (N, C, P = H * W) in tiles of (BLOCK_P pixels x BLOCK_C channels), one
program per tile, with each tensor's own (n, c, p) strides, so contiguous and channels_last maps both load along
their innermost dimension. Per-channel sums come back as one partial row per tile (no atomics: the result does not
depend on scheduling), which the caller reduces in torch; the moments are per-tile (mean, M2) pairs combined with
Chan's formula, so the variance does not lose digits to E[z^2] - E[z]^2. Arithmetic in float32 (float64 maps in
float64).

    forward   moments: read z                      -> (mean, var) per channel
              apply:   read z (+ keep), write y     y = out_scale * relu(z * scale + shift) * keep
    backward  sums:    read dy, z (+ keep)          -> sum g, sum g * (z - mean), g = dy * out_scale * keep * [pre > 0]
              apply:   read dy, z (+ keep), write dz   dz = scale * g + k1 * z + k0
keep: read from a mask tensor or from keep bits (a packed mask, one bit a value), or drawn again in each kernel from
a seed (``Dropout``), or 1.
out_scale is a float64 argument: Triton passes an unannotated Python float as float32, which would round float64
maps' scale; products with it are rounded back to the accumulation dtype.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from lgc_fast.ops.layout import is_channels_last

_TILE_ELEMENTS = 4096
# DROPOUT modes of the kernels: none, a keep mask tensor, Philox draws from a seed, or keep bits.
NONE, MASK, SEEDED, BITS = 0, 1, 2, 3
_MASK_MODE = tl.constexpr(MASK)
_BITS_MODE = tl.constexpr(BITS)
_SEEDED_MODE = tl.constexpr(SEEDED)
SEEDED_LIMIT = 2**31  # values a seeded draw can number: Philox takes each value's index as a 32-bit counter


@triton.jit
def _tile(C, P, NPB, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's tile: (row, n, pid_p, p, c, c_ok, inside). Axis 0 runs over (image n, pixel block pid_p), NPB
    blocks an image, and numbers the tile's partial row; axis 1 over channel blocks."""
    row = tl.program_id(0).to(tl.int64)
    n = row // NPB
    pid_p = row % NPB
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    inside = (p < P)[:, None] & c_ok[None, :]
    return row, n, pid_p, p, c, c_ok, inside


@triton.jit
def _offsets(n, p, c, s_n, s_c, s_p):
    return n * s_n + p[:, None] * s_p + c[None, :].to(tl.int64) * s_c


@triton.jit
def _moments_kernel(z_ptr, part_ptr, C, P, NPB, z_sn, z_sc, z_sp,
                    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row, n, pid_p, p, c, c_ok, inside = _tile(C, P, NPB, BLOCK_P, BLOCK_C)
    z = tl.load(z_ptr + _offsets(n, p, c, z_sn, z_sc, z_sp), mask=inside, other=0.0).to(ACC)
    count = tl.minimum(P - pid_p * BLOCK_P, BLOCK_P).to(ACC)
    mean = tl.sum(z, axis=0) / count
    d = tl.where(inside, z - mean[None, :], 0.0)
    part = part_ptr + row * 2 * C
    tl.store(part + c, mean, mask=c_ok)
    tl.store(part + C + c, tl.sum(d * d, axis=0), mask=c_ok)


@triton.jit
def _keep_tile(keep_ptr, seed_ptr, dropout_p, n, p, c, C, P, inside, k_sn, k_sc, k_sp, DROPOUT: tl.constexpr):
    """The tile's keep flags: read from the mask (DROPOUT == MASK), from the keep bits (BITS: bit e % 8 of byte e // 8
    for the value at offset e of the dense layout whose strides k_* are), or drawn (SEEDED) by Philox from the seed and
    each value's index in (N, C, H, W) order, so a seed gives the same mask in any memory format and again in
    backward."""
    if DROPOUT == _MASK_MODE:
        keep = tl.load(keep_ptr + _offsets(n, p, c, k_sn, k_sc, k_sp), mask=inside, other=0) != 0
    elif DROPOUT == _BITS_MODE:
        e = _offsets(n, p, c, k_sn, k_sc, k_sp)
        byte = tl.load(keep_ptr + e // 8, mask=inside, other=0).to(tl.int32)
        keep = ((byte >> (e % 8).to(tl.int32)) & 1) != 0
    else:
        index = (n * C + c[None, :]) * P + p[:, None]
        keep = tl.rand(tl.load(seed_ptr), index.to(tl.int32)) >= dropout_p
    return keep


@triton.jit
def _load_grad(dy_ptr, z_ptr, keep_ptr, seed_ptr, dropout_p, scale_ptr, shift_ptr, out_scale, n, p, c, c_ok, inside,
               C, P, dy_sn, dy_sc, dy_sp, z_sn, z_sc, z_sp, k_sn, k_sc, k_sp,
               DROPOUT: tl.constexpr, ACC: tl.constexpr):
    """(z, sc, g): the tile of z, the channel scales and the gradient at the BatchNorm output."""
    z = tl.load(z_ptr + _offsets(n, p, c, z_sn, z_sc, z_sp), mask=inside, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + _offsets(n, p, c, dy_sn, dy_sc, dy_sp), mask=inside, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(ACC)
    sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(ACC)
    active = (z * sc[None, :] + sh[None, :]) > 0.0
    g = tl.where(active, (dy * out_scale).to(ACC), 0.0)
    if DROPOUT != 0:
        keep = _keep_tile(keep_ptr, seed_ptr, dropout_p, n, p, c, C, P, inside, k_sn, k_sc, k_sp, DROPOUT)
        g = tl.where(keep, g, 0.0)
    return z, sc, g


@triton.jit
def _apply_kernel(z_ptr, keep_ptr, seed_ptr, dropout_p, y_ptr, scale_ptr, shift_ptr, out_scale: tl.float64,
                  C, P, NPB,
                  z_sn, z_sc, z_sp, k_sn, k_sc, k_sp, y_sn, y_sc, y_sp,
                  DROPOUT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row, n, pid_p, p, c, c_ok, inside = _tile(C, P, NPB, BLOCK_P, BLOCK_C)
    z = tl.load(z_ptr + _offsets(n, p, c, z_sn, z_sc, z_sp), mask=inside, other=0.0).to(ACC)
    sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(ACC)
    sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(ACC)
    # NaN propagates as in torch.relu, and a dropped NaN stays NaN as in torch's `y * mask`: never a silent 0.
    y = tl.maximum(z * sc[None, :] + sh[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    y = (y * out_scale).to(ACC)
    if DROPOUT != 0:
        keep = _keep_tile(keep_ptr, seed_ptr, dropout_p, n, p, c, C, P, inside, k_sn, k_sc, k_sp, DROPOUT)
        y = y * keep.to(ACC)
    tl.store(y_ptr + _offsets(n, p, c, y_sn, y_sc, y_sp), y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_sums_kernel(dy_ptr, z_ptr, keep_ptr, seed_ptr, dropout_p, scale_ptr, shift_ptr, center_ptr, part_ptr,
                      out_scale: tl.float64, C, P, NPB,
                      dy_sn, dy_sc, dy_sp, z_sn, z_sc, z_sp, k_sn, k_sc, k_sp,
                      DROPOUT: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row, n, pid_p, p, c, c_ok, inside = _tile(C, P, NPB, BLOCK_P, BLOCK_C)
    z, sc, g = _load_grad(dy_ptr, z_ptr, keep_ptr, seed_ptr, dropout_p, scale_ptr, shift_ptr, out_scale, n, p, c,
                          c_ok, inside, C, P, dy_sn, dy_sc, dy_sp, z_sn, z_sc, z_sp, k_sn, k_sc, k_sp, DROPOUT, ACC)
    center = tl.load(center_ptr + c, mask=c_ok, other=0.0).to(ACC)
    part = part_ptr + row * 2 * C
    tl.store(part + c, tl.sum(g, axis=0), mask=c_ok)
    tl.store(part + C + c, tl.sum(g * (z - center[None, :]), axis=0), mask=c_ok)


@triton.jit
def _grad_apply_kernel(dy_ptr, z_ptr, keep_ptr, seed_ptr, dropout_p, dz_ptr, scale_ptr, shift_ptr, k1_ptr, k0_ptr,
                       out_scale: tl.float64, C, P, NPB,
                       dy_sn, dy_sc, dy_sp, z_sn, z_sc, z_sp, k_sn, k_sc, k_sp, dz_sn, dz_sc, dz_sp,
                       DROPOUT: tl.constexpr, CENTERED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row, n, pid_p, p, c, c_ok, inside = _tile(C, P, NPB, BLOCK_P, BLOCK_C)
    z, sc, g = _load_grad(dy_ptr, z_ptr, keep_ptr, seed_ptr, dropout_p, scale_ptr, shift_ptr, out_scale, n, p, c,
                          c_ok, inside, C, P, dy_sn, dy_sc, dy_sp, z_sn, z_sc, z_sp, k_sn, k_sc, k_sp, DROPOUT, ACC)
    dz = g * sc[None, :]
    if CENTERED:  # batch statistics: the gradient also flows through the mean and variance
        k1 = tl.load(k1_ptr + c, mask=c_ok, other=0.0).to(ACC)
        k0 = tl.load(k0_ptr + c, mask=c_ok, other=0.0).to(ACC)
        dz += z * k1[None, :] + k0[None, :]
    tl.store(dz_ptr + _offsets(n, p, c, dz_sn, dz_sc, dz_sp), dz.to(dz_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _keep_mask_kernel(seed_ptr, dropout_p, out_ptr, C, P, NPB, o_sn, o_sc, o_sp,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    row, n, pid_p, p, c, c_ok, inside = _tile(C, P, NPB, BLOCK_P, BLOCK_C)
    keep = _keep_tile(out_ptr, seed_ptr, dropout_p, n, p, c, C, P, inside, o_sn, o_sc, o_sp, _SEEDED_MODE)
    tl.store(out_ptr + _offsets(n, p, c, o_sn, o_sc, o_sp), keep.to(tl.uint8), mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Launchers. Tensors are (N, C, H, W) with H and W flattenable into one pixel stride (contiguous or channels_last).

@dataclass(frozen=True)
class Dropout:
    """What the kernels drop: `mask` (bool/uint8 like z, nonzero = keep; or, 1-D uint8, keep bits: ceil(N*C*H*W / 8)
    bytes whose bit e % 8 of byte e // 8 keeps the value at offset e of z's memory format, dense), or Philox draws from
    `seed` (an int64 tensor of one value on z's device, read by the kernels: no host sync) keeping each value with
    probability 1 - p, or nothing when both are None."""
    mask: Optional[torch.Tensor] = None
    seed: Optional[torch.Tensor] = None
    p: float = 0.0

    def args(self, z: torch.Tensor) -> tuple:
        """(mode, keep tensor, its (n, c, p) strides, seed tensor, p) for a kernel launch over z."""
        if self.mask is not None and self.mask.dim() == 1:
            return BITS, self.mask, _dense_ncp_strides(z), z, self.p
        if self.mask is not None:
            keep = self.mask.view(torch.uint8) if self.mask.dtype == torch.bool else self.mask
            return MASK, keep, _ncp_strides(keep), z, self.p
        if self.seed is not None:
            return SEEDED, z, _ncp_strides(z), self.seed, self.p
        return NONE, z, _ncp_strides(z), z, self.p


def _ncp_strides(t: torch.Tensor) -> tuple[int, int, int]:
    _, _, h, w = t.shape
    return t.stride(0), t.stride(1), (t.stride(3) if w > 1 else t.stride(2))


def _dense_ncp_strides(z: torch.Tensor) -> tuple[int, int, int]:
    """The (n, c, p) strides of z's shape laid out densely in its memory format: channels_last when z is (and is not
    also contiguous), else contiguous."""
    _, c, h, w = z.shape
    if is_channels_last(z):
        return h * w * c, 1, c
    return c * h * w, h * w, 1


def tile_shape(z: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): whole channel rows for channels_last maps, long pixel runs for contiguous ones."""
    _, c, h, w = z.shape
    p = h * w
    if z.stride(1) == 1 and c > 1:
        block_c = min(triton.next_power_of_2(c), 128)
        block_p = min(max(_TILE_ELEMENTS // block_c, 1), triton.next_power_of_2(p))
    else:
        block_p = min(triton.next_power_of_2(p), 1024)
        block_c = min(max(_TILE_ELEMENTS // block_p, 1), triton.next_power_of_2(c))
    return block_p, block_c


@dataclass(frozen=True)
class _Plan:
    """How the kernels tile a map: the launch grid, the size arguments (C, P, NPB) and the tile's meta-parameters;
    acc: the accumulation dtype."""
    grid: tuple[int, int]
    sizes: tuple[int, int, int]
    tile: dict
    acc: torch.dtype

    @property
    def meta(self) -> dict:
        return dict(self.tile, ACC=tl.float64 if self.acc == torch.float64 else tl.float32)


def _plan(z: torch.Tensor) -> _Plan:
    n, c, h, w = z.shape
    block_p, block_c = tile_shape(z)
    npb = triton.cdiv(h * w, block_p)
    return _Plan(grid=(n * npb, triton.cdiv(c, block_c)), sizes=(c, h * w, npb),
                 tile=dict(BLOCK_P=block_p, BLOCK_C=block_c),
                 acc=torch.float64 if z.dtype == torch.float64 else torch.float32)


def _launch(kernel, plan: _Plan, z, *args, **meta):
    num_warps = 8 if meta["BLOCK_P"] * meta["BLOCK_C"] >= 4096 else 4
    if z.device.type == "cuda":
        with torch.cuda.device(z.device):
            kernel[plan.grid](*args, **meta, num_warps=num_warps)
    else:
        kernel[plan.grid](*args, **meta)


def _channels(plan: _Plan, *vectors: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel (C,) vectors in the accumulation dtype, contiguous."""
    return [v.to(plan.acc).contiguous() for v in vectors]


def moments_triton(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of z: (N, C, H, W) -> two (C,) tensors in the accumulation dtype."""
    plan = _plan(z)
    c, p, npb = plan.sizes
    part = torch.empty((plan.grid[0], 2, c), dtype=plan.acc, device=z.device)
    _launch(_moments_kernel, plan, z, z, part, *plan.sizes, *_ncp_strides(z), **plan.meta)
    block_p = plan.tile["BLOCK_P"]
    count = (p - torch.arange(npb, device=z.device, dtype=plan.acc) * block_p).clamp(max=block_p)
    count = count.repeat(z.shape[0])[:, None]
    means, m2s = part[:, 0], part[:, 1]
    total = z.shape[0] * p
    mean = (count * means).sum(0) / total
    m2 = m2s.sum(0) + (count * (means - mean) ** 2).sum(0)
    return mean, m2 / total


def apply_triton(z, scale, shift, dropout: Dropout, out_scale: float, out: torch.Tensor) -> torch.Tensor:
    """out = out_scale * relu(z * scale + shift) * keep. Returns out."""
    plan = _plan(z)
    mode, keep, keep_strides, seed, p = dropout.args(z)
    _launch(_apply_kernel, plan, z, z, keep, seed, p, out, *_channels(plan, scale, shift), out_scale,
            *plan.sizes, *_ncp_strides(z), *keep_strides, *_ncp_strides(out), DROPOUT=mode, **plan.meta)
    return out


def grad_sums_triton(dy, z, scale, shift, dropout: Dropout, center, out_scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (sum g, sum g * (z - center)) with g = dy * out_scale * keep * [z * scale + shift > 0]."""
    plan = _plan(z)
    mode, keep, keep_strides, seed, p = dropout.args(z)
    part = torch.empty((plan.grid[0], 2, z.shape[1]), dtype=plan.acc, device=z.device)
    _launch(_grad_sums_kernel, plan, z, dy, z, keep, seed, p, *_channels(plan, scale, shift, center), part,
            out_scale, *plan.sizes, *_ncp_strides(dy), *_ncp_strides(z), *keep_strides, DROPOUT=mode,
            **plan.meta)
    return part[:, 0].sum(0), part[:, 1].sum(0)


def grad_apply_triton(dy, z, scale, shift, dropout: Dropout, k1, k0, out_scale: float,
                      out: torch.Tensor) -> torch.Tensor:
    """out = scale * g + k1 * z + k0 (k1, k0: (C,) or both None for 0), g as in ``grad_sums_triton``."""
    plan = _plan(z)
    mode, keep, keep_strides, seed, p = dropout.args(z)
    centered = k1 is not None
    scale, shift = _channels(plan, scale, shift)
    k1, k0 = _channels(plan, k1, k0) if centered else (scale, scale)  # unread when not centered
    _launch(_grad_apply_kernel, plan, z, dy, z, keep, seed, p, out, scale, shift, k1, k0, out_scale,
            *plan.sizes, *_ncp_strides(dy), *_ncp_strides(z), *keep_strides, *_ncp_strides(out), DROPOUT=mode,
            CENTERED=centered, **plan.meta)
    return out


def keep_mask_triton(seed: torch.Tensor, p: float, out: torch.Tensor) -> torch.Tensor:
    """Write into out (N, C, H, W) uint8 the keep flags that Dropout(seed=seed, p=p) draws for maps of its shape."""
    plan = _plan(out)
    _launch(_keep_mask_kernel, plan, out, seed, p, out, *plan.sizes, *_ncp_strides(out), **plan.tile)
    return out
