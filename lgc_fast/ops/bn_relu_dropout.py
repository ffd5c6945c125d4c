"""The epilogue of every conv block of the LGCN (paper section 3.2, the release's layers): BatchNorm, ReLU, the
release's 0.1 activation scale and dropout, as one op on the convolution's output z:

    y = activation_scale * relu((z - mean) / sqrt(var + eps) * weight + bias) * keep / (1 - dropout_p)

training=True normalises with the batch statistics of z (per channel over N, H, W) and updates running_mean /
running_var in place as ``nn.BatchNorm2d`` does (unbiased variance, `momentum`); training=False uses the running
statistics. Dropout takes a keep mask (N, C, H, W), bool or uint8, nonzero = keep, or the same flags packed into keep
bits (``keep_bits``, one bit a value: ``pack_keep_mask``, ``random_keep_bits``), or a seed from which the kernels draw
the mask themselves (``dropout_seed``: no mask is written or read, the backward draws it again), or none of these (then
no 1/(1-p) factor either).

Why an op: eager torch runs this as BatchNorm, ReLU, a multiply and dropout, about ten passes over the activations
forward and ten backward, and activations dominate the training step's memory traffic. The kernels take two passes
forward (statistics, then apply) and two backward (the gradient's per-channel sums, then apply), reading z again
instead of storing intermediate maps. The backward is a custom op too, so torch.compile keeps both sides opaque.
Keep bits cut the byte mask's traffic (a write, three reads) and memory eightfold; ``bn_relu_dropout_drawn`` draws
fresh ones inside the forward pass (on CUDA in the apply kernel), which saves their separate draw and one read;
seeded dropout trades them for Philox work in three passes; the bench (bench/bench_bn_relu_dropout.py) measures all.

Backends: "cuda" (the compiled CUDA kernels of csrc/cuda/bn_relu_dropout.cu), "triton" (CUDA, or the CPU under
TRITON_INTERPRET=1 when asked for), "cpu" (the compiled C++ kernels of csrc/cpu/bn_relu_dropout.cpp, the same passes
with OpenMP) and "ref" (plain torch). Every kernel backend draws seeded masks with Triton's Philox (tl.rand), so a
seed drops the same values on each.
"""
from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from lgc_fast import _backend
from lgc_fast.ops._checks import check_number
from lgc_fast.ops._library import custom_op
# float32 compute (float64 for float64) and outputs in z's memory format, as the dilated block's epilogue.
from lgc_fast.ops.dilated_block import (
    ACTIVATION_SCALE, DROPOUT_P, _channel, _check_dropout_p, _compute_dtype, _memory_format, _new_output,
    fold_batchnorm,
)

_SUPPORTED = ("cuda", "cpu", "triton", "ref")
SEEDED_LIMIT = 2**31  # = kernels.bn_relu_dropout.SEEDED_LIMIT (kept here too: importing the kernels needs Triton)
BYTE_MASK_LIMIT = 2**34  # values the C++ draws of random_keep_mask/_bits number (four per 32-bit Philox counter)
_MASK_DTYPES = (torch.bool, torch.uint8)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _flattenable(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """t, or a copy in `memory_format` where its H and W strides cannot merge into one pixel stride."""
    _, _, h, w = t.shape
    if h == 1 or w == 1 or t.stride(2) == w * t.stride(3):
        return t
    return t.contiguous(memory_format=memory_format)


def _new_like(z: torch.Tensor) -> torch.Tensor:
    return _new_output(z, z.shape[1], z.dtype)


def _kernels():
    return importlib.import_module("lgc_fast.kernels.bn_relu_dropout")


def _update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update: running = (1 - momentum) * running + momentum * batch, with the unbiased variance."""
    with torch.no_grad():  # lerp: running + momentum * (batch - running); one foreach launch for both buffers
        unbiased = var * (count / (count - 1))
        if mean.dtype == running_mean.dtype and unbiased.dtype == running_var.dtype:
            torch._foreach_lerp_([running_mean, running_var], [mean, unbiased], momentum)
        else:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)


# ----------------------------------------------------------------------------------------------------------------
# Reference (the test oracle): the formula of the module docstring, written out in torch.

def bn_relu_dropout_ref(z: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None,
                        keep_mask: torch.Tensor | None = None, *, training: bool, momentum: float = 0.1,
                        eps: float = 1e-5, dropout_p: float = DROPOUT_P, activation_scale: float = ACTIVATION_SCALE,
                        dropout_seed: torch.Tensor | None = None,
                        keep_bits: torch.Tensor | None = None) -> torch.Tensor:
    """z: (N, C, H, W) -> y (N, C, H, W) in z's dtype and memory format, computed in float32 (float64 for float64).
    Keep bits are unpacked (``unpack_keep_bits``); a dropout_seed is turned into its keep mask by
    ``dropout_keep_mask`` (which needs Triton or the compiled kernels)."""
    _check(z, running_mean, running_var, weight, bias, keep_mask, training, momentum, eps, dropout_p,
           activation_scale, dropout_seed, keep_bits)
    if keep_bits is not None:
        keep_mask = unpack_keep_bits(keep_bits, z.shape, memory_format=_memory_format(z))
    if dropout_seed is not None:
        keep_mask = dropout_keep_mask(dropout_seed, z.shape, dropout_p)
    ct = _compute_dtype(z.dtype)
    zc = z.to(ct)
    if training:
        mean = zc.mean(dim=(0, 2, 3))
        var = zc.var(dim=(0, 2, 3), unbiased=False)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, z.numel() // z.shape[1], momentum)
    else:
        mean, var = running_mean.to(ct), running_var.to(ct)
    u = (zc - _channel(mean, ct)) * _channel(torch.rsqrt(var + eps), ct)
    if weight is not None:
        u = u * _channel(weight, ct)
    if bias is not None:
        u = u + _channel(bias, ct)
    y = torch.relu(u) * activation_scale
    if keep_mask is not None:
        y = y * (keep_mask != 0).to(ct) * (1.0 / (1.0 - dropout_p))
    out = _new_like(z)
    out.copy_(y)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The backends' passes, one interface: moments, apply, grad_sums, grad_apply (see kernels/bn_relu_dropout.py for what
# each computes) and keep_mask, the mask a seed draws.

class _TritonPasses:
    """The Triton kernels (lgc_fast.kernels.bn_relu_dropout); maps need H and W strides that merge."""

    @staticmethod
    def moments(z):
        return _kernels().moments_triton(z)

    @staticmethod
    def apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale):
        kernels = _kernels()
        return kernels.apply_triton(z, scale, shift, kernels.Dropout(keep_mask, seed, dropout_p), out_scale,
                                    _new_like(z))

    @staticmethod
    def grad_sums(grad, z, scale, shift, keep_mask, seed, dropout_p, center, out_scale):
        kernels = _kernels()
        return kernels.grad_sums_triton(_flattenable(grad, _memory_format(z)), z, scale, shift,
                                        kernels.Dropout(keep_mask, seed, dropout_p), center, out_scale)

    @staticmethod
    def grad_apply(grad, z, scale, shift, keep_mask, seed, dropout_p, k1, k0, out_scale):
        kernels = _kernels()
        return kernels.grad_apply_triton(_flattenable(grad, _memory_format(z)), z, scale, shift,
                                         kernels.Dropout(keep_mask, seed, dropout_p), k1, k0, out_scale, _new_like(z))

    @staticmethod
    def keep_mask(seed, shape, dropout_p, memory_format):
        out = torch.empty(shape, dtype=torch.uint8, device=seed.device, memory_format=memory_format)
        if out.numel():
            _kernels().keep_mask_triton(seed, dropout_p, out)
        return out.view(torch.bool)


class _ExtensionPasses:
    """The compiled kernels through the lgc_fast_C ops, which dispatch on z's device: csrc/cpu/bn_relu_dropout.cpp or
    csrc/cuda/bn_relu_dropout.cu. They bring the mask and the gradient to z's layout themselves. (Training runs as one
    op each way, lgc_fast_C::bn_relu_dropout_train, with its autograd in C++.)"""

    @staticmethod
    def apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale):
        return torch.ops.lgc_fast_C.bn_relu_dropout_apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale)

    @staticmethod
    def grad_sums(grad, z, scale, shift, keep_mask, seed, dropout_p, center, out_scale):
        return torch.ops.lgc_fast_C.bn_relu_dropout_grad_sums(grad, z, scale, shift, keep_mask, seed, dropout_p,
                                                              center, out_scale)

    @staticmethod
    def grad_apply(grad, z, scale, shift, keep_mask, seed, dropout_p, k1, k0, out_scale):
        return torch.ops.lgc_fast_C.bn_relu_dropout_grad_apply(grad, z, scale, shift, keep_mask, seed, dropout_p, k1,
                                                               k0, out_scale)

    @staticmethod
    def keep_mask(seed, shape, dropout_p, memory_format):
        return torch.ops.lgc_fast_C.dropout_keep_mask(seed, list(shape), dropout_p,
                                                      memory_format == torch.channels_last)


_PASSES = {"cpu": _ExtensionPasses, "cuda": _ExtensionPasses, "triton": _TritonPasses}  # dropout_keep_mask's order


# ----------------------------------------------------------------------------------------------------------------
# Custom ops over a backend's passes. out_scale = activation_scale, divided by 1 - dropout_p when there is a mask.
# Training with batch statistics: lgc_fast::bn_relu_dropout_train over the Triton passes; the compiled backends
# have lgc_fast_C::bn_relu_dropout_train (csrc/bn_relu_dropout_train.cpp: the same formulas, and its autograd, in C++).

def _train_affine(weight, bias, mean, var, eps):
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(mean.dtype) * invstd
    return invstd, scale, bias.to(mean.dtype) - mean * scale


@custom_op("lgc_fast::bn_relu_dropout_train", mutates_args=())
def _train_op(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, keep_mask: Optional[torch.Tensor],
              seed: Optional[torch.Tensor], dropout_p: float, eps: float,
              out_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, var = _TritonPasses.moments(z)
    _, scale, shift = _train_affine(weight, bias, mean, var, eps)
    return _TritonPasses.apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale), mean, var


@_train_op.register_fake
def _(z, weight, bias, keep_mask, seed, dropout_p, eps, out_scale):
    stat = z.new_empty((z.shape[1],), dtype=_compute_dtype(z.dtype))
    return _new_like(z), stat, torch.empty_like(stat)


@custom_op("lgc_fast::bn_relu_dropout_train_backward", mutates_args=())
def _train_backward_op(grad: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       mean: torch.Tensor, var: torch.Tensor, keep_mask: Optional[torch.Tensor],
                       seed: Optional[torch.Tensor], dropout_p: float, eps: float,
                       out_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    passes = _TritonPasses
    invstd, scale, shift = _train_affine(weight, bias, mean, var, eps)
    sum_g, sum_g_centered = passes.grad_sums(grad, z, scale, shift, keep_mask, seed, dropout_p, mean, out_scale)
    count = z.numel() // z.shape[1]
    # dz = scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = (z - mean) * invstd, written as scale * g + k1 * z + k0.
    k1 = -scale * invstd * invstd * sum_g_centered / count
    k0 = -scale * sum_g / count - k1 * mean
    dz = passes.grad_apply(grad, z, scale, shift, keep_mask, seed, dropout_p, k1, k0, out_scale)
    return dz, (sum_g_centered * invstd).to(weight.dtype), sum_g.to(bias.dtype)


@_train_backward_op.register_fake
def _(grad, z, weight, bias, mean, var, keep_mask, seed, dropout_p, eps, out_scale):
    return _new_like(z), torch.empty_like(weight), torch.empty_like(bias)


def _train_setup_context(ctx, inputs, output):
    z, weight, bias, keep_mask, seed, dropout_p, eps, out_scale = inputs
    _, mean, var = output
    ctx.save_for_backward(z, weight, bias, mean, var, keep_mask, seed)
    ctx.dropout_p, ctx.eps, ctx.out_scale = dropout_p, eps, out_scale


def _train_backward(ctx, grad, grad_mean, grad_var):
    # mean and var are returned for the running statistics only; the public function never lets them carry gradients.
    z, weight, bias, mean, var, keep_mask, seed = ctx.saved_tensors
    dz, dweight, dbias = _train_backward_op(grad, z, weight, bias, mean, var, keep_mask, seed, ctx.dropout_p,
                                            ctx.eps, ctx.out_scale)
    return dz, dweight, dbias, None, None, None, None, None


_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)


@custom_op("lgc_fast::scale_shift_relu_dropout", mutates_args=())
def _affine_op(z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, keep_mask: Optional[torch.Tensor],
               seed: Optional[torch.Tensor], dropout_p: float, out_scale: float, backend: str) -> torch.Tensor:
    return _PASSES[backend].apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale)


@_affine_op.register_fake
def _(z, scale, shift, keep_mask, seed, dropout_p, out_scale, backend):
    return _new_like(z)


@custom_op("lgc_fast::scale_shift_relu_dropout_backward", mutates_args=())
def _affine_backward_op(grad: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                        keep_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor], dropout_p: float,
                        out_scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    passes = _PASSES[backend]
    sum_g, sum_gz = passes.grad_sums(grad, z, scale, shift, keep_mask, seed, dropout_p, torch.zeros_like(scale),
                                     out_scale)
    dz = passes.grad_apply(grad, z, scale, shift, keep_mask, seed, dropout_p, None, None, out_scale)
    return dz, sum_gz.to(scale.dtype), sum_g.to(shift.dtype)


@_affine_backward_op.register_fake
def _(grad, z, scale, shift, keep_mask, seed, dropout_p, out_scale, backend):
    return _new_like(z), torch.empty_like(scale), torch.empty_like(shift)


def _affine_setup_context(ctx, inputs, output):
    z, scale, shift, keep_mask, seed, dropout_p, out_scale, backend = inputs
    ctx.save_for_backward(z, scale, shift, keep_mask, seed)
    ctx.dropout_p, ctx.out_scale, ctx.backend = dropout_p, out_scale, backend


def _affine_backward(ctx, grad):
    z, scale, shift, keep_mask, seed = ctx.saved_tensors
    dz, dscale, dshift = _affine_backward_op(grad, z, scale, shift, keep_mask, seed, ctx.dropout_p, ctx.out_scale,
                                             ctx.backend)
    return dz, dscale, dshift, None, None, None, None, None


_affine_op.register_autograd(_affine_backward, setup_context=_affine_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Input checks

def _check_vector(name, v, z) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if tuple(v.shape) != (z.shape[1],):
        raise ValueError(f"{name} must have shape (C={z.shape[1]},), got {tuple(v.shape)}")
    if v.device != z.device:
        raise ValueError(f"{name} must be on z's device {z.device}, got {v.device}")


def _check_seed(seed, device) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"dropout_seed must be an int64 tensor of one value, got "
                        f"{getattr(seed, 'dtype', type(seed).__name__)} {tuple(getattr(seed, 'shape', ()))}")
    if seed.device != device:
        raise ValueError(f"dropout_seed must be on z's device {device}, got {seed.device}")


def _check_keep_bits(bits, z) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8:
        raise TypeError(f"keep_bits must be a uint8 tensor, got {getattr(bits, 'dtype', type(bits).__name__)}")
    size = (z.numel() + 7) // 8
    if tuple(bits.shape) != (size,):
        raise ValueError(f"keep_bits must have shape ((N*C*H*W + 7) // 8,) = ({size},) for z of shape "
                         f"{tuple(z.shape)}, got {tuple(bits.shape)}")
    if bits.device != z.device:
        raise ValueError(f"keep_bits must be on z's device {z.device}, got {bits.device}")


def _check(z, running_mean, running_var, weight, bias, keep_mask, training, momentum, eps, dropout_p,
           activation_scale, dropout_seed=None, keep_bits=None) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4:
        raise ValueError(f"z must have shape (N, C, H, W), got {tuple(z.shape)}")
    if z.dtype not in _DTYPES:
        raise TypeError(f"z must be float32, float16, bfloat16 or float64, got {z.dtype}")
    if z.shape[1] == 0:
        raise ValueError(f"z must have at least one channel, got shape {tuple(z.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if v is not None:
            _check_vector(name, v, z)
    if not training and running_mean is None:
        raise ValueError("training=False normalises with running_mean and running_var; both are None")
    if training and z.numel() // z.shape[1] < 2:
        raise ValueError(f"training=True needs more than one value per channel (N*H*W >= 2), got shape "
                         f"{tuple(z.shape)}")
    if keep_mask is not None:
        if not isinstance(keep_mask, torch.Tensor) or keep_mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"keep_mask must be a bool or uint8 tensor, got "
                            f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)}")
        if keep_mask.shape != z.shape:
            raise ValueError(f"keep_mask must have z's shape {tuple(z.shape)}, got {tuple(keep_mask.shape)}")
        if keep_mask.device != z.device:
            raise ValueError(f"keep_mask must be on z's device {z.device}, got {keep_mask.device}")
    if keep_bits is not None:
        if keep_mask is not None or dropout_seed is not None:
            raise ValueError("give one of keep_mask, keep_bits and dropout_seed, not several")
        _check_keep_bits(keep_bits, z)
    if dropout_seed is not None:
        if keep_mask is not None:
            raise ValueError("give keep_mask or dropout_seed, not both")
        _check_seed(dropout_seed, z.device)
        if z.numel() >= SEEDED_LIMIT:
            raise ValueError(f"dropout_seed draws for at most {SEEDED_LIMIT} values, z has {z.numel()}; "
                             f"pass a keep_mask instead")
    check_number("momentum", momentum, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
    check_number("eps", eps, lambda v: v > 0.0, "a positive number")
    _check_dropout_p(dropout_p)
    check_number("activation_scale", activation_scale, lambda v: True, "a finite number")


# ----------------------------------------------------------------------------------------------------------------
# Public API

def bn_relu_dropout(z: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, keep_mask: torch.Tensor | None = None, *,
                    training: bool, momentum: float = 0.1, eps: float = 1e-5, dropout_p: float = DROPOUT_P,
                    activation_scale: float = ACTIVATION_SCALE, dropout_seed: torch.Tensor | None = None,
                    keep_bits: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """y = activation_scale * relu(batch_norm(z)) * keep / (1 - dropout_p), arguments in ``F.batch_norm``'s order.

    z: (N, C, H, W) float32/float16/bfloat16/float64, contiguous or channels_last (y follows); running_mean,
    running_var: (C,) or both None (training only); weight, bias: (C,) or None (1 and 0). Dropout, one of: keep_mask
    (N, C, H, W) bool/uint8; keep_bits ((N*C*H*W + 7) // 8,) uint8, the mask packed in z's memory format
    (``pack_keep_mask``, ``random_keep_bits``: an eighth of the mask's memory and traffic); dropout_seed, an int64
    tensor of one value on z's device from which the kernels draw the mask themselves (the mask of
    ``dropout_keep_mask``; nothing is stored, the backward draws it again); or none. Differentiable in z, weight and
    bias. Equivalent to ``bn_relu_dropout_ref``.
    backend: ``"cuda" | "cpu" | "triton" | "ref"``, default automatic: on CUDA tensors cuda (the compiled CUDA
    kernels), else triton; on the CPU cpu (the compiled C++ kernels); ref where neither runs.
    """
    _check(z, running_mean, running_var, weight, bias, keep_mask, training, momentum, eps, dropout_p,
           activation_scale, dropout_seed, keep_bits)
    name = _backend.choose("bn_relu_dropout", z.device, backend, supported=_SUPPORTED)
    if name == "ref" or z.numel() == 0:
        return bn_relu_dropout_ref(z, running_mean, running_var, weight, bias, keep_mask, training=training,
                                   momentum=momentum, eps=eps, dropout_p=dropout_p, activation_scale=activation_scale,
                                   dropout_seed=dropout_seed, keep_bits=keep_bits)
    dropping = keep_mask is not None or keep_bits is not None or dropout_seed is not None
    weight, bias, out_scale = _affine_args(z, weight, bias, activation_scale, dropout_p, dropping)
    fmt = _memory_format(z)
    z = _flattenable(z, fmt)
    if keep_mask is not None:
        keep_mask = _flattenable(keep_mask, fmt)
    else:
        keep_mask = keep_bits  # the kernels tell keep bits by their one dimension
    p = float(dropout_p)
    if not training:
        ct = _compute_dtype(z.dtype)
        scale, shift = fold_batchnorm(weight, bias, running_mean.to(ct), running_var.to(ct), eps)
        return _affine_op(z, scale.to(ct), shift.to(ct), keep_mask, dropout_seed, p, out_scale, name)
    if name in ("cpu", "cuda"):  # one C++ call each way, the running update included
        return torch.ops.lgc_fast_C.bn_relu_dropout_train(z, weight, bias, keep_mask, dropout_seed, running_mean,
                                                          running_var, float(momentum), p, float(eps), out_scale)[0]
    y, mean, var = _train_op(z, weight, bias, keep_mask, dropout_seed, p, float(eps), out_scale)
    if running_mean is not None:
        _update_running(running_mean, running_var, mean, var, z.numel() // z.shape[1], momentum)
    return y


def _affine_args(z, weight, bias, activation_scale, dropout_p, dropping: bool):
    """The kernels' weight and bias (1 and 0 for None) and output scale (with dropout's 1 / (1 - p))."""
    ct, c = _compute_dtype(z.dtype), z.shape[1]
    weight = torch.ones(c, dtype=ct, device=z.device) if weight is None else weight
    bias = torch.zeros(c, dtype=ct, device=z.device) if bias is None else bias
    out_scale = float(activation_scale) / (1.0 - dropout_p) if dropping else float(activation_scale)
    return weight, bias, out_scale


def bn_relu_dropout_drawn(z: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          weight: torch.Tensor | None, bias: torch.Tensor | None, *, momentum: float = 0.1,
                          eps: float = 1e-5, dropout_p: float = DROPOUT_P, activation_scale: float = ACTIVATION_SCALE,
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn_relu_dropout`` in training with fresh dropout: -> (y, keep_bits), keep_bits being what
    ``random_keep_bits(z, dropout_p, backend)`` would draw from torch's generator in its present state, and y
    ``bn_relu_dropout(..., training=True, keep_bits=keep_bits)``, bit for bit.

    With the compiled kernels of z's device the forward pass draws the bits itself, one C++ call instead of two; on
    CUDA the apply kernel draws and writes them where each of its thread steps covers whole bytes (float16 and bfloat16
    maps whose C (channels_last) or H * W (contiguous) is a multiple of 8, as the training step's are): one launch and
    one pass fewer than drawing first. Elsewhere it is exactly those two calls. Arguments as ``bn_relu_dropout``;
    differentiable in z, weight and bias; the running statistics are updated as there.
    """
    _check(z, running_mean, running_var, weight, bias, None, True, momentum, eps, dropout_p, activation_scale)
    name = _backend.choose("bn_relu_dropout", z.device, backend, supported=_SUPPORTED)
    seed = _compiled_draw_seed(z, name) if z.numel() > 0 else None
    if seed is None:
        keep_bits = random_keep_bits(z, dropout_p, name)
        y = bn_relu_dropout(z, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps,
                            dropout_p=dropout_p, activation_scale=activation_scale, keep_bits=keep_bits, backend=name)
        return y, keep_bits
    weight, bias, out_scale = _affine_args(z, weight, bias, activation_scale, dropout_p, True)
    z = _flattenable(z, _memory_format(z))
    y, _, _, keep_bits = torch.ops.lgc_fast_C.bn_relu_dropout_train_drawn(
        z, weight, bias, seed, running_mean, running_var, float(momentum), float(dropout_p), float(eps), out_scale)
    return y, keep_bits


def dropout_keep_mask(seed: torch.Tensor, shape, p: float = DROPOUT_P, backend: str | None = None, *,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The keep mask (N, C, H, W) bool, in `memory_format` (contiguous or channels_last), that
    ``bn_relu_dropout(..., dropout_seed=seed, dropout_p=p)`` draws: Philox from the seed and each value's index in
    (N, C, H, W) order, kept with probability 1 - p. Every backend draws the same mask (Triton's tl.rand): ``"cpu"``
    (the compiled C++ kernels, CPU tensors), ``"cuda"`` (the compiled CUDA kernels) or ``"triton"`` (CUDA, or the CPU
    under TRITON_INTERPRET=1); default the first usable on seed's device."""
    _check_dropout_p(p)
    _check_seed(seed, seed.device if isinstance(seed, torch.Tensor) else None)
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4 or min(shape) < 0 or math.prod(shape) >= SEEDED_LIMIT:
        raise ValueError(f"shape must be (N, C, H, W) with fewer than {SEEDED_LIMIT} values, got {shape}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    if backend is not None and backend not in _PASSES:
        raise ValueError(f"backend must be one of {', '.join(_PASSES)}, not {backend!r}")
    why = ""
    for name in _PASSES if backend is None else (backend,):
        ok, why = _backend._usable(name, seed.device)
        if ok:
            return _PASSES[name].keep_mask(seed, shape, float(p), memory_format)
    raise ValueError(f"dropout_keep_mask draws with the compiled or the Triton kernels, not usable here: {why}")


def _compiled_draw_seed(z: torch.Tensor, backend: str | None) -> torch.Tensor | None:
    """A seed from torch's generator for the compiled kernels' i.i.d. draws (bernoulli_keep_mask / _bits) where
    `backend` is those of z's device and they number z's values, else None."""
    if backend == z.device.type and backend in ("cpu", "cuda") and z.numel() < BYTE_MASK_LIMIT:
        if _backend.has_compiled_kernels(backend):
            return torch.randint(2**62, (1,), device=z.device)
    return None


def random_keep_mask(z: torch.Tensor, p: float, backend: str | None) -> torch.Tensor:
    """A fresh dropout keep mask for z (bool, z's shape and memory format, each value kept with probability 1 - p),
    from torch's default generator (z's device), so runs stay reproducible and resumable. With the compiled kernels
    of z's device (backend "cpu" on the CPU, "cuda" on a GPU) it is drawn from a seed, four flags per Philox
    evaluation, the same flags on both (several times faster than ``bernoulli_`` on the CPU; not the mask a
    ``dropout_seed`` draws); elsewhere ``bernoulli_``."""
    seed = _compiled_draw_seed(z, backend)
    if seed is not None:
        return torch.ops.lgc_fast_C.bernoulli_keep_mask(seed, list(z.shape), float(p),
                                                        _memory_format(z) == torch.channels_last)
    return torch.empty_like(z, dtype=torch.bool, memory_format=_memory_format(z)).bernoulli_(1.0 - p)


def pack_keep_mask(keep_mask: torch.Tensor, *, memory_format: torch.memory_format) -> torch.Tensor:
    """keep_mask (N, C, H, W) bool/uint8 (nonzero = keep) -> its keep bits ((N*C*H*W + 7) // 8,) uint8 for a z in
    `memory_format` (torch.contiguous_format or torch.channels_last; it must be z's): bit e % 8, least significant
    first, of byte e // 8 is the flag of the value at offset e of that layout, dense; the last byte's spare bits are 0."""
    flags = _memory_order(keep_mask, memory_format).reshape(-1) != 0
    padded = torch.zeros(((flags.numel() + 7) // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:flags.numel()] = flags
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=flags.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_keep_bits(keep_bits: torch.Tensor, shape, *, memory_format: torch.memory_format) -> torch.Tensor:
    """The keep mask (N, C, H, W) bool, in `memory_format`, whose keep bits ``pack_keep_mask`` gives."""
    n, c, h, w = (int(v) for v in shape)
    count = n * c * h * w
    if keep_bits.dtype != torch.uint8 or tuple(keep_bits.shape) != ((count + 7) // 8,):
        raise ValueError(f"keep_bits must be uint8 of shape ({(count + 7) // 8},) for shape {tuple(shape)}, got "
                         f"{keep_bits.dtype} {tuple(keep_bits.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=keep_bits.device)
    flags = ((keep_bits[:, None] >> shifts) & 1).reshape(-1)[:count].bool()
    if _channels_last(memory_format):
        return flags.view(n, h, w, c).permute(0, 3, 1, 2)
    return flags.view(n, c, h, w)


def _channels_last(memory_format: torch.memory_format) -> bool:
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    return memory_format == torch.channels_last


def _memory_order(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """t (N, C, H, W) with its dimensions in `memory_format`'s order, outermost first."""
    if t.dim() != 4:
        raise ValueError(f"keep_mask must have shape (N, C, H, W), got {tuple(t.shape)}")
    return t.permute(0, 2, 3, 1) if _channels_last(memory_format) else t


def random_keep_bits(z: torch.Tensor, p: float, backend: str | None) -> torch.Tensor:
    """``random_keep_mask``'s flags as keep bits for z ((N*C*H*W + 7) // 8,) uint8 (``pack_keep_mask`` in z's
    memory format): with the compiled kernels of z's device drawn packed, the bits of the byte mask
    ``random_keep_mask`` would have drawn from the same generator state; elsewhere ``bernoulli_`` packed."""
    seed = _compiled_draw_seed(z, backend)
    if seed is not None:
        return torch.ops.lgc_fast_C.bernoulli_keep_bits(seed, z.numel(), float(p))
    return pack_keep_mask(random_keep_mask(z, p, None), memory_format=_memory_format(z))


def fused_backend(device: torch.device) -> str | None:
    """The backend ("cuda", "cpu" or "triton") whose kernels ``bn_relu_dropout`` runs on `device` by default, or None
    where that is the reference (which is no faster than torch's own modules). A $LGC_FAST_BACKEND this op lacks also
    gives None."""
    try:
        name = _backend.choose("bn_relu_dropout", device, None, supported=_SUPPORTED)
    except ValueError:
        return None
    return name if name in _PASSES else None
