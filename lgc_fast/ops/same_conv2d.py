"""The network's convolutions (stride 1, an odd k x k filter, zero padding dilation * (k // 2), so the output has the
input's size), each run on whichever of cuDNN's two kernel families for that sum is faster at its shape.

    y[n, o, p] = sum_{c, r} W[o, c, r] x[n, c, p + dilation * r]      (r: the k x k offsets around 0)

is what ``F.conv2d`` computes with the forward kernels ("fprop"), and also what ``F.conv_transpose2d(x, V)`` with
V = W.transpose(0, 1).flip(2, 3) computes with the data-gradient kernels ("dgrad"): at stride 1 a transposed
convolution is the convolution with the transposed, flipped filter, and the same padding keeps the size. The input
gradient is the same kind of sum, dx = conv2d(dy, V), so it too can run on either family; the weight gradient stays
``aten.convolution_backward``'s (the kernels the modules' backward runs). Each direction has a native family, the one
``F.conv2d`` and its autograd run: fprop for the forward, dgrad for the input gradient.

Why: in session 14's profile of the training step on an H100
(bench/results/nvidia-h100-80gb-hbm3.profile_train_b128.txt), cuDNN in benchmark mode ran the release network's 5x5
128 -> 128 forward on an sm80-generation CUTLASS kernel at about 480 TFLOP/s (2.0 ms at batch 128), while the 3x3
forward and both 5x5 and 3x3 backward passes ran on sm90 kernels at about 730. Which family is faster for a shape is a
property of cuDNN's kernels, not of the sum, so ``via="auto"`` measures it: the first call of a configuration on a GPU
(shapes, dtype, layout, dilation, bias, cuDNN flags) times both families for the forward and, where x needs a
gradient, for the input gradient (CUDA events, interleaved, the median of TUNE_RUNS after a warm-up call that lets
cuDNN's own benchmark mode choose its algorithm), and from then on runs the faster, leaving a direction's native
family only where the other is at least TUNE_MARGIN faster. ``same_conv2d_choices()`` lists what was chosen and the
times. Measured on an H100 (session 27, batch 128 bf16 channels_last): the 5x5 128 -> 128 forward took 1.35 ms on
dgrad against 2.34 on fprop, and the training step went from 91.3 to 87.8 ms.

On the CPU "auto" is each direction's native family unless ``tune_same_conv2d`` recorded another choice: there
(oneDNN, this project's 2-core Zen 4) the two took the same time at the network's 128-channel shapes, and for the
1-channel first layer the faster one depends on the image's strides (bench/bench_same_conv2d.py; the Detector's
contiguous images favour fprop), while a measurement would cost seconds at the larger shapes. Under torch.compile,
CUDA graph capture or tracing, "auto" takes a recorded choice or the native family (nothing can be timed there).
LGC_FAST_BACKEND=ref makes "auto" ``F.conv2d``.

The other family's filter is made in the weight's layout, so both give the output F.conv2d would, in its layout.

Where both directions take their native family, ``same_conv2d`` is ``F.conv2d`` itself (autocast and autograd as for
nn.Conv2d, one backward call for both gradients); otherwise an autograd function casts x, the weight and the bias to
autocast's dtype where autocast is on, as the convolution would.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F

from lgc_fast._backend import ENV_VAR
from lgc_fast.ops._checks import check_maps
from lgc_fast.ops.layout import conv_dtype, is_channels_last

VIAS = ("fprop", "dgrad")
NATIVE = ("fprop", "dgrad")  # F.conv2d's families: (forward, input gradient)
TUNE_RUNS = 5
TUNE_MARGIN = 0.03  # a direction's other family must be this much faster: a flip by timing noise gains nothing

# Shared by all threads (a dict update is atomic under the GIL): a direction's configuration -> (via, fprop ms,
# dgrad ms), and a call's configuration -> (forward via, input gradient via)
_choices: dict[tuple, tuple[str, float, float]] = {}
_pairs: dict[tuple, tuple[str, str]] = {}


def same_conv2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    dilation: int = 1) -> torch.Tensor:
    """x: (N, C, H, W), weight: (O, C, k, k) with k odd, bias: (O,) or None -> (N, O, H, W):
    ``F.conv2d(x, weight, bias, padding=dilation * (k // 2), dilation=dilation)``."""
    return F.conv2d(x, weight, bias, padding=dilation * (weight.shape[-1] // 2), dilation=dilation)


def _filter_format(weight: torch.Tensor) -> torch.memory_format:
    """The weight's layout by its strides: channels_last where the channel stride is 1 and the column stride C (a
    (O, 1, k, k) filter is contiguous in both senses, and torch picks the convolution's output layout by strides)."""
    if weight.stride(1) == 1 and weight.stride(3) == weight.shape[1] and weight.shape[1] * weight.shape[3] > 1:
        return torch.channels_last
    return torch.contiguous_format


def transposed_filter(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, k, k) -> (C, O, k, k), flipped, in the weight's layout (so the other family's output has the layout
    F.conv2d's would): conv_transpose2d(x, transposed_filter(W)) = conv2d(x, W) at stride 1, and conv2d(dy,
    transposed_filter(W)) is x's gradient."""
    return weight.transpose(0, 1).flip(2, 3).contiguous(memory_format=_filter_format(weight))


def _correlate(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int, via: str,
               transposed: bool = False) -> torch.Tensor:
    """conv2d(x, W, bias) with same padding by `via`'s kernels, where W is `weight`, or ``transposed_filter(weight)``
    with `transposed` (the input gradient's filter; transposing twice is the identity, so neither form copies twice)."""
    padding = dilation * (weight.shape[-1] // 2)
    if via == "fprop":
        filt = transposed_filter(weight) if transposed else weight
        return F.conv2d(x, filt, bias, padding=padding, dilation=dilation)
    filt = weight if transposed else transposed_filter(weight)
    return F.conv_transpose2d(x, filt, bias, padding=padding, dilation=dilation)


class _SameConv(torch.autograd.Function):
    """y = conv2d(x, weight, bias) with same padding; the forward by `via_forward`'s kernels, x's gradient by
    `via_input`'s, the weight's and bias's by ``aten.convolution_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, dilation, via_forward, via_input):
        ctx.save_for_backward(x, weight)
        ctx.config = (dilation, via_input, bias is not None)
        return _correlate(x, weight, bias, dilation, via_forward)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dilation, via_input, has_bias = ctx.config
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _correlate(grad, weight, None, dilation, via_input, transposed=True)
        want_w, want_b = ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]
        if want_w or want_b:
            padding = dilation * (weight.shape[-1] // 2)
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if has_bias else None, [1, 1], [padding, padding],
                [dilation, dilation], False, [0, 0], 1, [False, want_w, want_b])
        return grad_x, grad_w, grad_b, None, None, None


def _output_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    """(N, O, H, W): the output's shape, and the output gradient's, which x's gradient convolves."""
    return (x.shape[0], weight.shape[0]) + tuple(x.shape[2:])


def _key(x_shape, weight: torch.Tensor, dtype: torch.dtype, dilation: int, has_bias: bool, channels_last: bool,
         transposed: bool, device: torch.device) -> tuple:
    """What a choice depends on: the sum's shapes and dtype, the layout, and the cuDNN settings that change which
    kernels run. For the input gradient (`transposed`) x_shape is the output gradient's and the filter is the
    transposed one."""
    cudnn = torch.backends.cudnn
    tf32 = dtype == torch.float32 and cudnn.allow_tf32
    return (str(device), dtype, tuple(x_shape), tuple(weight.shape), dilation, has_bias, channels_last, transposed,
            tf32, cudnn.benchmark, cudnn.deterministic)


def _timer(device: torch.device):
    """A function that runs `fn` once and returns its time in ms: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
             transposed: bool) -> tuple[str, float, float]:
    """Times _correlate by both families on these tensors: one warm-up call each, then TUNE_RUNS rounds of one call
    each; returns (the family to run: the direction's native one unless the other is TUNE_MARGIN faster, fprop's
    median ms, dgrad's median ms)."""
    run = _timer(x.device)
    calls = {via: (lambda via=via: _correlate(x, weight, bias, dilation, via, transposed)) for via in VIAS}
    times: dict[str, list[float]] = {via: [] for via in VIAS}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(TUNE_RUNS):
            for via, call in calls.items():
                times[via].append(run(call))
    median = {via: statistics.median(times[via]) for via in VIAS}
    native = NATIVE[int(transposed)]  # torch 2.11's dynamo refuses a bool index
    other = "fprop" if native == "dgrad" else "dgrad"
    choice = other if median[other] < (1.0 - TUNE_MARGIN) * median[native] else native
    return choice, median["fprop"], median["dgrad"]


def _transient() -> bool:
    """Whether nothing can be timed now, and what "auto" takes now must not be kept: compilation, tracing, capture."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _choose(x: torch.Tensor, x_shape, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
            dtype: torch.dtype, transposed: bool, transient: bool) -> str:
    """"auto"'s family for one direction: the recorded choice, else a new measurement where one can be taken (a GPU,
    outside compilation and capture), else the direction's native family."""
    key = _key(x_shape, weight, dtype, dilation, bias is not None, is_channels_last(x), transposed, x.device)
    choice = _choices.get(key)
    if choice is None:
        if transient or x.device.type != "cuda":
            return NATIVE[int(transposed)]
        choice = _tune(key, x, x_shape, weight, bias, dilation, dtype, transposed)
    return choice[0]


def _auto(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int) -> tuple[str, str]:
    """"auto"'s families (forward, input gradient) for this call. Kept per call configuration, so that a call costs
    one dict lookup once its directions are settled (the model makes about 20 a step)."""
    dtype = conv_dtype(x)
    needs_input_grad = torch.is_grad_enabled() and x.requires_grad
    cudnn = torch.backends.cudnn
    key = (x.device, dtype, x.shape, weight.shape, dilation, bias is not None, is_channels_last(x), needs_input_grad,
           cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    pair = _pairs.get(key)
    if pair is None:
        transient = _transient()
        pair = (_choose(x, x.shape, weight, bias, dilation, dtype, False, transient),
                _choose(x, _output_shape(x, weight), weight, None, dilation, dtype, True, transient)
                if needs_input_grad else NATIVE[1])
        if not transient:
            _pairs[key] = pair
    return pair


def _tune(key: tuple, x: torch.Tensor, x_shape, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int,
          dtype: torch.dtype, transposed: bool) -> tuple[str, float, float]:
    """Measures one direction on tensors of its shapes in `dtype` and x's layout, and records the result."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    with torch.no_grad():
        if transposed:  # the output gradient's shape; values do not change which kernel runs
            operand = torch.randn(x_shape, dtype=dtype, device=x.device).contiguous(memory_format=fmt)
        else:
            operand = x.to(dtype)
        choice = _measure(operand, weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype),
                          dilation, transposed)
    _choices[key] = choice
    _pairs.clear()  # a call configuration settled before may take this direction
    return choice


def _reference_requested() -> bool:
    """LGC_FAST_BACKEND=ref; not read while compiling (torch 2.4's dynamo fails on the lookup of an unset variable),
    where "auto" takes a recorded choice or the native family."""
    return not torch.compiler.is_compiling() and os.environ.get(ENV_VAR) == "ref"


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int, via: str) -> None:
    check_maps(x, "x")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3] or \
            weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must have shape (O, {x.shape[1]}, k, k) with k odd, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if via not in ("auto",) + VIAS:
        raise ValueError(f"via must be one of auto, {', '.join(VIAS)}, not {via!r}")


def same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, dilation: int = 1,
                via: str = "auto") -> torch.Tensor:
    """x: (N, C, H, W), weight: (O, C, k, k) with k odd, bias: (O,) or None -> (N, O, H, W): the convolution with
    stride 1 and zero padding dilation * (k // 2), equal to ``same_conv2d_ref`` up to rounding order.

    via: "fprop" (``F.conv2d``: fprop forward, dgrad input gradient), "dgrad" (the transposed convolution's kernels
    for the forward and the input gradient), or "auto": per direction and configuration the faster of the two as
    measured on the GPU at its first call (see the module's text). Differentiable (x, weight, bias); autocast
    applies as to ``F.conv2d``.
    """
    _check(x, weight, bias, dilation, via)
    if via == "auto":
        via_forward, via_input = NATIVE if _reference_requested() else _auto(x, weight, bias, dilation)
    else:
        via_forward, via_input = NATIVE if via == "fprop" else ("dgrad", "dgrad")
    if (via_forward, via_input) == NATIVE:
        return same_conv2d_ref(x, weight, bias, dilation)
    dtype = conv_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return _SameConv.apply(x, weight, bias, dilation, via_forward, via_input)


def tune_same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dilation: int = 1, input_grad: bool = True) -> dict[str, str]:
    """Measures both kernel families for x's configuration now, on any device (on the CPU with the wall clock), and
    records the choices that ``same_conv2d(via="auto")`` then takes: for the forward and, with `input_grad`, for x's
    gradient. Returns {"forward": via, "input_grad": via}."""
    _check(x, weight, bias, dilation, "auto")
    dtype = conv_dtype(x)
    result = {}
    directions = [("forward", x.shape, bias, False)]
    if input_grad:
        directions.append(("input_grad", _output_shape(x, weight), None, True))
    for name, shape, b, transposed in directions:
        key = _key(shape, weight, dtype, dilation, b is not None, is_channels_last(x), transposed, x.device)
        result[name] = _tune(key, x, shape, weight, b, dilation, dtype, transposed)[0]
    return result


def same_conv2d_choices() -> list[dict]:
    """What ``via="auto"`` chose so far: one row per configuration and direction, with both families' median ms."""
    rows = []
    for key, (via, fprop_ms, dgrad_ms) in _choices.items():
        device, dtype, x_shape, w_shape, dilation, has_bias, channels_last, transposed = key[:8]
        rows.append({"device": device, "direction": "input_grad" if transposed else "forward",
                     "input": list(x_shape), "weight": list(w_shape), "dilation": dilation,
                     "dtype": str(dtype).replace("torch.", ""), "channels_last": channels_last, "bias": has_bias,
                     "via": via, "fprop_ms": fprop_ms, "dgrad_ms": dgrad_ms})
    return rows


def clear_same_conv2d_choices() -> None:
    """Forgets every recorded choice (the next "auto" call of each configuration measures again)."""
    _choices.clear()
    _pairs.clear()
