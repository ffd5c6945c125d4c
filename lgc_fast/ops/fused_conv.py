"""A convolution with conv_stack's forward fusions (lgc_fast/ops/conv_stack.py): the previous block's BatchNorm-apply,
ReLU and dropout applied to its input as the convolution loads it, and the per-channel sum and sum of squares of its
output computed as it stores it:

    a = relu(x * scale + shift) * keep     (the prologue; a = x without scale and shift)
    z = conv(a, weight)                    (stride 1, an odd r x r filter, dilation d, zero padding d * (r // 2))
    -> z, sum(z), sum(z * z)               (per output channel, over N, H and W)

Why: in the training step each conv block's BatchNorm, ReLU and dropout cost two passes over its map forward (the
statistics, then the apply that writes the activation) besides the convolution; here the next convolution reads the
block's z and its keep bits instead of a written activation, and the statistics come with z. With this in every
block the activations are never written (README, performance: the route to the 2000 samples/s of issue 5).

The padding is the activation's: outside the image a is 0 (not relu(shift)). scale and shift fold BatchNorm and the
block's activation scale / (1 - p) (``bn_finalize``'s s and b); keep_bits are x's keep flags packed in x's
channels_last order (``pack_keep_mask(mask, memory_format=torch.channels_last)``, what the epilogue's drawn bits are
for a channels_last map).

Backends: "triton" (CUDA, or the CPU under TRITON_INTERPRET=1 when asked for): kernels/fused_conv.py, tiles loaded by
tensor-memory descriptors, so it needs Triton 3.4 or later and 16-byte aligned channel rows (Cin and Cout multiples of
8 for 16-bit types, 4 for float32, 2 for float64); its backward is the kernels of conv_stack's Triton pieces (the
input gradient with the prologue's gates and sums as its epilogue, the split-K filter gradient with the activation
made as it loads; the op ``lgc_fast::fused_conv_backward``). "ref" (plain torch, the automatic choice elsewhere):
backward through ``aten.convolution_backward`` on the recomputed activation, and the prologue's.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._library import custom_op
from lgc_fast.ops.bn_relu_dropout import unpack_keep_bits
from lgc_fast.ops.dilated_block import _channel, _compute_dtype

_SUPPORTED = ("triton", "ref")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SUM_DIMS = (0, 2, 3)


def _new_z(x: torch.Tensor, c_out: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _padding(weight: torch.Tensor, dilation: int) -> int:
    return dilation * (weight.shape[-1] // 2)


def _keep(keep_bits, x: torch.Tensor) -> Optional[torch.Tensor]:
    """x's keep flags as 0 / 1 in the compute dtype, or None without dropout."""
    if keep_bits is None:
        return None
    return unpack_keep_bits(keep_bits, x.shape, memory_format=torch.channels_last).to(_compute_dtype(x.dtype))


def _pre(xc: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift, from x in the compute dtype."""
    return xc * _channel(scale, xc.dtype) + _channel(shift, xc.dtype)


def _activation(pre: torch.Tensor, keep: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The prologue's a = relu(pre) * keep, rounded once to `dtype` (x's)."""
    a = torch.relu(pre)
    return (a if keep is None else a * keep).to(dtype)


def _sums(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zd = z.to(torch.float64)
    ct = _compute_dtype(z.dtype)
    return zd.sum(_SUM_DIMS).to(ct), (zd * zd).sum(_SUM_DIMS).to(ct)


# ----------------------------------------------------------------------------------------------------------------
# The reference (the test oracle)

def fused_conv_ref(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None, keep_bits: Optional[torch.Tensor] = None, *,
                   dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fused_conv`` in plain torch: a in the compute dtype rounded to x's, ``F.conv2d`` in the compute dtype, z
    rounded to x's dtype (channels_last), and the sums of z as rounded, added in float64."""
    _check(x, weight, scale, shift, keep_bits, dilation)
    ct = _compute_dtype(x.dtype)
    a = x if scale is None else _activation(_pre(x.to(ct), scale, shift), _keep(keep_bits, x), x.dtype)
    pad = _padding(weight, dilation)
    z = _new_z(x, weight.shape[0])
    z.copy_(F.conv2d(a.to(ct), weight.to(ct), padding=pad, dilation=dilation))
    return (z, *_sums(z))


# ----------------------------------------------------------------------------------------------------------------
# Backends

def triton_unusable(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why the Triton kernel cannot run these operands (none: it can): the descriptors' needs."""
    kernels = importlib.import_module("lgc_fast.kernels.fused_conv")
    if kernels.TensorDescriptor is None:
        import triton
        return [f"triton {triton.__version__} has no host tensor descriptors (Triton 3.4 or later)"]
    row_unit = 16 // x.element_size()
    reasons = [f"{name} = {count} is not a multiple of {row_unit} ({x.dtype} rows of 16-byte multiples)"
               for name, count in (("Cin", x.shape[1]), ("Cout", weight.shape[0])) if count % row_unit]
    if x.data_ptr() % 16:
        reasons.append("x's storage is not 16-byte aligned")
    return reasons


def _ref_impl(x, weight, scale, shift, keep_bits, dilation):
    return fused_conv_ref(x, weight, scale, shift, keep_bits, dilation=dilation)


def _triton_impl(x, weight, scale, shift, keep_bits, dilation):
    kernels = importlib.import_module("lgc_fast.kernels.fused_conv")
    ct = _compute_dtype(x.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    z = _new_z(x, c_out)
    sums = kernels.new_partial_sums(n, h, w, c_out, ct, x.device)
    prologue = None
    if scale is not None:
        prologue = kernels.BnPrologue(scale.to(ct).contiguous(), shift.to(ct).contiguous(), keep_bits)
    kernels.fused_conv_triton(x, kernels.pack_filter(weight), weight.shape[-1], dilation, z, prologue=prologue,
                              sums=sums)
    return z, kernels.add_partials(sums[0], ct), kernels.add_partials(sums[1], ct)


_IMPLS = {"triton": _triton_impl, "ref": _ref_impl}


# ----------------------------------------------------------------------------------------------------------------
# The custom op

@custom_op("lgc_fast::fused_conv", mutates_args=())
def _fused_conv_op(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor], keep_bits: Optional[torch.Tensor], dilation: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        z = _new_z(x, weight.shape[0])
        return (z, *_sums(z))
    return _IMPLS[backend](x, weight, scale, shift, keep_bits, dilation)


@_fused_conv_op.register_fake
def _(x, weight, scale, shift, keep_bits, dilation, backend):
    ct = _compute_dtype(x.dtype)
    c_out = weight.shape[0]
    return _new_z(x, c_out), x.new_empty(c_out, dtype=ct), x.new_empty(c_out, dtype=ct)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, keep_bits, dilation, backend = inputs
    ctx.save_for_backward(x, weight, scale, shift, keep_bits, output[0])
    ctx.dilation, ctx.backend = dilation, backend


@custom_op("lgc_fast::fused_conv_backward", mutates_args=())
def _triton_backward_op(grad_z: torch.Tensor, grad_sum: Optional[torch.Tensor], grad_sq: Optional[torch.Tensor],
                        x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                        shift: Optional[torch.Tensor], keep_bits: Optional[torch.Tensor], z: torch.Tensor,
                        dilation: int, need_x: bool, need_w: bool,
                        need_affine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triton backend's backward as the kernels of conv_stack's Triton pieces compute it: z's total gradient, grad_z
    + grad_sum + 2 * grad_sq * z, is BatchNorm backward's apply form (eq_dy = 1, eq_x = 2 * grad_sq, eq_b = grad_sum),
    made in the input gradient's prologue, which writes it for the filter gradient (in the filter gradient's own
    prologue where the input gradient does not run); the input gradient's gate epilogue (mean 0, invstd 1) gives g_pre =
    da * keep where x * scale + shift > 0 and its sums of g_pre * x (d_scale) and g_pre (d_shift); dx = g_pre * scale.
    -> (dx, dw, d_scale, d_shift), each (0,) where not asked for (d_scale, d_shift also without a prologue)."""
    kernels = importlib.import_module("lgc_fast.kernels.fused_conv")
    wgrad = importlib.import_module("lgc_fast.kernels.fused_conv_wgrad")
    ct = _compute_dtype(x.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    c_in, c_out, r = x.shape[1], weight.shape[0], weight.shape[-1]
    grad = grad_z.to(x.dtype).contiguous(memory_format=torch.channels_last)
    dbn = None
    if grad_sum is not None or grad_sq is not None:
        zeros = torch.zeros(c_out, dtype=ct, device=x.device)
        eq_x = zeros if grad_sq is None else (2 * grad_sq).to(ct).contiguous()
        eq_b = zeros if grad_sum is None else grad_sum.to(ct).contiguous()
        dbn = kernels.DbnPrologue(z, torch.ones(c_out, dtype=ct, device=x.device), eq_x, eq_b)
    prologue = None
    if scale is not None:
        prologue = kernels.BnPrologue(scale.to(ct).contiguous(), shift.to(ct).contiguous(), keep_bits)
    dx, dw, d_scale, d_shift = (x.new_empty(0) for _ in range(4))
    # the input gradient runs first: where it makes z's total gradient anyway, it writes it for the filter gradient
    dz = None
    if need_x or (need_affine and prologue is not None):
        dz = torch.empty_like(grad) if need_w and dbn is not None else None
        out = torch.empty_like(x, memory_format=torch.channels_last)
        w_packed = kernels.pack_filter(weight, transposed=True)
        if prologue is None:
            kernels.fused_conv_triton(grad, w_packed, r, dilation, out, prologue=dbn, prologue_out=dz)
            dx = out
        else:
            gate = kernels.Gate(x, prologue.scale, prologue.shift, torch.zeros(c_in, dtype=ct, device=x.device),
                                torch.ones(c_in, dtype=ct, device=x.device), keep_bits)
            sums = kernels.new_partial_sums(x.shape[0], x.shape[2], x.shape[3], c_in, ct, x.device)
            kernels.fused_conv_triton(grad, w_packed, r, dilation, out, prologue=dbn, gate=gate, sums=sums,
                                      prologue_out=dz)
            if need_x:
                dx = (out.to(ct) * _channel(prologue.scale, ct)).to(x.dtype)
            if need_affine:
                d_scale = kernels.add_partials(sums[0], scale.dtype)
                d_shift = kernels.add_partials(sums[1], shift.dtype)
    if need_w:
        grad, dbn = (grad, dbn) if dz is None else (dz, None)
        dw = wgrad.fused_conv_wgrad_triton(x, grad, r, dilation, prologue=prologue, dbn=dbn).to(weight.dtype)
    return dx, dw, d_scale, d_shift


@_triton_backward_op.register_fake
def _(grad_z, grad_sum, grad_sq, x, weight, scale, shift, keep_bits, z, dilation, need_x, need_w, need_affine):
    affine = need_affine and scale is not None
    return (torch.empty_like(x, memory_format=torch.channels_last) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            scale.new_empty(x.shape[1]) if affine else x.new_empty(0),
            shift.new_empty(x.shape[1]) if affine else x.new_empty(0))


def _backward(ctx, grad_z, grad_sum, grad_sq):
    """z's total gradient (its own, plus the sums' through z), then the convolution's and the prologue's."""
    x, weight, scale, shift, keep_bits, z = ctx.saved_tensors
    need_x, need_w, need_scale, need_shift = ctx.needs_input_grad[:4]
    if ctx.backend == "triton" and x.numel() > 0:
        grad_z = torch.zeros_like(z) if grad_z is None else grad_z
        dx, dw, d_scale, d_shift = _triton_backward_op(grad_z, grad_sum, grad_sq, x, weight, scale, shift, keep_bits,
                                                       z, ctx.dilation, need_x, need_w, need_scale or need_shift)
        return (dx if need_x else None, dw if need_w else None, d_scale if need_scale and scale is not None else None,
                d_shift if need_shift and scale is not None else None, None, None, None)
    ct = _compute_dtype(x.dtype)
    g = torch.zeros_like(z, dtype=ct) if grad_z is None else grad_z.to(ct)
    if grad_sum is not None:
        g = g + _channel(grad_sum, ct)
    if grad_sq is not None:
        g = g + 2 * z.to(ct) * _channel(grad_sq, ct)
    xc, keep = x.to(ct), _keep(keep_bits, x)
    pre = None if scale is None else _pre(xc, scale, shift)
    a = xc if scale is None else _activation(pre, keep, x.dtype).to(ct)
    pad = [_padding(weight, ctx.dilation)] * 2
    need_a = need_x or need_scale or need_shift
    da, dw, _ = torch.ops.aten.convolution_backward(
        g, a, weight.to(ct), None, [1, 1], pad, [ctx.dilation] * 2, False, [0, 0], 1, [need_a, need_w, False])
    dx = d_scale = d_shift = None
    if need_a and scale is None:
        dx = da.to(x.dtype)
    elif need_a:
        g_pre = torch.where(pre > 0, da, torch.zeros((), dtype=ct, device=da.device))
        if keep is not None:
            g_pre = g_pre * keep
        dx = (g_pre * _channel(scale, ct)).to(x.dtype) if need_x else None
        d_scale = (g_pre * xc).sum(_SUM_DIMS).to(scale.dtype) if need_scale else None
        d_shift = g_pre.sum(_SUM_DIMS).to(shift.dtype) if need_shift else None
    return dx, (dw.to(weight.dtype) if need_w else None), d_scale, d_shift, None, None, None


_fused_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and the public op

def _check(x, weight, scale, shift, keep_bits, dilation) -> None:
    for name, t, dims in (("x", x, 4), ("weight", weight, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-dimensional tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    r = weight.shape[-1]
    if weight.shape[1] != x.shape[1] or weight.shape[2] != r or r % 2 == 0 or weight.shape[0] == 0:
        raise ValueError(f"weight must be (Cout, Cin={x.shape[1]}, r, r) with r odd and Cout >= 1, got "
                         f"{tuple(weight.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (the prologue) or not at all")
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (x.shape[1],)
                              or not v.dtype.is_floating_point or v.device != x.device):
            raise ValueError(f"{name} must be a floating-point ({x.shape[1]},) tensor on {x.device}, got "
                             f"{getattr(v, 'dtype', type(v).__name__)} {tuple(getattr(v, 'shape', ()))}")
    if keep_bits is not None:
        if scale is None:
            raise ValueError("keep_bits needs the prologue (scale and shift)")
        size = (x.numel() + 7) // 8
        if (not isinstance(keep_bits, torch.Tensor) or keep_bits.dtype != torch.uint8
                or tuple(keep_bits.shape) != (size,) or keep_bits.device != x.device):
            raise ValueError(f"keep_bits must be uint8 of shape ({size},) on {x.device} (x's flags packed), got "
                             f"{getattr(keep_bits, 'dtype', type(keep_bits).__name__)} "
                             f"{tuple(getattr(keep_bits, 'shape', ()))}")


def fused_conv(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None,
               shift: Optional[torch.Tensor] = None, keep_bits: Optional[torch.Tensor] = None, *, dilation: int = 1,
               backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, sum, sq_sum): z = conv(relu(x * scale + shift) * keep, weight) (N, Cout, H, W) channels_last in x's dtype,
    and per output channel the sum of z and of z * z (Cout,) float32 (float64 for float64 x), from z as rounded.

    x: (N, Cin, H, W) float32/float16/bfloat16/float64 (channels_last is what the Triton kernel reads; other layouts
    are copied); weight: (Cout, Cin, r, r), x's dtype, r odd; scale, shift: (Cin,) floating point, or both None for a
    plain convolution; keep_bits: x's keep flags, uint8 ((N*Cin*H*W + 7) // 8,) in x's channels_last order (module
    docstring), or None for no dropout. Differentiable in x, weight, scale and shift (also through the sums; on the
    triton backend by Triton kernels too).
    backend: "triton" | "ref"; default triton on CUDA where ``triton_unusable`` finds nothing against it, else ref.
    """
    _check(x, weight, scale, shift, keep_bits, dilation)
    name = _backend.choose("fused_conv", x.device, backend, supported=_SUPPORTED)
    if name == "triton":
        reasons = triton_unusable(x, weight)
        if reasons and (backend or os.environ.get(_backend.ENV_VAR)):
            raise ValueError("fused_conv: the triton backend cannot run this: " + "; ".join(reasons))
        if reasons:
            name = "ref"
    return _fused_conv_op(x, weight, scale, shift, keep_bits, dilation, name)
