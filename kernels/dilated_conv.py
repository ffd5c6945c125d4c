"""Triton implicit-GEMM 3x3 dilated convolution with a fused BatchNorm-apply / ReLU / dropout / scale epilogue.

GEMM view: M = N*H*W output pixels, N = Cout, K = 9 taps x Cin. A program computes a (BLOCK_M pixels x BLOCK_N
channels) tile; one flat loop over (tap, Cin chunk) lets Triton software-pipeline the loads across tap boundaries.
For tap (kh, kw) the A tile is the input at (h + (kh-1)*d, w + (kw-1)*d), zero outside the image (masked load), and
the B tile is the packed weight rows tap*Cin .. tap*Cin + BLOCK_K. Channels_last input makes A rows contiguous in
Cin; any strides work. Accumulation is float32 (float64 for float64 inputs); on CUDA, float32 inputs use TF32
exactly when ``torch.backends.cudnn.allow_tf32`` allows it for cuDNN convolutions.

Epilogue (EPILOGUE=True): y = relu(acc * scale[c] + shift[c]) * out_scale * keep[n, c, h, w] (keep only when
HAS_MASK). The host folds out_scale into scale and shift, so the kernel computes v = acc * scale' + shift' and
max(v, 0) for out_scale >= 0 or min(v, 0) for out_scale < 0: one fused multiply-add and one clamp per element.
Without the epilogue y = acc (the plain convolution).
"""
import functools

import torch
import triton
import triton.language as tl

_INTERPRET_CONFIG_LIMITS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
_INT32_MAX = 2**31 - 1
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (H100/H200)


@triton.jit
def dilated_conv_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, keep_ptr, y_ptr,
    n_pix, height, width, c_in, c_out,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    sk_n, sk_c, sk_h, sk_w,
    DILATION: tl.constexpr, EPILOGUE: tl.constexpr, CLAMP_ABOVE: tl.constexpr, HAS_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    USE_INT64: tl.constexpr, VEC: tl.constexpr, OUT_VEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Channel tiles of one pixel tile are neighbours in launch order, so they reuse its input rows from L2.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(c_out, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < n_pix
    n_ok = offs_n < c_out
    # Both widths imply Cout % width == 0; when both are set they are equal (same dtype).
    if VEC > 1:
        n_ok = tl.max_constancy(n_ok, VEC)
    elif OUT_VEC > 1:
        n_ok = tl.max_constancy(n_ok, OUT_VEC)
    plane = height * width
    img = offs_m // plane
    rem = offs_m % plane
    oh = rem // width
    ow = rem % width
    img_off = img * sx_n

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_chunks = tl.cdiv(c_in, BLOCK_K)
    for it in range(0, 9 * k_chunks):
        tap = it // k_chunks
        k0 = (it % k_chunks) * BLOCK_K
        ih = oh + (tap // 3 - 1) * DILATION
        iw = ow + (tap % 3 - 1) * DILATION
        pix_ok = m_ok & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < c_in
        a_row = img_off + ih * sx_h + iw * sx_w
        b_row = (tap * c_in + offs_k) * c_out
        if VEC > 1:
            a_row = tl.multiple_of(a_row, VEC)
            b_row = tl.multiple_of(b_row, VEC)
            k_ok = tl.max_constancy(k_ok, VEC)
        a_ptrs = x_ptr + a_row[:, None] + offs_k[None, :] * sx_c
        a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = w_ptr + b_row[:, None] + offs_n[None, :]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)  # float64 acc on Triton 3.6

    out_ok = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE:
        sc = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
        sh = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)
        v = acc * sc[None, :] + sh[None, :]
        # NaN propagates as in torch.relu, so a NaN input is never turned into a silent 0.
        if CLAMP_ABOVE:
            acc = tl.minimum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc = tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if HAS_MASK:
            k_ptrs = keep_ptr + (img * sk_n + oh * sk_h + ow * sk_w)[:, None] + offs_n[None, :] * sk_c
            keep = tl.load(k_ptrs, mask=out_ok, other=0)
            acc = acc * (keep != 0).to(acc.dtype)
    y_row = img * sy_n + oh * sy_h + ow * sy_w
    if OUT_VEC > 1:
        y_row = tl.multiple_of(y_row, OUT_VEC)
    y_ptrs = y_ptr + y_row[:, None] + offs_n[None, :] * sy_c
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def gpu_configs():
    shapes = [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 3), (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4), (256, 64, 32, 8, 3), (128, 32, 32, 4, 4), (64, 64, 32, 4, 4),
    ]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


def shared_bytes_bound(config, element_size: int) -> int:
    """An upper bound of the shared memory of `config`: num_stages buffers of the A (BLOCK_M x BLOCK_K) and B
    (BLOCK_K x BLOCK_N) tiles. Triton's sm_90 pipeliner stays within it (compiled sizes: tests/sm90_compile.py)."""
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (m * k + k * n) * element_size


def prune_configs(configs, named_args, **_):
    """Tiles far wider than the channel counts only add masked work, and float64's largest tiles exceed the shared
    memory (the autotuner would compile them only to fail at launch); keep at least one config."""
    c_in, c_out = named_args["c_in"], named_args["c_out"]
    element_size = named_args["x_ptr"].element_size()
    kept = [c for c in configs
            if c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(c_out))
            and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(c_in))
            and shared_bytes_bound(c, element_size) <= SHARED_MEMORY_LIMIT]
    return kept or [min(configs, key=lambda c: shared_bytes_bound(c, element_size))]


@functools.cache
def _gpu_kernel():
    """The autotuned kernel, made at the first CUDA launch (its configs' timings are kept per key)."""
    return triton.autotune(configs=gpu_configs(), key=["n_pix", "c_in", "c_out", "EPILOGUE", "HAS_MASK"],
                           prune_configs_by={"early_config_prune": prune_configs})(dilated_conv_kernel)


def _interpret_config(c_in: int, c_out: int) -> dict:
    lim = _INTERPRET_CONFIG_LIMITS
    return dict(
        BLOCK_M=lim["BLOCK_M"],
        BLOCK_N=min(max(16, triton.next_power_of_2(c_out)), lim["BLOCK_N"]),
        BLOCK_K=min(max(16, triton.next_power_of_2(c_in)), lim["BLOCK_K"]),
    )


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's precision: TF32 for float32 on CUDA exactly where cuDNN's convolutions use it, else full."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _vector_width(t: torch.Tensor, *channel_counts: int) -> int:
    """Elements per 16-byte access when t's channels are innermost, every pixel row starts 16-byte aligned and the
    channel counts are multiples of it (channels_last with Cin, Cout multiples of 8 for 16-bit types), else 1. The
    kernel turns it into alignment and constancy hints: without them Triton cannot prove that rows of Cin = 136
    are aligned and falls back to scalar loads that cp.async cannot pipeline."""
    vec = 16 // t.element_size()
    ok = (t.stride(1) == 1 and all(c % vec == 0 for c in channel_counts)
          and all(s % vec == 0 for s in (t.stride(0), t.stride(2), t.stride(3))) and t.data_ptr() % 16 == 0)
    return vec if ok else 1


def _max_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def dilated_conv_triton(x, weight, scale, shift, keep_mask, out_scale: float, dilation: int, out: torch.Tensor):
    """Write conv(x, weight) (dilation `dilation`, zero padding `dilation`) into `out`, with the epilogue if `scale`
    is given.

    x: (N, Cin, H, W) float32/float16/bfloat16/float64, any strides; weight: (Cout, Cin, 3, 3), x's dtype;
    scale, shift: (Cout,) or both None (plain convolution); keep_mask: (N, Cout, H, W) bool/uint8 or None;
    out: (N, Cout, H, W), any float dtype and strides. Returns out.
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if x.device.type == "cuda" and x.stride(1) != 1 and c_in > 1:
        # Channel-innermost rows turn the A loads into 16-byte vectors; one copy of x is cheaper than strided loads.
        x = x.contiguous(memory_format=torch.channels_last)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # (Cout, Cin, 3, 3) -> (9*Cin, Cout): row tap*Cin + ci holds the weights of tap (kh, kw) = divmod(tap, 3).
    w_packed = weight.permute(2, 3, 1, 0).reshape(9 * c_in, c_out).contiguous()
    epilogue = scale is not None
    if epilogue:
        # relu(u) * c == max(u * c, 0) for c >= 0 and min(u * c, 0) for c < 0.
        scale = (scale.to(acc_dtype) * out_scale).contiguous()
        shift = (shift.to(acc_dtype) * out_scale).contiguous()
    else:
        scale = shift = w_packed
    has_mask = keep_mask is not None
    if has_mask:
        keep = keep_mask.view(torch.uint8) if keep_mask.dtype == torch.bool else keep_mask
    else:
        keep = out
    n_pix = n * h * w
    use_int64 = max(_max_offset(x), _max_offset(out), _max_offset(keep), n_pix) > _INT32_MAX
    args = (
        x, w_packed, scale, shift, keep, out,
        n_pix, h, w, c_in, c_out,
        *x.stride(), *out.stride(), *keep.stride(),
    )
    flags = dict(DILATION=dilation, EPILOGUE=epilogue, CLAMP_ABOVE=out_scale < 0, HAS_MASK=has_mask,
                 INPUT_PRECISION=input_precision(x.dtype, x.device), ACC_FP64=x.dtype == torch.float64,
                 USE_INT64=use_int64, VEC=_vector_width(x, c_in, c_out),
                 OUT_VEC=_vector_width(out, c_out) if out.dtype == x.dtype else 1)

    def grid(meta):
        return (triton.cdiv(n_pix, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)

    # Triton 3.9's interpreter multiplies bfloat16 dot operands as raw integer bit patterns; bfloat16 products are
    # exact in float32, so upcasting there computes the same sums.
    flags["DOT_IN_FP32"] = x.device.type != "cuda" and x.dtype == torch.bfloat16
    if x.device.type == "cuda":
        with torch.cuda.device(x.device):
            _gpu_kernel()[grid](*args, **flags)
    else:
        cfg = _interpret_config(c_in, c_out)
        dilated_conv_kernel[grid(cfg)](*args, **flags, **cfg)
    return out
