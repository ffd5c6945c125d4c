"""Triton filter gradient of a convolution with conv_stack's backward fusions: both operands made as they are loaded,
so neither the activation nor the gradient at the convolution's output touches memory:

    a  = relu(x * s + b) * keep                (the previous block's BatchNorm, ReLU and dropout; a = x without)
    dz = eq_dy * g + eq_x * z + eq_b           (this block's BatchNorm backward apply; dz = g without)
    dW[co, ci, kh, kw] = sum over n, h, w of a[n, ci, h + kh*d - pad, w + kw*d - pad] * dz[n, co, h, w]

GEMM view per tap: M = Cin, N = Cout, K = pixels. A program computes the (BM input channels) x (BN output channels)
block of one tap over its share of the pixel tiles (split K): for each (BH x BW) tile the A box is the input map's
(1, BH, BW, BM) box at the tap's shift (the descriptor's zero fill is the padding, masked again after the prologue
since relu(b) is not 0), the B box dz's (1, BH, BW, BN). The taps of one channel block and split are neighbours in
launch order, so they read the same pixels from L2 at about the same time. Each program writes its partial block to
row `split` of a float32 (float64) buffer, which the host adds up in float64: no atomics, the same sums every run.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from lgc_fast.kernels.dilated_conv import SHARED_MEMORY_LIMIT, input_precision
from lgc_fast.kernels.fused_conv import (TensorDescriptor, add_partials, bn_activation, dbn_gradient, launch_tile,
                                        nhwc, pixel_index, tuned, whole_chunks, word_keep_bits)

_INTERPRET_TILE = dict(BH=8, BW=8, BM=32, BN=32)  # the interpreter's tile (upper bounds)
_WAVES = 4  # programs to aim at, in waves over the SMs; the splits of K follow from it
_INTERPRET_SMS = 132  # an H100's, for the interpreter's splits


@triton.jit
def fused_conv_wgrad_kernel(
    x_desc, g_desc, z_desc, dw_ptr, s_ptr, b_ptr, keep_ptr, eq_dy_ptr, eq_x_ptr, eq_b_ptr,
    n_img, height, width, c_in, c_out,
    KSIZE: tl.constexpr, DILATION: tl.constexpr, PROLOGUE: tl.constexpr, HAS_KEEP: tl.constexpr,
    DBN: tl.constexpr, WHOLE_M: tl.constexpr, WHOLE_N: tl.constexpr, ACC_FP64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, USE_INT64: tl.constexpr,
    BH: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    BK: tl.constexpr = BH * BW
    taps: tl.constexpr = KSIZE * KSIZE
    pid = tl.program_id(0)
    tap = pid % taps
    blocks_n = tl.cdiv(c_out, BN)
    m0 = (pid // taps) // blocks_n * BM
    n0 = (pid // taps) % blocks_n * BN
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    pad = DILATION * (KSIZE // 2)
    dh = (tap // KSIZE) * DILATION - pad
    dw = (tap % KSIZE) * DILATION - pad
    tiles_w = tl.cdiv(width, BW)
    tiles_img = tl.cdiv(height, BH) * tiles_w
    n_tiles = n_img * tiles_img
    # balanced shares, none empty (the host keeps n_splits <= n_tiles): where the loop may run no iteration, ptxas
    # serialises its wgmmas (C7515: the accumulator's zeros are chosen after the loop)
    first = (split.to(tl.int64) * n_tiles // n_splits).to(tl.int32)
    last = ((split.to(tl.int64) + 1) * n_tiles // n_splits).to(tl.int32)
    tl.assume(last > first)
    rows = tl.arange(0, BK)
    row_h = rows // BW
    row_w = rows % BW
    offs_m = m0 + tl.arange(0, BM)
    offs_n = n0 + tl.arange(0, BN)
    dot_dtype = x_desc.dtype
    ct: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros((BM, BN), dtype=ct)

    for t in range(first, last):
        img = t // tiles_img
        h0 = (t % tiles_img) // tiles_w * BH
        w0 = (t % tiles_img) % tiles_w * BW
        a = tl.reshape(x_desc.load([img, h0 + dh, w0 + dw, m0]), (BK, BM))
        if PROLOGUE:
            ih = h0 + dh + row_h
            iw = w0 + dw + row_w
            inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            pix = pixel_index(img, h0 + dh, w0 + dw, row_h, row_w, height, width, USE_INT64)
            a = bn_activation(a, s_ptr, b_ptr, keep_ptr, pix, offs_m, m0, c_in, inside, ct, HAS_KEEP, BM,
                              WHOLE_M).to(dot_dtype)
        dz = tl.reshape(g_desc.load([img, h0, w0, n0]), (BK, BN))
        if DBN:
            valid = ((h0 + row_h) < height) & ((w0 + row_w) < width)
            z = tl.reshape(z_desc.load([img, h0, w0, n0]), (BK, BN))
            dz = dbn_gradient(dz, z, eq_dy_ptr, eq_x_ptr, eq_b_ptr, offs_n, c_out, valid, ct, WHOLE_N).to(dot_dtype)
        a_t = tl.trans(a)
        if DOT_IN_FP32:
            a_t = a_t.to(tl.float32)
            dz = dz.to(tl.float32)
        acc = tl.dot(a_t, dz, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    # partial block of row `split`: (splits, taps, Cin, Cout)
    base = (split.to(tl.int64) * taps + tap) * c_in * c_out
    mask = (offs_m[:, None] < c_in) & (offs_n[None, :] < c_out)
    tl.store(dw_ptr + base + offs_m[:, None] * c_out + offs_n[None, :], acc, mask=mask)


def _set_block_shapes(nargs):
    """Autotuner pre-hook: each config's tile is also the descriptors' box."""
    bh, bw, bm, bn = nargs["BH"], nargs["BW"], nargs["BM"], nargs["BN"]
    nargs["x_desc"].block_shape = [1, bh, bw, bm]
    nargs["g_desc"].block_shape = [1, bh, bw, bn]
    nargs["z_desc"].block_shape = [1, bh, bw, bn]


def gpu_configs():
    """(BH, BW, BM, BN, warps, stages): 64- and 128-pixel K steps, 128 x 128 and 64 x 128 channel blocks (wgmma's
    M granule is 64; 128-channel M blocks with 8 warps only: with 4, the sm_90 compile report found 128 x 128 blocks
    spilling 656 bytes and 128 x 64 ones 128); 64 x 64 blocks for float32 and float64, whose boxes overflow shared
    memory in the larger ones."""
    shapes = [(8, 8, 128, 128, 8, 3), (8, 16, 128, 128, 8, 3), (8, 8, 64, 128, 4, 4), (8, 16, 64, 128, 4, 3),
              (8, 8, 128, 64, 8, 4), (8, 8, 64, 64, 4, 3), (8, 8, 64, 64, 4, 2)]
    return [triton.Config(dict(BH=h, BW=w, BM=m, BN=n), num_warps=warps, num_stages=stages,
                          pre_hook=_set_block_shapes) for h, w, m, n, warps, stages in shapes]


def shared_bytes_bound(config, element_size: int, dbn: bool = True, prologue: bool = True) -> int:
    """num_stages buffers of the A (BH*BW x BM) box and the B box (BH*BW x BN; two maps with BatchNorm's apply), a
    box for each operand a prologue makes (the MMA reads it from shared memory), and 1 KiB for the pipeline's
    barriers and scratch (Triton 3.6 adds 40 bytes in float64)."""
    bh, bw, bm, bn = (config.kwargs[name] for name in ("BH", "BW", "BM", "BN"))
    made = (bm if prologue else 0) + (bn if dbn else 0)
    return (config.num_stages * (bm + (2 if dbn else 1) * bn) + made) * bh * bw * element_size + 1024


def kept_configs(configs, c_in: int, c_out: int, element_size: int, dbn: bool = True, prologue: bool = True):
    """Channel blocks no wider than needed (64 where Cin or Cout is at most 64) and within the shared memory (keep
    the smallest where none fits)."""
    def shared(c):
        return shared_bytes_bound(c, element_size, dbn, prologue)

    kept = [c for c in configs if c.kwargs["BM"] <= max(64, triton.next_power_of_2(c_in))
            and c.kwargs["BN"] <= max(64, triton.next_power_of_2(c_out)) and shared(c) <= SHARED_MEMORY_LIMIT]
    return kept or [min(configs, key=shared)]


def prune_configs(configs, named_args, **kwargs):
    return tuned(kept_configs(configs, named_args["c_in"], named_args["c_out"],
                              named_args["x_desc"].base.element_size(), kwargs.get("DBN", True),
                              kwargs.get("PROLOGUE", True)))


@functools.cache
def _gpu_kernel():
    """The autotuned kernel, made at the first CUDA launch (every config writes all of its partial rows)."""
    return triton.autotune(configs=gpu_configs(), key=["n_img", "height", "width", "c_in", "c_out", "KSIZE",
                                                        "PROLOGUE", "HAS_KEEP", "DBN"],
                           prune_configs_by={"early_config_prune": prune_configs})(fused_conv_wgrad_kernel)


def signature_types(element: str, acc: str, config) -> dict:
    """The Triton types of the kernel's non-constexpr arguments at `config`'s tile (for compiling without a launch)."""
    bh, bw, bm, bn = (config.kwargs[name] for name in ("BH", "BW", "BM", "BN"))
    out_box = f"tensordesc<{element}[1, {bh}, {bw}, {bn}]>"
    vectors = ("dw_ptr", "s_ptr", "b_ptr", "eq_dy_ptr", "eq_x_ptr", "eq_b_ptr")
    return {"x_desc": f"tensordesc<{element}[1, {bh}, {bw}, {bm}]>", "g_desc": out_box, "z_desc": out_box,
            **{name: f"*{acc}" for name in vectors}, "keep_ptr": "*u8",
            **{name: "i32" for name in ("n_img", "height", "width", "c_in", "c_out")}}


def _interpret_tile(c_in: int, c_out: int) -> dict:
    lim = _INTERPRET_TILE
    return dict(BH=lim["BH"], BW=lim["BW"], BM=min(max(16, triton.next_power_of_2(c_in)), lim["BM"]),
                BN=min(max(16, triton.next_power_of_2(c_out)), lim["BN"]))


def whole_flags(c_in: int, c_out: int) -> dict:
    """The kernel's WHOLE_M and WHOLE_N (fused_conv's ``whole_chunks``, blocks of at most 128 channels)."""
    return dict(WHOLE_M=whole_chunks(c_in, 128), WHOLE_N=whole_chunks(c_out, 128))


@functools.cache
def _coarsest_tile() -> tuple[int, int]:
    """The largest (BH, BW) of ``gpu_configs``."""
    configs = gpu_configs()
    return max(c.kwargs["BH"] for c in configs), max(c.kwargs["BW"] for c in configs)


def pixel_tiles(n: int, height: int, width: int, tile=None) -> int:
    """The pixel tiles (K steps) of the maps at `tile`'s (BH, BW), or at the coarsest of ``gpu_configs`` (None): the
    most shares K can be split into with none empty, which the kernel assumes."""
    bh, bw = _coarsest_tile() if tile is None else (tile["BH"], tile["BW"])
    return n * triton.cdiv(height, bh) * triton.cdiv(width, bw)


def wgrad_splits(n: int, height: int, width: int, c_in: int, c_out: int, ksize: int, sms: int) -> int:
    """How many shares of the pixel tiles K is split into: enough programs for a few waves over `sms` SMs at
    128 x 128 blocks, at most one share per pixel tile of the coarsest config."""
    blocks = ksize * ksize * triton.cdiv(c_in, 128) * triton.cdiv(c_out, 128)
    return max(1, min(pixel_tiles(n, height, width), triton.cdiv(_WAVES * sms, blocks)))


def fused_conv_wgrad_triton(x, dz, ksize: int, dilation: int, *, prologue=None, dbn=None, splits=None,
                            config=None):
    """The filter gradient (Cout, Cin, r, r) in the compute dtype (float32; float64 for float64) of
    conv(prologue(x)) for the output gradient dbn(dz).

    x: (N, Cin, H, W) channels_last, float32/float16/bfloat16/float64; dz: (N, Cout, H, W) channels_last, x's dtype
    (with dbn: the gradient g at this block's BatchNorm output); prologue: None or fused_conv's BnPrologue over x;
    dbn: None or fused_conv's DbnPrologue over dz (its z: this block's convolution output); splits: shares of K
    (default ``wgrad_splits``; at most ``pixel_tiles``); config: one of ``gpu_configs()`` to run instead of the
    autotuner's choice.
    """
    n, c_in, h, w = x.shape
    c_out = dz.shape[1]
    cuda = x.device.type == "cuda"
    tile, launch = launch_tile(config, cuda, _interpret_tile(c_in, c_out))
    box = tile or dict(BH=8, BW=8, BM=16, BN=16)  # the autotuner's pre-hook sets each config's own on CUDA
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if n * h * w == 0:  # no pixel tile: the kernel assumes every share has one
        return torch.zeros(c_out, c_in, ksize, ksize, dtype=acc_dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else _INTERPRET_SMS
    splits = min(splits or wgrad_splits(n, h, w, c_in, c_out, ksize, sms), pixel_tiles(n, h, w, tile))
    partial = torch.empty(splits, ksize * ksize, c_in, c_out, dtype=acc_dtype, device=x.device)
    x_desc = TensorDescriptor.from_tensor(nhwc(x), [1, box["BH"], box["BW"], box["BM"]])
    out_box = [1, box["BH"], box["BW"], box["BN"]]
    g_desc = TensorDescriptor.from_tensor(nhwc(dz), out_box)
    z_desc = TensorDescriptor.from_tensor(nhwc(dbn.z), out_box) if dbn is not None else g_desc
    filler = torch.zeros(1, dtype=acc_dtype, device=x.device)
    keep_bits = word_keep_bits(prologue.keep_bits) if prologue is not None else None
    args = (x_desc, g_desc, z_desc, partial,
            *(prologue[:2] if prologue is not None else (filler, filler)),
            keep_bits if keep_bits is not None else filler,
            *(dbn[1:] if dbn is not None else (filler, filler, filler)), n, h, w, c_in, c_out)
    flags = dict(KSIZE=ksize, DILATION=dilation, PROLOGUE=prologue is not None, HAS_KEEP=keep_bits is not None,
                 DBN=dbn is not None, **whole_flags(c_in, c_out),
                 ACC_FP64=x.dtype == torch.float64,
                 INPUT_PRECISION=input_precision(x.dtype, x.device),
                 DOT_IN_FP32=not cuda and x.dtype == torch.bfloat16,  # as kernels/fused_conv.py says why
                 USE_INT64=n * max(c_in, c_out) * h * w >= 2**31)

    def grid(meta):
        return (ksize * ksize * triton.cdiv(c_in, meta["BM"]) * triton.cdiv(c_out, meta["BN"]), splits)

    with torch.cuda.device(x.device) if cuda else contextlib.nullcontext():
        if tile is None:
            _gpu_kernel()[grid](*args, **flags)
        else:
            fused_conv_wgrad_kernel[grid(tile)](*args, **flags, **tile, **launch)
    total = add_partials(partial, acc_dtype)  # (taps, Cin, Cout)
    return total.permute(2, 1, 0).reshape(c_out, c_in, ksize, ksize).contiguous()
