"""Triton kernels of the training loss (paper eq. 3-4), targets rendered from the landmark coordinates.

One program per (face, landmark) plane. It counts the face's visible points for the weight of eq. 3, then walks the
plane in (BLOCK_H x BLOCK_W) tiles. The target of a tile is T = (1/5) sum_s Y_s[:, None] * X_s[None, :], where
X_s(px) = sum over the in-grid corners a of wx_a g_s(px - x0 - a) (Y_s likewise): K and the bilinear splat are both
separable, so a tile costs 20 small gathers from the (5, 23) tap table instead of a dense G and a 45x45 convolution.
The forward writes one weighted sum per plane (tile-shaped accumulator, one tree reduction at the end); the caller
sums each face's planes. Accumulation in float32, float64 for float64 maps.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from lgc_fast.ops.kernel_conv import RADIUS, SIGMAS, kernel_taps

_RADIUS = tl.constexpr(RADIUS)
_N_SIGMAS = tl.constexpr(len(SIGMAS))
_TILE_ELEMENTS = 4096


@triton.jit
def _plane_setup(points_ptr, lab_ptr, plane, C, H, W, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Weight of eq. 3 and the point's bilinear corners: (weight, x0, wx0, wx1, y0, wy0, wy1), with K's 1/5 folded
    into wx0, wx1. Off-grid corners get weight 0; a point with no in-grid corner (or an unlabelled one, whose
    coordinates are never read) gets all 0."""
    face = plane // C
    count = 0
    for k0 in range(0, C, BLOCK_C):
        k = k0 + tl.arange(0, BLOCK_C)
        idx = face * C + k
        lab = tl.load(lab_ptr + idx, mask=k < C, other=0) != 0
        px = tl.load(points_ptr + 2 * idx, mask=lab, other=-1.0)
        py = tl.load(points_ptr + 2 * idx + 1, mask=lab, other=-1.0)
        vis = lab & (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)
        count += tl.sum(vis.to(tl.int32), axis=0)

    lab_n = tl.load(lab_ptr + plane) != 0
    x = tl.load(points_ptr + 2 * plane, mask=lab_n, other=-2.0)
    y = tl.load(points_ptr + 2 * plane + 1, mask=lab_n, other=-2.0)
    vis_n = lab_n & (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    lab_f = lab_n.to(ACC)
    share = 1.0 / (2.0 * tl.cast(C, ACC))
    weight = vis_n.to(ACC) + lab_f / 10.0 + lab_f * share * count.to(ACC)

    has_target = lab_n & (x >= -1) & (x < W) & (y >= -1) & (y < H)
    xs = tl.where(has_target, x, 0.0)
    ys = tl.where(has_target, y, 0.0)
    x0f = tl.floor(xs)
    y0f = tl.floor(ys)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    fx = xs - x0f
    fy = ys - y0f
    wx0 = tl.where(has_target & (x0 >= 0), (1.0 - fx) * (1.0 / _N_SIGMAS), 0.0)
    wx1 = tl.where(has_target & (x0 + 1 <= W - 1), fx * (1.0 / _N_SIGMAS), 0.0)
    wy0 = tl.where(has_target & (y0 >= 0), 1.0 - fy, 0.0)
    wy1 = tl.where(has_target & (y0 + 1 <= H - 1), fy, 0.0)
    return weight, x0, wx0, wx1, y0, wy0, wy1


@triton.jit
def _target_tile(taps_ptr, rows, cols, x0, wx0, wx1, y0, wy0, wy1,
                 ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """T on a (rows x cols) tile: sum_s Y_s[:, None] * X_s[None, :], X_s(p) = wx0 g_s(p - x0) + wx1 g_s(p - x0 - 1)
    (g_s = 0 beyond the radius; the 1/5 of K is folded into wx0, wx1)."""
    dx0 = tl.abs(cols - x0)
    dx1 = tl.abs(cols - x0 - 1)
    dy0 = tl.abs(rows - y0)
    dy1 = tl.abs(rows - y0 - 1)
    t = tl.zeros((BLOCK_H, BLOCK_W), dtype=ACC)
    for s in tl.static_range(_N_SIGMAS):
        tap = taps_ptr + s * (_RADIUS + 1)
        xs = (wx0 * tl.load(tap + dx0, mask=dx0 <= _RADIUS, other=0.0)
              + wx1 * tl.load(tap + dx1, mask=dx1 <= _RADIUS, other=0.0))
        ys = (wy0 * tl.load(tap + dy0, mask=dy0 <= _RADIUS, other=0.0)
              + wy1 * tl.load(tap + dy1, mask=dy1 <= _RADIUS, other=0.0))
        t += ys[:, None] * xs[None, :]
    return t


@triton.jit
def _tile_residuals(local_ptr, omega_ptr, taps_ptr, plane, r0, c0, H, W, x0, wx0, wx1, y0, wy0, wy1,
                    ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The (BLOCK_H x BLOCK_W) tile of the plane from row r0, column c0: (offsets, in-plane mask, local - T,
    omega - T), the residuals in ACC (-T outside the plane)."""
    rows = r0 + tl.arange(0, BLOCK_H)
    cols = c0 + tl.arange(0, BLOCK_W)
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    offs = (plane * H * W + rows.to(tl.int64) * W)[:, None] + cols[None, :]
    t = _target_tile(taps_ptr, rows, cols, x0, wx0, wx1, y0, wy0, wy1, ACC, BLOCK_H, BLOCK_W)
    dl = tl.load(local_ptr + offs, mask=inside, other=0.0).to(ACC) - t
    do = tl.load(omega_ptr + offs, mask=inside, other=0.0).to(ACC) - t
    return offs, inside, dl, do


@triton.jit
def _lgc_loss_fwd_kernel(local_ptr, omega_ptr, points_ptr, lab_ptr, taps_ptr, plane_loss_ptr, C, H, W,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    weight, x0, wx0, wx1, y0, wy0, wy1 = _plane_setup(points_ptr, lab_ptr, plane, C, H, W, ACC, BLOCK_C)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=ACC)
    for r0 in range(0, H, BLOCK_H):
        for c0 in range(0, W, BLOCK_W):
            offs, inside, dl, do = _tile_residuals(local_ptr, omega_ptr, taps_ptr, plane, r0, c0, H, W, x0, wx0, wx1,
                                                   y0, wy0, wy1, ACC, BLOCK_H, BLOCK_W)
            acc += tl.where(inside, dl * dl + do * do, 0.0)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(plane_loss_ptr + plane, tl.where(weight != 0, weight * total, 0.0))


@triton.jit
def _lgc_loss_bwd_kernel(grad_ptr, local_ptr, omega_ptr, points_ptr, lab_ptr, taps_ptr, grad_local_ptr,
                         grad_omega_ptr, C, H, W,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    weight, x0, wx0, wx1, y0, wy0, wy1 = _plane_setup(points_ptr, lab_ptr, plane, C, H, W, ACC, BLOCK_C)
    scale = 2.0 * weight * tl.load(grad_ptr + plane // C).to(ACC)
    for r0 in range(0, H, BLOCK_H):
        for c0 in range(0, W, BLOCK_W):
            offs, inside, dl, do = _tile_residuals(local_ptr, omega_ptr, taps_ptr, plane, r0, c0, H, W, x0, wx0, wx1,
                                                   y0, wy0, wy1, ACC, BLOCK_H, BLOCK_W)
            # Planes of weight 0 get exact zeros (as the compiled kernels), whatever the maps hold.
            gl = tl.where(weight != 0, scale * dl, 0.0)
            go = tl.where(weight != 0, scale * do, 0.0)
            tl.store(grad_local_ptr + offs, gl.to(grad_local_ptr.dtype.element_ty), mask=inside)
            tl.store(grad_omega_ptr + offs, go.to(grad_omega_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=None)
def _taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(5, 23) contiguous: g_s(k) for k = 0..22, the non-negative half of each symmetric 1-D Gaussian of K."""
    return kernel_taps(dtype, device)[:, RADIUS:].contiguous()


def _acc_dtype(local: torch.Tensor) -> torch.dtype:
    return torch.float64 if local.dtype == torch.float64 else torch.float32


def gpu_num_warps(block_h: int, block_w: int) -> int:
    """Warps per program on a GPU for a BLOCK_H x BLOCK_W tile."""
    return 8 if block_h * block_w >= 2048 else 4


def _launch_args(local, points, labelled):
    n, c, h, w = local.shape
    acc = _acc_dtype(local)
    block_w = min(triton.next_power_of_2(w), 128)
    block_h = min(triton.next_power_of_2(h), max(1, _TILE_ELEMENTS // block_w))
    meta = dict(ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_C=min(triton.next_power_of_2(c), 128),
                BLOCK_H=block_h, BLOCK_W=block_w)
    if local.device.type == "cuda":
        meta["num_warps"] = gpu_num_warps(block_h, block_w)
    pts = points.to(acc).contiguous()
    lab = labelled.contiguous().view(torch.uint8)
    return pts, lab, _taps(acc, local.device), meta


def _grad_out(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor returned, laid out as empty_like(like); the contiguous one the kernel writes: the same if it can)."""
    result = torch.empty_like(like)
    if result.is_contiguous():
        return result, result
    return result, torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lgc_loss_triton(local: torch.Tensor, omega: torch.Tensor, points: torch.Tensor,
                    labelled: torch.Tensor) -> torch.Tensor:
    """local, omega: (N, C, H, W); points: (N, C, 2); labelled: (N, C) bool -> (N,) float32 (float64 maps: float64).

    Inputs are validated by ``lgc_fast.ops.lgc_loss``.
    """
    n, c, h, w = local.shape
    acc = _acc_dtype(local)
    if n * c * h * w == 0:
        return torch.zeros(n, dtype=acc, device=local.device)
    pts, lab, taps, meta = _launch_args(local, points, labelled)
    plane_loss = torch.empty(n * c, dtype=acc, device=local.device)
    with _device_guard(local.device):
        _lgc_loss_fwd_kernel[(n * c,)](local.contiguous(), omega.contiguous(), pts, lab, taps, plane_loss, c, h, w,
                                       **meta)
    return plane_loss.view(n, c).sum(dim=1)


def lgc_loss_backward_triton(grad: torch.Tensor, local: torch.Tensor, omega: torch.Tensor, points: torch.Tensor,
                             labelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: (N,) -> (grad_local, grad_omega), shaped, typed and laid out like local and omega."""
    n, c, h, w = local.shape
    if n * c * h * w == 0:
        return torch.zeros_like(local), torch.zeros_like(omega)
    pts, lab, taps, meta = _launch_args(local, points, labelled)
    grad_local, target_local = _grad_out(local)
    grad_omega, target_omega = _grad_out(omega)
    with _device_guard(local.device):
        _lgc_loss_bwd_kernel[(n * c,)](grad.to(_acc_dtype(local)).contiguous(), local.contiguous(), omega.contiguous(),
                                       pts, lab, taps, target_local, target_omega, c, h, w, **meta)
    for result, target in ((grad_local, target_local), (grad_omega, target_omega)):
        if target is not result:
            result.copy_(target)
    return grad_local, grad_omega
