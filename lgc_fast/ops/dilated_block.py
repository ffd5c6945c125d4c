"""One layer of the global-context subnet (paper section 3.3, release notes): a 3x3 convolution with dilation 4 and
zero padding 4, then BatchNorm, ReLU, 10 % dropout and the release's 0.1 activation scale, fused into one kernel:

    y = activation_scale * relu(conv(x, weight) * scale + shift) * keep / (1 - dropout_p)

BatchNorm enters as the per-channel affine (scale, shift) it applies: in eval mode ``fold_batchnorm`` gives
scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale. In training the statistics depend on
the convolution's output, so ``dilated_block_train`` runs the convolution kernel alone (``dilated_conv``) and then
BatchNorm with batch statistics, ReLU, dropout and the scale in torch.

Dropout takes a precomputed keep mask (N, Cout, H, W), bool or uint8, nonzero = keep (``draw_dropout_mask`` draws
one from torch's generator): it is reproducible, the backward reuses it, and the kernel reads one byte per output.
Without a mask there is no dropout (eval mode) and no 1/(1-p) factor.

Backends: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1 when asked for) and "ref" (plain torch; the automatic
choice on the CPU, where oneDNN runs it). Backward: the ReLU/dropout/affine part and the scale/shift reductions are
torch ops; the input and weight gradients are ``aten.convolution_backward``; the pre-activation conv(x, weight) is
recomputed with the op's own backend (checkpoint-style) instead of being stored by the forward.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._checks import check_number
from lgc_fast.ops._library import custom_op
from lgc_fast.ops.layout import is_channels_last

DILATION = 4
DROPOUT_P = 0.1
ACTIVATION_SCALE = 0.1
_SUPPORTED = ("triton", "ref")
_MASK_DTYPES = (torch.bool, torch.uint8)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow x: channels_last when x is channels_last (and not also plain contiguous), else contiguous."""
    if is_channels_last(x):
        return torch.channels_last
    return torch.contiguous_format


def _new_output(x: torch.Tensor, c_out: int, dtype: torch.dtype) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, c_out, h, w), dtype=dtype, device=x.device, memory_format=_memory_format(x))


def _channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# References (the test oracles)

def dilated_conv_ref(x: torch.Tensor, weight: torch.Tensor, dilation: int = DILATION) -> torch.Tensor:
    """x: (N, Cin, H, W), weight: (Cout, Cin, 3, 3) -> (N, Cout, H, W): F.conv2d with dilation d and padding d.

    Half and bfloat16 inputs are computed in float32 and rounded once at the end.
    """
    _check_conv_inputs(x, weight, dilation)
    ct = _compute_dtype(x.dtype)
    z = F.conv2d(x.to(ct), weight.to(ct), padding=dilation, dilation=dilation)
    out = _new_output(x, weight.shape[0], x.dtype)
    out.copy_(z)
    return out


def dilated_block_ref(x, weight, scale, shift, dropout_mask=None, *, dropout_p: float = DROPOUT_P,
                      activation_scale: float = ACTIVATION_SCALE, dilation: int = DILATION) -> torch.Tensor:
    """activation_scale * relu(conv(x) * scale + shift) * keep / (1 - p), in plain torch: (N, Cout, H, W)."""
    _check_block_inputs(x, weight, scale, shift, dropout_mask, dropout_p, activation_scale, dilation)
    ct = _compute_dtype(x.dtype)
    z = F.conv2d(x.to(ct), weight.to(ct), padding=dilation, dilation=dilation)
    r = torch.relu(z * _channel(scale, ct) + _channel(shift, ct))
    if dropout_mask is not None:
        r = r * (dropout_mask != 0).to(ct) * (1.0 / (1.0 - dropout_p))
    out = _new_output(x, weight.shape[0], x.dtype)
    out.copy_(activation_scale * r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backend implementations: conv(x, weight), with the epilogue relu(z * scale + shift) * out_scale * keep when scale
# is given, written in out_dtype.

def _ref_impl(x, weight, scale, shift, keep_mask, out_scale, dilation, out_dtype):
    ct = _compute_dtype(x.dtype)
    z = F.conv2d(x.to(ct), weight.to(ct), padding=dilation, dilation=dilation)
    if scale is not None:
        z = torch.relu(z * _channel(scale, ct) + _channel(shift, ct)) * out_scale
        if keep_mask is not None:
            z = z * (keep_mask != 0).to(ct)
    out = _new_output(x, weight.shape[0], out_dtype)
    out.copy_(z)
    return out


def _triton_impl(x, weight, scale, shift, keep_mask, out_scale, dilation, out_dtype):
    out = _new_output(x, weight.shape[0], out_dtype)
    kernels = importlib.import_module("lgc_fast.kernels.dilated_conv")
    return kernels.dilated_conv_triton(x, weight, scale, shift, keep_mask, out_scale, dilation, out)


_IMPLS = {"triton": _triton_impl, "ref": _ref_impl}


def _run(backend, x, weight, scale, shift, keep_mask, out_scale, dilation, out_dtype):
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return _new_output(x, weight.shape[0], out_dtype)
    return _IMPLS[backend](x, weight, scale, shift, keep_mask, out_scale, dilation, out_dtype)


def _conv_input_grads(grad_z, x, weight, dilation, backend, need_x, need_w):
    """(dx, dw) of conv(x, weight) for the output gradient grad_z; None where not needed."""
    if not (need_x or need_w):
        return None, None
    # On CUDA the fast backends stay in the input dtype (cuDNN accumulates in float32); the reference and the CPU
    # (where half-precision convolution backward is slow or missing) work in the compute dtype.
    use_native = x.device.type == "cuda" and backend != "ref"
    dt = x.dtype if use_native else _compute_dtype(x.dtype)
    pad = [dilation, dilation]
    dx, dw, _ = torch.ops.aten.convolution_backward(
        grad_z.to(dt), x.to(dt), weight.to(dt), None, [1, 1], pad, pad, False, [0, 0], 1, [need_x, need_w, False])
    return (dx.to(x.dtype) if need_x else None), (dw.to(weight.dtype) if need_w else None)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops

@custom_op("lgc_fast::dilated_conv", mutates_args=())
def _dilated_conv_op(x: torch.Tensor, weight: torch.Tensor, dilation: int, out_dtype: Optional[torch.dtype],
                     backend: str) -> torch.Tensor:
    return _run(backend, x, weight, None, None, None, 1.0, dilation, out_dtype or x.dtype)


@_dilated_conv_op.register_fake
def _(x, weight, dilation, out_dtype, backend):
    return _new_output(x, weight.shape[0], out_dtype or x.dtype)


def _conv_setup_context(ctx, inputs, output):
    x, weight, dilation, _, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation, ctx.backend = dilation, backend


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = _conv_input_grads(grad, x, weight, ctx.dilation, ctx.backend, *ctx.needs_input_grad[:2])
    return dx, dw, None, None, None


_dilated_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@custom_op("lgc_fast::dilated_conv_bn_act", mutates_args=())
def _bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
               keep_mask: Optional[torch.Tensor], out_scale: float, dilation: int, backend: str) -> torch.Tensor:
    return _run(backend, x, weight, scale, shift, keep_mask, out_scale, dilation, x.dtype)


@_bn_act_op.register_fake
def _(x, weight, scale, shift, keep_mask, out_scale, dilation, backend):
    return _new_output(x, weight.shape[0], x.dtype)


def _bn_act_setup_context(ctx, inputs, output):
    x, weight, scale, shift, keep_mask, out_scale, dilation, backend = inputs
    ctx.save_for_backward(x, weight, scale, shift, keep_mask)
    ctx.out_scale, ctx.dilation, ctx.backend = out_scale, dilation, backend


def _bn_act_backward(ctx, grad):
    x, weight, scale, shift, keep_mask = ctx.saved_tensors
    need_x, need_w, need_scale, need_shift = ctx.needs_input_grad[:4]
    ct = _compute_dtype(x.dtype)
    z = _dilated_conv_op(x, weight, ctx.dilation, ct, ctx.backend)
    s = _channel(scale, ct)
    active = (z * s + _channel(shift, ct)) > 0
    g_u = grad.to(ct) * ctx.out_scale * active
    if keep_mask is not None:
        g_u = g_u * (keep_mask != 0)
    d_scale = (g_u * z).sum(dim=(0, 2, 3)).to(scale.dtype) if need_scale else None
    d_shift = g_u.sum(dim=(0, 2, 3)).to(shift.dtype) if need_shift else None
    dx, dw = _conv_input_grads(g_u * s, x, weight, ctx.dilation, ctx.backend, need_x, need_w)
    return dx, dw, d_scale, d_shift, None, None, None, None


_bn_act_op.register_autograd(_bn_act_backward, setup_context=_bn_act_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Input checks

def _check_tensor(name, t, dims) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")


def _check_conv_inputs(x, weight, dilation) -> None:
    _check_tensor("x", x, 4)
    _check_tensor("weight", weight, 4)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one channel (Cin >= 1), got shape {tuple(x.shape)}")
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3) or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (Cout, Cin={x.shape[1]}, 3, 3) with Cout >= 1, "
                         f"got {tuple(weight.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")


def _check_block_inputs(x, weight, scale, shift, dropout_mask, dropout_p, activation_scale, dilation) -> None:
    _check_conv_inputs(x, weight, dilation)
    c_out = weight.shape[0]
    for name, v in (("scale", scale), ("shift", shift)):
        _check_tensor(name, v, 1)
        if not v.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.shape[0] != c_out:
            raise ValueError(f"{name} must have shape (Cout={c_out},), got {tuple(v.shape)}")
        if v.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {v.device}")
    if dropout_mask is not None:
        _check_tensor("dropout_mask", dropout_mask, 4)
        if dropout_mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"dropout_mask must be bool or uint8, got {dropout_mask.dtype}")
        want = (x.shape[0], c_out, x.shape[2], x.shape[3])
        if tuple(dropout_mask.shape) != want:
            raise ValueError(f"dropout_mask must have shape (N, Cout, H, W) = {want}, got {tuple(dropout_mask.shape)}")
        if dropout_mask.device != x.device:
            raise ValueError(f"dropout_mask must be on x's device {x.device}, got {dropout_mask.device}")
    _check_dropout_p(dropout_p)
    check_number("activation_scale", activation_scale, lambda v: True, "a finite number")


def _check_dropout_p(p) -> None:
    check_number("dropout_p", p, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


# ----------------------------------------------------------------------------------------------------------------
# Public API

def dilated_conv(x: torch.Tensor, weight: torch.Tensor, dilation: int = DILATION,
                 backend: str | None = None) -> torch.Tensor:
    """3x3 convolution with dilation `dilation` and zero padding `dilation`, no bias: (N, Cout, H, W).

    x: (N, Cin, H, W) float32/float16/bfloat16/float64 (float32 accumulation; float64 in float64), contiguous or
    channels_last (the output follows x's memory format); weight: (Cout, Cin, 3, 3), x's dtype. Differentiable.
    Equivalent to ``dilated_conv_ref``. backend: ``"triton" | "ref"``, default automatic (triton on CUDA, ref on CPU).
    """
    _check_conv_inputs(x, weight, dilation)
    name = _backend.choose("dilated_conv", x.device, backend, supported=_SUPPORTED)
    return _dilated_conv_op(x, weight, dilation, None, name)


def dilated_block(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  dropout_mask: torch.Tensor | None = None, *, dropout_p: float = DROPOUT_P,
                  activation_scale: float = ACTIVATION_SCALE, dilation: int = DILATION,
                  backend: str | None = None) -> torch.Tensor:
    """The fused layer y = activation_scale * relu(conv(x, weight) * scale + shift) * keep / (1 - dropout_p).

    x: (N, Cin, H, W) float32/float16/bfloat16/float64, contiguous or channels_last; weight: (Cout, Cin, 3, 3) in x's
    dtype; scale, shift: (Cout,) floating point (BatchNorm folded, see ``fold_batchnorm``); dropout_mask:
    (N, Cout, H, W) bool/uint8, nonzero = keep, or None for no dropout (then no 1/(1-p) factor either).
    Returns (N, Cout, H, W) in x's dtype and memory format. Differentiable in x, weight, scale and shift.
    Equivalent to ``dilated_block_ref``. backend: ``"triton" | "ref"``, default automatic (triton on CUDA, ref on CPU).
    """
    _check_block_inputs(x, weight, scale, shift, dropout_mask, dropout_p, activation_scale, dilation)
    name = _backend.choose("dilated_block", x.device, backend, supported=_SUPPORTED)
    out_scale = float(activation_scale)
    if dropout_mask is not None:
        out_scale /= 1.0 - dropout_p
    return _bn_act_op(x, weight, scale, shift, dropout_mask, out_scale, dilation, name)


def fold_batchnorm(bn_weight: torch.Tensor, bn_bias: torch.Tensor, running_mean: torch.Tensor,
                   running_var: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as (scale, shift), each (C,): bn(z) = z * scale + shift. Differentiable in weight/bias."""
    scale = bn_weight * torch.rsqrt(running_var + eps)
    return scale, bn_bias - running_mean * scale


def dilated_block_train(x: torch.Tensor, weight: torch.Tensor, bn_weight: torch.Tensor, bn_bias: torch.Tensor,
                        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        dropout_mask: torch.Tensor | None = None, *, dropout_p: float = DROPOUT_P,
                        activation_scale: float = ACTIVATION_SCALE, momentum: float = 0.1, eps: float = 1e-5,
                        dilation: int = DILATION, backend: str | None = None) -> torch.Tensor:
    """The layer in training mode: BatchNorm normalises with the batch statistics of conv(x, weight) and updates
    running_mean / running_var in place (as ``nn.BatchNorm2d`` does; pass None to skip). Shapes as ``dilated_block``;
    bn_weight, bn_bias: (Cout,). The convolution runs through ``dilated_conv``; the rest is torch.
    """
    _check_dropout_p(dropout_p)
    z = dilated_conv(x, weight, dilation=dilation, backend=backend)
    u = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training=True, momentum=momentum, eps=eps)
    y = torch.relu(u) * activation_scale
    if dropout_mask is not None:
        if tuple(dropout_mask.shape) != tuple(z.shape) or dropout_mask.dtype not in _MASK_DTYPES:
            raise ValueError(f"dropout_mask must be bool/uint8 of shape {tuple(z.shape)}, "
                             f"got {dropout_mask.dtype} {tuple(dropout_mask.shape)}")
        y = y * (dropout_mask != 0) * (1.0 / (1.0 - dropout_p))
    return y


def draw_dropout_mask(shape, p: float = DROPOUT_P, *, device=None, generator: torch.Generator | None = None,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A keep mask for ``dilated_block``: bool tensor of `shape` (N, Cout, H, W), True with probability 1 - p.

    Match memory_format to the layer output (channels_last for channels_last x) so the kernel reads it coalesced.
    """
    _check_dropout_p(p)
    u = torch.empty(tuple(shape), device=device, memory_format=memory_format)
    return u.uniform_(generator=generator) >= p
