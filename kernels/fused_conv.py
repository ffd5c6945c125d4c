"""Triton implicit-GEMM convolution on tensor-memory (TMA) tile loads, with conv_stack's forward fusions: the
previous block's BatchNorm-apply + ReLU + dropout applied to the input tile as it is loaded (prologue) and the
per-channel sum and sum of squares of the output (epilogue), so neither the activation nor a statistics pass touches
memory.

GEMM view: M = output pixels, N = Cout, K = taps x Cin. A program computes the (BH x BW pixels of one image) x (BN
channels) tile of z. For tap (kh, kw) its A tile is the (1, BH, BW, BK) box of the channels_last input at (image,
h0 + kh*d - pad, w0 + kw*d - pad, k0): the descriptor zero-fills what lies outside the image or past Cin, so a
shifted tap needs no index arithmetic and no masks; the B tile is the (1, BK, BN) box of the packed filter (taps, Cin,
Cout) at (tap, k0, n0), zero past Cin too. One flat loop over (tap, Cin chunk) lets Triton pipeline the loads across
taps.

Prologue (PROLOGUE): a = relu(x * s[k] + b[k]) * keep in float32 (float64), rounded to x's dtype before the product,
and 0 where the tap reads padding (relu(0 * s + b) is not 0, and the padding is the activation's, not x's). keep is
bit e % 8 of byte e // 8 of keep_ptr, e the value's offset in x's channels_last order (``pack_keep_mask``); where Cin
is a multiple of BK, a pixel's flags of one chunk are one little-endian BK-bit word, loaded at once (KEEP_WORDS).

Epilogue: z stored by descriptor (clipped to the image); with STATS each program writes the sums over its pixels of
z and z * z, as stored (rounded to z's dtype), to row pid_m of the partial-sum buffers (float32, float64 for float64),
which the host adds up in float64: no atomics, the same sums on every run.
"""
import functools

import torch
import triton
import triton.language as tl

from lgc_fast.kernels.dilated_conv import SHARED_MEMORY_LIMIT, input_precision

try:  # host-side tensor descriptors: Triton 3.4 on
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

_INTERPRET_TILE = dict(BH=8, BW=8, BN=32, BK=32)  # the interpreter's tile (upper bounds)
_STATS_ROWS_PIXELS = (8, 8)  # the smallest (BH, BW) of any config: sizes the partial-sum buffers


@triton.jit
def _keep_word(keep_ptr, index, mask, BITS: tl.constexpr):
    """Word `index` of BITS bits (16, 32 or 64) of the keep bits, 0 where not mask."""
    if BITS == 64:
        word_ptr = keep_ptr.to(tl.pointer_type(tl.uint64))
    elif BITS == 32:
        word_ptr = keep_ptr.to(tl.pointer_type(tl.uint32))
    else:
        word_ptr = keep_ptr.to(tl.pointer_type(tl.uint16))
    return tl.load(word_ptr + index, mask=mask, other=0)


@triton.jit
def fused_conv_fprop_kernel(
    x_desc, w_desc, z_desc, s_ptr, b_ptr, keep_ptr, sum_ptr, sq_ptr,
    height, width, c_in, c_out,
    KSIZE: tl.constexpr, DILATION: tl.constexpr, PROLOGUE: tl.constexpr, HAS_KEEP: tl.constexpr,
    STATS: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    USE_INT64: tl.constexpr, KEEP_WORDS: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    BM: tl.constexpr = BH * BW
    # Channel tiles of one pixel tile are neighbours in launch order, so they reuse its input boxes from L2.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(c_out, BN)
    pid_m = pid // n_tiles_n
    n0 = (pid % n_tiles_n) * BN
    tiles_w = tl.cdiv(width, BW)
    tiles_img = tl.cdiv(height, BH) * tiles_w
    img = pid_m // tiles_img
    h0 = (pid_m % tiles_img) // tiles_w * BH
    w0 = (pid_m % tiles_img) % tiles_w * BW
    rows = tl.arange(0, BM)
    row_h = rows // BW
    row_w = rows % BW
    pad = DILATION * (KSIZE // 2)
    dot_dtype = x_desc.dtype
    if ACC_FP64:
        acc = tl.zeros((BM, BN), dtype=tl.float64)
        ct = tl.float64
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        ct = tl.float32

    k_chunks = tl.cdiv(c_in, BK)
    for it in range(0, KSIZE * KSIZE * k_chunks):
        tap = it // k_chunks
        k0 = (it % k_chunks) * BK
        dh = (tap // KSIZE) * DILATION - pad
        dw = (tap % KSIZE) * DILATION - pad
        a = tl.reshape(x_desc.load([img, h0 + dh, w0 + dw, k0]), (BM, BK))
        if PROLOGUE:
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < c_in
            s = tl.load(s_ptr + offs_k, mask=k_ok, other=0.0)
            b = tl.load(b_ptr + offs_k, mask=k_ok, other=0.0)
            ih = h0 + dh + row_h
            iw = w0 + dw + row_w
            inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            v = tl.maximum(a.to(ct) * s[None, :] + b[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
            if HAS_KEEP:
                pix = (img * height + ih) * width + iw
                if USE_INT64:
                    pix = pix.to(tl.int64)
                if KEEP_WORDS:
                    # a pixel's BK flags of this chunk are one BK-bit word: one load a row, not one a value
                    word = _keep_word(keep_ptr, pix * (c_in // BK) + k0 // BK, inside, BK)
                    flag = (word[:, None] >> tl.arange(0, BK)[None, :].to(word.dtype)) & 1
                else:
                    e = pix[:, None] * c_in + offs_k[None, :]
                    byte = tl.load(keep_ptr + (e >> 3), mask=inside[:, None] & k_ok[None, :], other=0)
                    flag = (byte >> (e & 7).to(tl.uint8)) & 1
                v = v * flag.to(ct)  # a product, so a dropped NaN stays NaN
            a = tl.where(inside[:, None] & k_ok[None, :], v, 0.0).to(dot_dtype)
        wt = tl.reshape(w_desc.load([tap, k0, n0]), (BK, BN))
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    z = acc.to(z_desc.dtype)
    z_desc.store([img, h0, w0, n0], tl.reshape(z, (1, BH, BW, BN)))
    if STATS:
        valid = ((h0 + row_h) < height) & ((w0 + row_w) < width)
        zs = tl.where(valid[:, None], z.to(ct), 0.0)
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < c_out
        row = pid_m.to(tl.int64) * c_out
        tl.store(sum_ptr + row + offs_n, tl.sum(zs, axis=0), mask=n_ok)
        tl.store(sq_ptr + row + offs_n, tl.sum(zs * zs, axis=0), mask=n_ok)


def _set_block_shapes(nargs):
    """Autotuner pre-hook: each config's tile is also the descriptors' box."""
    bh, bw, bn, bk = nargs["BH"], nargs["BW"], nargs["BN"], nargs["BK"]
    nargs["x_desc"].block_shape = [1, bh, bw, bk]
    nargs["w_desc"].block_shape = [1, bk, bn]
    nargs["z_desc"].block_shape = [1, bh, bw, bn]


def gpu_configs():
    """(BH, BW, BN, warps, stages) tiles: 128 and 256 pixels for wgmma's 64-row granules; each with BK = 64, 32 and
    16, of which ``prune_configs`` keeps the one whose rows are 128 bytes (the widest TMA swizzle) for the dtype."""
    shapes = [(8, 16, 128, 8, 3), (8, 16, 128, 4, 4), (16, 16, 128, 8, 3), (8, 16, 64, 4, 4), (16, 16, 64, 8, 4),
              (8, 8, 128, 4, 4), (8, 16, 128, 8, 5)]
    return [triton.Config(dict(BH=h, BW=w, BN=n, BK=k), num_warps=warps, num_stages=stages,
                          pre_hook=_set_block_shapes) for h, w, n, warps, stages in shapes for k in (64, 32, 16)]


def shared_bytes_bound(config, element_size: int) -> int:
    """num_stages buffers of the A (BH*BW x BK) and B (BK x BN) boxes, plus the output box the store stages."""
    bh, bw, bn, bk = (config.kwargs[name] for name in ("BH", "BW", "BN", "BK"))
    return (config.num_stages * (bh * bw * bk + bk * bn) + bh * bw * bn) * element_size


def prune_configs(configs, named_args, **_):
    """The autotuner's pruning: ``kept_configs`` for the launch's Cout and dtype."""
    return kept_configs(configs, named_args["c_out"], named_args["x_desc"].base.element_size())


def kept_configs(configs, c_out: int, element_size: int):
    """128-byte input rows; channel tiles far wider than Cout only add masked work; tiles over the shared memory
    fail at launch (keep the smallest where none fits)."""
    rows = [c for c in configs if c.kwargs["BK"] * element_size == 128]
    kept = [c for c in rows if c.kwargs["BN"] <= max(64, triton.next_power_of_2(c_out))
            and shared_bytes_bound(c, element_size) <= SHARED_MEMORY_LIMIT]
    return kept or [min(rows, key=lambda c: shared_bytes_bound(c, element_size))]


@functools.cache
def _gpu_kernel():
    """The autotuned kernel, made at the first CUDA launch; the partial sums are zeroed before each config's trial."""
    return triton.autotune(configs=gpu_configs(), key=["height", "width", "c_in", "c_out", "PROLOGUE", "HAS_KEEP",
                                                        "STATS"],
                           prune_configs_by={"early_config_prune": prune_configs},
                           reset_to_zero=["sum_ptr", "sq_ptr"])(fused_conv_fprop_kernel)


def signature_types(element: str, acc: str, config) -> dict:
    """The Triton types of the kernel's non-constexpr arguments at `config`'s tile (what a launch specialises to, for
    compiling without one): element the maps' type ("bf16", ...), acc the compute type ("fp32" or "fp64")."""
    bh, bw, bn, bk = (config.kwargs[name] for name in ("BH", "BW", "BN", "BK"))
    return {"x_desc": f"tensordesc<{element}[1, {bh}, {bw}, {bk}]>", "w_desc": f"tensordesc<{element}[1, {bk}, {bn}]>",
            "z_desc": f"tensordesc<{element}[1, {bh}, {bw}, {bn}]>", "s_ptr": f"*{acc}", "b_ptr": f"*{acc}",
            "keep_ptr": "*u8", "sum_ptr": f"*{acc}", "sq_ptr": f"*{acc}", "height": "i32", "width": "i32",
            "c_in": "i32", "c_out": "i32"}


def _interpret_tile(c_in: int, c_out: int) -> dict:
    lim = _INTERPRET_TILE
    return dict(BH=lim["BH"], BW=lim["BW"], BN=min(max(16, triton.next_power_of_2(c_out)), lim["BN"]),
                BK=min(max(16, triton.next_power_of_2(c_in)), lim["BK"]))


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last -> its (N, H, W, C) contiguous view (no copy)."""
    return t.permute(0, 2, 3, 1)


def stats_rows(n: int, height: int, width: int) -> int:
    """Rows of the partial-sum buffers: one per pixel tile of the smallest tile any config uses."""
    bh, bw = _STATS_ROWS_PIXELS
    return n * triton.cdiv(height, bh) * triton.cdiv(width, bw)


def fused_conv_fprop_triton(x, weight, dilation: int, scale, shift, keep_bits, z, partial_sum, partial_sq):
    """Write conv(prologue(x), weight) into z and, where partial_sum is given, the per-tile sums of z and z * z into
    partial_sum / partial_sq (zeros on entry).

    x: (N, Cin, H, W) channels_last, float32/float16/bfloat16/float64; weight: (Cout, Cin, r, r), x's dtype, r odd;
    scale, shift: (Cin,) in the compute dtype, or both None (no prologue); keep_bits: uint8 ((N*Cin*H*W + 7) // 8,)
    or None; z: (N, Cout, H, W) channels_last, x's dtype; partial_sum, partial_sq: (stats_rows(N, H, W), Cout) in the
    compute dtype, or both None.
    """
    n, c_in, h, w = x.shape
    c_out, ksize = weight.shape[0], weight.shape[-1]
    w_packed = weight.permute(2, 3, 1, 0).reshape(ksize * ksize, c_in, c_out).contiguous()
    cuda = x.device.type == "cuda"
    tile = None if cuda else _interpret_tile(c_in, c_out)
    box = tile or dict(BH=8, BW=8, BN=16, BK=16)  # the autotuner's pre-hook sets each config's own on CUDA
    x_desc = TensorDescriptor.from_tensor(_nhwc(x), [1, box["BH"], box["BW"], box["BK"]])
    w_desc = TensorDescriptor.from_tensor(w_packed, [1, box["BK"], box["BN"]])
    z_desc = TensorDescriptor.from_tensor(_nhwc(z), [1, box["BH"], box["BW"], box["BN"]])
    prologue = scale is not None
    stats = partial_sum is not None
    # BK: on CUDA every config the autotuner keeps loads 128-byte rows
    chunk = tile["BK"] if tile else 128 // x.element_size()
    acc_fp64 = x.dtype == torch.float64
    filler = partial_sum if stats else torch.zeros(1, dtype=torch.float64 if acc_fp64 else torch.float32,
                                                    device=x.device)  # for the unused pointers
    args = (x_desc, w_desc, z_desc, scale if prologue else filler, shift if prologue else filler,
            keep_bits if keep_bits is not None else filler,
            partial_sum if stats else filler, partial_sq if stats else filler, h, w, c_in, c_out)
    flags = dict(KSIZE=ksize, DILATION=dilation, PROLOGUE=prologue, HAS_KEEP=keep_bits is not None, STATS=stats,
                 ACC_FP64=acc_fp64, INPUT_PRECISION=input_precision(x.dtype, x.device),
                 # Triton 3.9's interpreter multiplies bfloat16 dot operands as raw integer bit patterns; bfloat16
                 # products are exact in float32, so upcasting there computes the same sums.
                 DOT_IN_FP32=not cuda and x.dtype == torch.bfloat16,
                 USE_INT64=n * c_in * h * w >= 2**31,
                 KEEP_WORDS=keep_bits is not None and c_in % chunk == 0 and keep_bits.data_ptr() % (chunk // 8) == 0)

    def grid(meta):
        return (n * triton.cdiv(h, meta["BH"]) * triton.cdiv(w, meta["BW"]) * triton.cdiv(c_out, meta["BN"]),)

    if cuda:
        with torch.cuda.device(x.device):
            _gpu_kernel()[grid](*args, **flags)
    else:
        fused_conv_fprop_kernel[grid(tile)](*args, **flags, **tile)
    return z
