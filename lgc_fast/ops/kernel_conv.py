"""The paper's kernel convolution (eq. 1): channel-wise 2-D convolution with a fixed 45x45 kernel.

K = (2*pi/5) * sum_{s=1..5} (2s-1)^2 * N2(0, (2s-1)^2), which is exactly (1/5) * sum_s g_s g_s^T with
g_s[k] = exp(-k^2 / (2 (2s-1)^2)), k = -22..22: a sum of five separable Gaussians, maximum 1 at the centre.
Zero padding, output the same size as the input. K is symmetric, so the input gradient is the same convolution.
The op takes a constant factor `scale` (the network's 0.01): applied to the accumulated sum before the one rounding to
the output type, it costs the kernels nothing, where a separate multiply would be a pass over the map each way.
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._checks import check_maps, check_number
from lgc_fast.ops._library import custom_op

KERNEL_SIZE = 45
RADIUS = KERNEL_SIZE // 2
SIGMAS = (1.0, 3.0, 5.0, 7.0, 9.0)
WEIGHT = 1.0 / len(SIGMAS)  # (2*pi/5) * sigma^2 * 1/(2*pi*sigma^2)


@functools.lru_cache(maxsize=None)
def _taps64() -> torch.Tensor:
    k = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64)
    sig = torch.tensor(SIGMAS, dtype=torch.float64)[:, None]
    return torch.exp(-(k[None, :] ** 2) / (2.0 * sig**2))


def kernel_taps(dtype=torch.float64, device=None) -> torch.Tensor:
    """g: (5, 45), the 1-D Gaussians whose weighted outer products sum to K: K = WEIGHT * sum_s g[s] g[s]^T."""
    return _taps64().to(dtype=dtype, device=device)


def kernel_2d(dtype=torch.float64, device=None) -> torch.Tensor:
    """K: (45, 45), eq. 1 truncated to 45x45; K[22, 22] == 1."""
    g = _taps64()
    return (WEIGHT * torch.einsum("si,sj->ij", g, g)).to(dtype=dtype, device=device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_conv_ref(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x: (N, C, H, W) -> scale * (K * x): (N, C, H, W). Plain torch (dense 45x45 depthwise conv2d); the test oracle.

    Half and bfloat16 inputs are computed in float32 and rounded once at the end.
    """
    _check_input(x, scale)
    c = x.shape[1]
    ct = _compute_dtype(x.dtype)
    weight = kernel_2d(ct, x.device).expand(c, 1, KERNEL_SIZE, KERNEL_SIZE)
    y = F.conv2d(x.to(ct), weight, padding=RADIUS, groups=c)
    out = torch.empty_like(x)
    out.copy_(y if scale == 1.0 else y * scale)
    return out


def _check_input(x, scale) -> None:
    check_maps(x, "x")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one channel (C >= 1), got shape {tuple(x.shape)}")
    check_number("scale", scale, lambda v: True, "a finite number")


def _ext_forward(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.ops.lgc_fast_C.kernel_conv(x, scale)


def _triton_forward(x: torch.Tensor, scale: float) -> torch.Tensor:
    return importlib.import_module("lgc_fast.kernels.kernel_conv").kernel_conv_triton(x, scale)


_IMPLS = {"cuda": _ext_forward, "cpu": _ext_forward, "triton": _triton_forward, "ref": kernel_conv_ref}


@custom_op("lgc_fast::kernel_conv", mutates_args=())
def _kernel_conv_op(x: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    return _IMPLS[backend](x, scale)


@_kernel_conv_op.register_fake
def _(x, scale, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.scale, ctx.backend = inputs[1], inputs[2]


def _backward(ctx, grad):
    # K is symmetric (K(-u) = K(u)), so the adjoint of the convolution is the convolution itself.
    return _kernel_conv_op(grad, ctx.scale, ctx.backend), None, None


_kernel_conv_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_conv(x: torch.Tensor, backend: str | None = None, *, scale: float = 1.0) -> torch.Tensor:
    """Channel-wise convolution with the paper's 45x45 kernel K (eq. 1), zero padding, same-size output, times the
    constant `scale`.

    x: (N, C, H, W), float32/float16/bfloat16/float64 (accumulates in float32, float64 in float64), contiguous or
    channels_last. Returns (N, C, H, W) with x's dtype and memory format: scale * (K * x), rounded once (so
    ``kernel_conv(x, scale=0.01)`` is both faster and more exact than ``kernel_conv(x) * 0.01`` in half precision).
    Differentiable. Equivalent to ``kernel_conv_ref(x, scale)``, i.e.
    ``scale * F.conv2d(x, K.expand(C, 1, 45, 45), padding=22, groups=C)``.
    backend: ``"cuda" | "triton" | "cpu" | "ref"``, default automatic (see ``lgc_fast.backends()``).
    """
    _check_input(x, scale)
    name = _backend.choose("kernel_conv", x.device, backend)
    return _kernel_conv_op(x, float(scale), name)
