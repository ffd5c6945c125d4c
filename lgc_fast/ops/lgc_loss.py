"""The network's training loss (paper eq. 3 and 4) computed from landmark coordinates.

For face i and landmark n, the target is T_in = K * G_in, with G_in the bilinear splat of the point onto the H x W
pixel grid (up to 4 pixels summing to 1; corners outside the grid are dropped, as in a dense heatmap) and K the
45x45 kernel of ``kernel_conv``. The per-face loss is

    eps_i = sum_n w_in * sum_pixels [ (local_in - T_in)^2 + (omega_in - T_in)^2 ]

with ``local = K * O_l`` and ``omega`` the network output, and the weights of eq. 3:
w_in = V_in + L_in / 10 + L_in / (2 C) * sum_k V_ik, where L is ``labelled`` and V = labelled and inside the grid
(0 <= x <= W-1, 0 <= y <= H-1, 0-based pixel centres). Unlabelled points have weight 0 and never contribute.
"""
from __future__ import annotations

import importlib

import torch

from lgc_fast import _backend
from lgc_fast.ops._library import custom_op
from lgc_fast.ops.kernel_conv import kernel_conv_ref


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss is computed, and returned, in float64 for float64 maps and in float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_weights(points: torch.Tensor, labelled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """points: (N, C, 2) as (x, y); labelled: (N, C) bool -> w: (N, C) in points' loss dtype, eq. 3."""
    pts = points.to(loss_dtype(points.dtype))
    lab = labelled.bool()
    inside = (pts[..., 0] >= 0) & (pts[..., 0] <= width - 1) & (pts[..., 1] >= 0) & (pts[..., 1] <= height - 1)
    vis = (lab & inside).to(pts.dtype)
    lab_f = lab.to(pts.dtype)
    c = points.shape[1]
    return vis + lab_f / 10.0 + lab_f / (2.0 * c) * vis.sum(dim=1, keepdim=True)


def splat_heatmaps(points: torch.Tensor, labelled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """G: (N, C, H, W) in points' loss dtype, each labelled point bilinearly splatted (paper section 3.1)."""
    n, c, _ = points.shape
    dt = loss_dtype(points.dtype)
    g = torch.zeros(n * c * height * width, dtype=dt, device=points.device)
    pts = torch.where(labelled.bool()[..., None], points.to(dt), torch.zeros((), dtype=dt, device=points.device))
    x0 = torch.floor(pts[..., 0])
    y0 = torch.floor(pts[..., 1])
    fx = pts[..., 0] - x0
    fy = pts[..., 1] - y0
    plane = torch.arange(n * c, device=points.device).view(n, c) * (height * width)
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = x0.long() + dx
        yi = y0.long() + dy
        keep = labelled.bool() & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        idx = (plane + yi * width + xi)[keep]
        g.index_add_(0, idx, wgt[keep])
    return g.view(n, c, height, width)


def target_maps_ref(points: torch.Tensor, labelled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """T = K * G: (N, C, H, W) in points' loss dtype, the kernel-convolved ground-truth heatmaps."""
    return kernel_conv_ref(splat_heatmaps(points, labelled, height, width))


def lgc_loss_ref(local, omega, points, labelled) -> torch.Tensor:
    """local, omega: (N, C, H, W); points: (N, C, 2) (x, y) 0-based; labelled: (N, C) bool -> (N,).

    The result is float64 for float64 maps, float32 otherwise.

    Plain torch with a dense G and ``kernel_conv_ref``: the test oracle. Differentiable in local and omega.
    """
    _check_inputs(local, omega, points, labelled)
    n, c, h, w = local.shape
    dt = loss_dtype(local.dtype)
    target = target_maps_ref(points.to(dt), labelled, h, w)
    wgt = loss_weights(points.to(dt), labelled, h, w)
    sq = (local.to(dt) - target) ** 2 + (omega.to(dt) - target) ** 2
    return (wgt * sq.sum(dim=(2, 3))).sum(dim=1)


def _check_inputs(local, omega, points, labelled) -> None:
    for name, t in (("local", local), ("omega", omega), ("points", points), ("labelled", labelled)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if local.dim() != 4:
        raise ValueError(f"local must have shape (N, C, H, W), got {tuple(local.shape)}")
    if omega.shape != local.shape:
        raise ValueError(f"omega must have the shape of local {tuple(local.shape)}, got {tuple(omega.shape)}")
    n, c = local.shape[:2]
    if points.shape != (n, c, 2):
        raise ValueError(f"points must have shape (N, C, 2) = {(n, c, 2)}, got {tuple(points.shape)}")
    if labelled.shape != (n, c):
        raise ValueError(f"labelled must have shape (N, C) = {(n, c)}, got {tuple(labelled.shape)}")
    for name, t in (("local", local), ("omega", omega), ("points", points)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if labelled.dtype != torch.bool:
        raise TypeError(f"labelled must be a bool tensor, got {labelled.dtype}")
    devices = {t.device for t in (local, omega, points, labelled)}
    if len(devices) != 1:
        raise ValueError(f"local, omega, points and labelled must be on one device, got {sorted(map(str, devices))}")


def _forward_ref(local, omega, points, labelled):
    return lgc_loss_ref(local, omega, points, labelled)


def _backward_ref(grad, local, omega, points, labelled):
    n, c, h, w = local.shape
    dt = loss_dtype(local.dtype)
    target = target_maps_ref(points.to(dt), labelled, h, w)
    scale = (2.0 * loss_weights(points.to(dt), labelled, h, w) * grad.to(dt)[:, None])[..., None, None]
    return (scale * (local.to(dt) - target)).to(local.dtype), (scale * (omega.to(dt) - target)).to(omega.dtype)


def _ext_forward(local, omega, points, labelled):
    return torch.ops.lgc_fast_C.lgc_loss(local, omega, points, labelled)


def _ext_backward(grad, local, omega, points, labelled):
    return torch.ops.lgc_fast_C.lgc_loss_backward(grad, local, omega, points, labelled)


def _triton_module():
    return importlib.import_module("lgc_fast.kernels.lgc_loss")


def _triton_forward(local, omega, points, labelled):
    return _triton_module().lgc_loss_triton(local, omega, points, labelled)


def _triton_backward(grad, local, omega, points, labelled):
    return _triton_module().lgc_loss_backward_triton(grad, local, omega, points, labelled)


# The fused backends render T inside the kernel from the coordinates (no dense G, no convolution).
_FORWARD = {"cuda": _ext_forward, "triton": _triton_forward, "cpu": _ext_forward, "ref": _forward_ref}
_BACKWARD = {"cuda": _ext_backward, "triton": _triton_backward, "cpu": _ext_backward, "ref": _backward_ref}


@custom_op("lgc_fast::lgc_loss", mutates_args=())
def _lgc_loss_op(local: torch.Tensor, omega: torch.Tensor, points: torch.Tensor, labelled: torch.Tensor,
                 backend: str) -> torch.Tensor:
    return _FORWARD[backend](local, omega, points, labelled)


@_lgc_loss_op.register_fake
def _(local, omega, points, labelled, backend):
    return local.new_empty(local.shape[0], dtype=loss_dtype(local.dtype))


@custom_op("lgc_fast::lgc_loss_backward", mutates_args=())
def _lgc_loss_backward_op(grad: torch.Tensor, local: torch.Tensor, omega: torch.Tensor, points: torch.Tensor,
                          labelled: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _BACKWARD[backend](grad, local, omega, points, labelled)


@_lgc_loss_backward_op.register_fake
def _(grad, local, omega, points, labelled, backend):
    return torch.empty_like(local), torch.empty_like(omega)


def _setup_context(ctx, inputs, output):
    local, omega, points, labelled, backend = inputs
    ctx.save_for_backward(local, omega, points, labelled)
    ctx.backend = backend


def _backward(ctx, grad):
    local, omega, points, labelled = ctx.saved_tensors
    g_local, g_omega = _lgc_loss_backward_op(grad, local, omega, points, labelled, ctx.backend)
    return g_local, g_omega, None, None, None


_lgc_loss_op.register_autograd(_backward, setup_context=_setup_context)


def lgc_loss(local: torch.Tensor, omega: torch.Tensor, points: torch.Tensor, labelled: torch.Tensor,
             backend: str | None = None) -> torch.Tensor:
    """Per-face weighted loss of eq. 4 against kernel-convolved targets rendered from coordinates.

    local: (N, C, H, W) = K * O_l; omega: (N, C, H, W) = K * O_l + O_g (any float dtype, computed in float32);
    points: (N, C, 2) landmark (x, y) in 0-based pixel coordinates of the maps; labelled: (N, C) bool.
    Returns (N,) float32 (float64 for float64 maps), differentiable in local and omega. Equivalent to ``lgc_loss_ref``.
    backend: ``"cuda" | "triton" | "cpu" | "ref"``, default automatic.
    """
    _check_inputs(local, omega, points, labelled)
    name = _backend.choose("lgc_loss", local.device, backend, supported=tuple(_FORWARD))
    return _lgc_loss_op(local, omega, points, labelled, name)
