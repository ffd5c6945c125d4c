"""Layout changes at the border between the network's channels_last maps and its planar ones.

The training step runs its convolutions channels_last (cuDNN's fastest layout), while kernel_conv and lgc_loss read
planar (NCHW-contiguous) maps. Rather than changing layout inside each of those ops (two batched transposes per call,
fourteen a step), the network's 1x1 output convolutions write planar maps directly (``pointwise_conv_planar``, a
batched GEMM), and the only layout change left is where the planar maps enter the global subnet
(``channels_last_cat``) and where that input's gradient leaves it (``planar_split``, its backward).

  pointwise_conv_planar(x, weight, bias)  x: (N, C, H, W) channels_last -> (N, K, H, W) planar; input gradient
                                          channels_last again
  channels_last_cat(parts)                (N, C_i, H, W) planar -> (N, sum C_i, H, W) channels_last
  planar_split(x, sizes)                  (N, sum sizes, H, W) -> planar (N, sizes[i], H, W) maps
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._checks import check_maps
from lgc_fast.ops._library import custom_op

_SUPPORTED = ("cuda", "ref")  # elsewhere torch's copies are what a kernel would do


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, H, W) is stored channels_last and not also planar (a map with C == 1 or H == W == 1 is
    both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def channels_last_strided(x: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W) with channels_last strides (stride 1 between channels), copied where it has others. Unlike
    ``x.contiguous(memory_format=torch.channels_last)``, which returns a 1-channel map unchanged (it counts as
    channels_last already), this gives it the strides from which torch's convolutions pick a channels_last output."""
    n, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def _new_cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The empty channels_last (N, sum C_i, H, W) map that channels_last_cat fills."""
    first = parts[0]
    n, _, h, w = first.shape
    return torch.empty((n, sum(p.shape[1] for p in parts), h, w), dtype=first.dtype, device=first.device,
                       memory_format=torch.channels_last)


def channels_last_cat_ref(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """parts: (N, C_i, H, W) -> (N, sum C_i, H, W) channels_last: ``torch.cat(parts, 1)`` in that memory format."""
    out = _new_cat(parts)
    start = 0
    for part in parts:
        out[:, start:start + part.shape[1]].copy_(part)
        start += part.shape[1]
    return out


def planar_split_ref(x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """x: (N, sum sizes, H, W) -> [(N, sizes[i], H, W) contiguous]: ``torch.split(x, sizes, 1)``, each part a new
    planar tensor (never a view of x)."""
    return [part.clone(memory_format=torch.contiguous_format) for part in torch.split(x, list(sizes), 1)]


@custom_op("lgc_fast::channels_last_cat", mutates_args=())
def _cat_op(parts: List[torch.Tensor], backend: str) -> torch.Tensor:
    if backend == "cuda":
        return torch.ops.lgc_fast_C.channels_last_cat(parts)
    return channels_last_cat_ref(parts)


@_cat_op.register_fake
def _(parts, backend):
    return _new_cat(parts)


@custom_op("lgc_fast::planar_split", mutates_args=())
def _split_op(x: torch.Tensor, sizes: List[int], backend: str) -> List[torch.Tensor]:
    if backend == "cuda":
        return torch.ops.lgc_fast_C.planar_split(x, sizes)
    return planar_split_ref(x, sizes)


@_split_op.register_fake
def _(x, sizes, backend):
    return [x.new_empty((x.shape[0], size, x.shape[2], x.shape[3])) for size in sizes]


def _cat_setup(ctx, inputs, output):
    ctx.sizes = [part.shape[1] for part in inputs[0]]
    ctx.backend = inputs[1]


def _cat_backward(ctx, grad):
    return list(_split_op(grad, ctx.sizes, ctx.backend)), None


_cat_op.register_autograd(_cat_backward, setup_context=_cat_setup)


def _split_setup(ctx, inputs, output):
    ctx.like = inputs[0].new_empty(0)
    ctx.shape = inputs[0].shape
    ctx.sizes = inputs[1]
    ctx.backend = inputs[2]


def _split_backward(ctx, grads):
    n, _, h, w = ctx.shape
    parts = [g if g is not None else ctx.like.new_zeros((n, size, h, w)) for g, size in zip(grads, ctx.sizes)]
    return _cat_op(parts, ctx.backend), None, None


_split_op.register_autograd(_split_backward, setup_context=_split_setup)


def _choose(device: torch.device, backend: str | None) -> str:
    return _backend.choose("channels_last_cat", device, backend, supported=_SUPPORTED)


def layout_backend(device: torch.device) -> str:
    """The backend the layout ops run on `device` by default: as ``backend=None`` chooses, but ``"ref"`` where
    $LGC_FAST_BACKEND names one they lack (``"cpu"``, ``"triton"``), so a network run under that setting still
    runs."""
    try:
        return _choose(device, None)
    except ValueError:
        return "ref"


def channels_last_cat(parts: Sequence[torch.Tensor], backend: str | None = None) -> torch.Tensor:
    """parts: (N, C_i, H, W) of one dtype and device, any layout -> (N, sum C_i, H, W) channels_last, equal to
    ``torch.cat(parts, 1)``. On CUDA each part moves by one batched transpose; the gradient comes back as planar
    (NCHW-contiguous) maps (``planar_split``). Differentiable. backend: ``"cuda" | "ref"`` (elsewhere torch's copy),
    default automatic."""
    parts = list(parts)
    if not parts:
        raise ValueError("channels_last_cat: parts must hold at least one map")
    for i, part in enumerate(parts):
        check_maps(part, f"parts[{i}]")
        if (part.shape[0], part.shape[2], part.shape[3]) != (parts[0].shape[0], parts[0].shape[2], parts[0].shape[3]):
            raise ValueError(f"parts[{i}] must have parts[0]'s N, H and W {tuple(parts[0].shape)}, "
                             f"got {tuple(part.shape)}")
        if part.dtype != parts[0].dtype or part.device != parts[0].device:
            raise ValueError(f"parts[{i}] must have parts[0]'s dtype and device ({parts[0].dtype}, "
                             f"{parts[0].device}), got {part.dtype}, {part.device}")
    return _cat_op(parts, _choose(parts[0].device, backend))


def planar_split(x: torch.Tensor, sizes: Sequence[int], backend: str | None = None) -> list[torch.Tensor]:
    """x: (N, sum sizes, H, W), any layout -> [(N, sizes[i], H, W) contiguous], the channel ranges of x in order,
    each a new tensor. On CUDA a channels_last x moves by batched transposes. Differentiable (its gradient is
    ``channels_last_cat`` of the parts' gradients). backend: ``"cuda" | "ref"``, default automatic."""
    check_maps(x, "x")
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != x.shape[1]:
        raise ValueError(f"sizes must be >= 0 and add up to x's {x.shape[1]} channels, got {sizes}")
    return _split_op(x, sizes, _choose(x.device, backend))


def pointwise_conv_planar_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` (1x1, stride 1, no padding) as a planar (NCHW-contiguous) map."""
    return F.conv2d(x, weight, bias).contiguous()


def conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of x would run in: autocast's where it is on (as for F.conv2d), else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _PointwisePlanar(torch.autograd.Function):
    """out[n] = W @ X[n]^T (+ b), with X[n] (H*W, C) the channels_last image n read in place: one batched GEMM whose
    output is planar. Backward: grad X[n] = G[n]^T @ W, again (H*W, C), i.e. channels_last."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        n, c, h, w = x.shape
        k = weight.shape[0]
        dtype = conv_dtype(x)
        pixels = x.to(dtype).permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view for a channels_last x
        w2 = weight.to(dtype).reshape(k, c)
        out = torch.bmm(w2.expand(n, k, c), pixels.transpose(1, 2))
        if bias is not None:
            out += bias.to(dtype).view(1, k, 1)
        ctx.save_for_backward(pixels, w2)
        ctx.shapes = (x.shape, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.view(n, k, h, w)

    @staticmethod
    def backward(ctx, grad):
        pixels, w2 = ctx.saved_tensors
        (n, c, h, w), x_dtype, weight_dtype, bias_dtype = ctx.shapes
        k = w2.shape[0]
        g = grad.to(w2.dtype).contiguous().view(n, k, h * w)
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(g.transpose(1, 2), w2.expand(n, k, c))  # (N, H*W, C): channels_last
            grad_x = grad_x.view(n, h, w, c).permute(0, 3, 1, 2).to(x_dtype)
        if ctx.needs_input_grad[1]:
            # one GEMM per image, summed in float32 or float64 (as a convolution's weight gradient accumulates)
            grad_w = torch.bmm(g, pixels).sum(0, dtype=acc).view(k, c, 1, 1).to(weight_dtype)
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2), dtype=acc).to(bias_dtype)
        return grad_x, grad_w, grad_b


def pointwise_conv_planar(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution whose output is planar (NCHW-contiguous) whatever x's layout.

    x: (N, C, H, W); weight: (K, C, 1, 1); bias: (K,) or None -> (N, K, H, W) contiguous, equal to
    ``F.conv2d(x, weight, bias)`` up to rounding (under autocast in autocast's dtype, as the convolution). For a
    channels_last x it is one batched GEMM reading x in place, and x's gradient comes back channels_last; for other
    layouts it is ``F.conv2d`` followed by a copy where the result is not planar. Differentiable.
    """
    check_maps(x, "x")
    if weight.dim() != 4 or weight.shape[2:] != (1, 1) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have shape (K, {x.shape[1]}, 1, 1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not is_channels_last(x) or x.numel() == 0:
        return pointwise_conv_planar_ref(x, weight, bias)
    return _PointwisePlanar.apply(x, weight, bias)
