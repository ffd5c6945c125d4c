"""Triton implicit-GEMM convolution on tensor-memory (TMA) tile loads, with conv_stack's fusions: its forward piece
(the previous block's BatchNorm-apply + ReLU + dropout applied to the input tile as it is loaded, the per-channel sum
and sum of squares of the output as it is stored) and its input-gradient piece (BatchNorm backward's apply as the
prologue, the previous block's dropout / ReLU gates and BatchNorm's backward sums as the epilogue), so neither an
activation, a gradient at a BatchNorm input, nor a statistics pass touches memory.

GEMM view: M = output pixels, N = Cout, K = taps x Cin. A program computes the (BH x BW pixels of one image) x (BN
channels) tile of the output. For tap (kh, kw) its input tile is the (1, BH, BW, BK) box of the channels_last input at
(image, h0 + kh*d - pad, w0 + kw*d - pad, k0): the descriptor zero-fills what lies outside the image or past Cin, so a
shifted tap needs no index arithmetic and no masks; the filter tile is the (1, BN, BK) box of the packed filter (taps,
Cout, Cin) at (tap, n0, k0), zero past Cin too. One flat loop over (tap, Cin chunk) lets Triton pipeline the loads
across taps. The product runs transposed, acc^T (BN x pixels) = filter tile x input tile^T: the filter is wgmma's A
operand and the input tile its B operand, both read from shared memory. With the input tile as A, Triton (3.6 and 3.9)
keeps it in registers (a prologue computes it there; without one the 4-D box's reshape does the same) and ptxas
serialises every wgmma ("C7515": each waits for the one before); as B it goes to shared memory, the prologue's result
stored once, and the MMAs of an iteration issue back to back. The input gradient of a stride-1 convolution with
symmetric padding is this convolution of the output gradient with the filter rotated by 180 degrees, its channel axes
swapped (``pack_filter(transposed=True)``).

Prologues (PROLOGUE), computed in float32 (float64), rounded to the map's dtype before the product, and 0 where the
tap reads padding (the padding is the activation's or the gradient's, not x's):
  PROLOGUE_BN   a = relu(x * s[k] + b[k]) * keep. keep is bit e % 8 of byte e // 8 of keep_ptr, e the value's offset
                in x's channels_last order (``pack_keep_mask``); a pixel's flags of one chunk are consecutive bits,
                read as one or two 64-bit words a row.
  PROLOGUE_DBN  a = eq_dy[k] * x + eq_x[k] * z + eq_b[k], x the gradient g at the next block's BatchNorm output and
                z that block's convolution output, a second descriptor with the same boxes.
With STORE_PROLOGUE the programs of the first channel tile also store the prologue's result at the centre tap, whose
box is their own pixels, into a map like x: each value once, as the product used it. The filter gradient then reads
it as a plain operand instead of making it again for each of its r*r taps (its MMA loop's instructions fall about
fivefold: ``bench_fused_conv.py --sm90-report``).
Where no channel chunk runs past the channel count and a chunk's keep flags lie in whole 64-bit words (WHOLE_K for the
input's chunks, WHOLE_N for the output's: ``whole_chunks``, true for the release's 128-channel layers), the
per-channel vectors and the keep words load without masks, bounds or shifts: about a fifth fewer instructions in the
forward's loop with its prologue, and the input gradient's gate epilogue no longer spills (``--sm90-report``).

Epilogues (EPILOGUE), the output stored by descriptor (clipped to the image) or, without a prologue, by pointer:
  EPILOGUE_STATS  each program writes the sums over its pixels of z and z * z, as stored (rounded to z's dtype), to
                  row pid_m of the partial-sum buffers (float32, float64 for float64), which the host adds up in
                  float64: no atomics, the same sums on every run;
  EPILOGUE_GATE   the output is g = acc * keep where z_prev * s + b > 0 (the previous block's dropout and ReLU, its
                  keep bits read as the prologue reads them), and the partial sums are those of
                  g * (z_prev - mean) * invstd and of g, from g as stored.
"""
import contextlib
import functools
import os
from typing import NamedTuple, Optional

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
AUTOTUNE_ENV = "LGC_FAST_TRITON_AUTOTUNE"


def tuned(kept: list) -> list:
    """The configs this module's and fused_conv_wgrad's autotuners time for a new key: those their pruning kept, or
    where $LGC_FAST_TRITON_AUTOTUNE is 0 only the first (the GPU tests: each of their many shapes and modes would
    compile and time every config; tests/test_fused_conv_configs.py runs each config once)."""
    return kept[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else kept


# The prologue applied to the input tiles (PROLOGUE) and the epilogue's work (EPILOGUE):
PROLOGUE_NONE, PROLOGUE_BN, PROLOGUE_DBN = 0, 1, 2
EPILOGUE_STORE, EPILOGUE_STATS, EPILOGUE_GATE = 0, 1, 2


@triton.jit
def _bits_from(words, first, row_end, rows_ok):
    """Per row, the keep bits from bit `first` on as one uint64 (bit j: the flag of offset first + j): the word holding
    bit `first` and, where the bits before `row_end` (the row's last flag + 1) run past it, the next one (a word holding
    none of them is not read: it can lie past the buffer)."""
    index, offset = first >> 6, first & 63
    low = tl.load(words + index, mask=rows_ok & (first < row_end), other=0) >> offset.to(tl.uint64)
    spill = rows_ok & (offset != 0) & ((first | 63) + 1 < row_end)
    high = tl.load(words + index + 1, mask=spill, other=0)
    return low | tl.where(spill, high << ((64 - offset) & 63).to(tl.uint64), 0)


@triton.jit
def keep_flags(keep_ptr, pix, k0, c_in, rows_ok, ct: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr):
    """The keep flags (0 / 1 in ct, rows x BK, BK <= 128) of channels k0 + arange(BK) at the pixels `pix` of a map
    with c_in channels (channels_last bit order); 0 where not rows_ok. Past c_in they are whatever bits follow (the
    next pixel's): every caller's values are 0 there. A pixel's flags of the chunk are consecutive bits: one to three
    64-bit words a row (``word_keep_bits``), shifted into place per row, not a load a value. Only 64-bit loads: a
    narrow integer load in the chain that becomes a float64 dot operand makes Triton 3.6 lay it out with a K width its
    MMA lowering rejects. Per value only 32-bit work and no int-to-float conversion (a quarter-rate instruction): the
    row's 32-bit word of the value's lane, tested against the lane's bit, selects 1 or 0 (the prologues run once a
    value of every input tile: their instructions, not the MMA, bound these kernels)."""
    words = keep_ptr.to(tl.pointer_type(tl.uint64))
    lane = tl.arange(0, BK)
    if WHOLE:
        # c_in a multiple of 64 (k0 of BK, a power of two): the chunk's flags lie in whole words, one load a word
        index = pix * (c_in // 64) + k0 // 64
        bits = tl.load(words + index, mask=rows_ok, other=0) >> (k0 % 64).to(tl.uint64)
    else:
        first = pix * c_in + k0
        row_end = first - k0 + c_in
        bits = _bits_from(words, first, row_end, rows_ok)
    word = tl.where(lane[None, :] < 32, bits.to(tl.uint32)[:, None], (bits >> 32).to(tl.uint32)[:, None])
    if BK > 64:
        # the high word after the low one is used: made earlier, it stays live longer (136 channels spilled more)
        if WHOLE:
            high = tl.load(words + index + 1, mask=rows_ok, other=0)
        else:
            high = _bits_from(words, first + 64, row_end, rows_ok)
        word = tl.where(lane[None, :] < 64, word,
                        tl.where(lane[None, :] < 96, high.to(tl.uint32)[:, None], (high >> 32).to(tl.uint32)[:, None]))
    lane_bit = (tl.full((BK,), 1, tl.uint32) << (lane & 31).to(tl.uint32))[None, :]
    return tl.where((word & lane_bit) != 0, 1.0, 0.0).to(ct)


@triton.jit
def bn_activation(a, s_ptr, b_ptr, keep_ptr, pix, offs_k, k0, c_in, inside, ct: tl.constexpr,
                  HAS_KEEP: tl.constexpr, BK: tl.constexpr, WHOLE: tl.constexpr):
    """relu(a * s + b) * keep (rows x BK, in ct) for channels offs_k, 0 at rows outside the image (the padding is the
    activation's) and past c_in. Each masking costs instructions a value, so none is repeated: past c_in the
    descriptor's zero fill of a and the zeros loaded for s and b give 0, and with keep bits the rows outside the
    image read no flags (0 * relu(b)). WHOLE: no chunk runs past c_in (``whole_chunks``), so nothing is masked."""
    s = channel_vector(s_ptr, offs_k, c_in, WHOLE)
    b = channel_vector(b_ptr, offs_k, c_in, WHOLE)
    v = tl.maximum(a.to(ct) * s[None, :] + b[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    if HAS_KEEP:
        return v * keep_flags(keep_ptr, pix, k0, c_in, inside, ct, BK, WHOLE)  # NaN stays NaN
    return tl.where(inside[:, None], v, 0.0)


@triton.jit
def channel_vector(ptr, offs, count, WHOLE: tl.constexpr):
    """A per-channel vector's values at channels `offs`, 0 at and past `count` unless WHOLE says none is (a mask
    costs a compare and a select per load)."""
    if WHOLE:
        return tl.load(ptr + offs)
    return tl.load(ptr + offs, mask=offs < count, other=0.0)


@triton.jit
def dbn_gradient(g, z, eq_dy_ptr, eq_x_ptr, eq_b_ptr, offs_k, c_in, inside, ct: tl.constexpr, WHOLE: tl.constexpr):
    """BatchNorm backward's apply, dz = eq_dy * g + eq_x * z + eq_b (rows x BK, in ct), 0 outside the image and past
    c_in. eq_b enters times the row's 0 / 1, so the padding costs no select a value; past c_in the descriptors' zero
    fill of g and z and the zeros loaded for the terms give 0."""
    eq_dy = channel_vector(eq_dy_ptr, offs_k, c_in, WHOLE)
    eq_x = channel_vector(eq_x_ptr, offs_k, c_in, WHOLE)
    eq_b = channel_vector(eq_b_ptr, offs_k, c_in, WHOLE)
    row = tl.where(inside, 1.0, 0.0).to(ct)
    return g.to(ct) * eq_dy[None, :] + z.to(ct) * eq_x[None, :] + row[:, None] * eq_b[None, :]


@triton.jit
def pixel_index(img, h0, w0, row_h, row_w, height, width, USE_INT64: tl.constexpr):
    """The flat index of each tile row's pixel (img, h0 + row_h, w0 + row_w) of a map of height x width (the keep
    bits' and the store's rows). The scalar corner is added first: adding the rows' offsets first cost the gate
    epilogue's kernel 60 more bytes of spills (Triton 3.6)."""
    pix = (img * height + h0 + row_h) * width + w0 + row_w
    return pix.to(tl.int64) if USE_INT64 else pix


@triton.jit
def store_tile(out, out_desc, out_ptr, img, h0, w0, n0, row_h, row_w, height, width, offs_n, valid, n_ok, c_out,
               BY_POINTER: tl.constexpr, USE_INT64: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
               BN: tl.constexpr):
    """The (BH*BW, BN) output tile at (img, h0, w0, offs_n): by descriptor (clipped to the map), or through pointers
    (masked) where the loop left its wgmmas in flight across iterations (no prologue to wait for): a descriptor store
    there makes ptxas serialise every wgmma of the loop (C7515), while pointers cost registers a prologue's kernel
    spills."""
    if BY_POINTER:
        pix = pixel_index(img, h0, w0, row_h, row_w, height, width, USE_INT64)
        tl.store(out_ptr + pix[:, None] * c_out + offs_n[None, :], out, mask=valid[:, None] & n_ok[None, :])
    else:
        out_desc.store([img, h0, w0, n0], tl.reshape(out, (1, BH, BW, BN)))


@triton.jit
def fused_conv_kernel(
    x_desc, x2_desc, w_desc, out_desc, out_ptr, e_desc, p0_ptr, p1_ptr, p2_ptr, keep_ptr,
    e0_ptr, e1_ptr, e2_ptr, e3_ptr, e_keep_ptr, sum_ptr, sq_ptr, prologue_out_desc,
    height, width, c_in, c_out,
    KSIZE: tl.constexpr, DILATION: tl.constexpr, PROLOGUE: tl.constexpr, HAS_KEEP: tl.constexpr,
    STORE_PROLOGUE: tl.constexpr, WHOLE_K: tl.constexpr, WHOLE_N: tl.constexpr,
    EPILOGUE: tl.constexpr, E_HAS_KEEP: tl.constexpr, ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, USE_INT64: tl.constexpr,
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
    ct: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros((BN, BM), dtype=ct)  # transposed (module docstring)

    k_chunks = tl.cdiv(c_in, BK)
    for it in range(0, KSIZE * KSIZE * k_chunks):
        tap = it // k_chunks
        k0 = (it % k_chunks) * BK
        dh = (tap // KSIZE) * DILATION - pad
        dw = (tap % KSIZE) * DILATION - pad
        a = tl.reshape(x_desc.load([img, h0 + dh, w0 + dw, k0]), (BM, BK))
        if PROLOGUE != 0:
            offs_k = k0 + tl.arange(0, BK)
            ih = h0 + dh + row_h
            iw = w0 + dw + row_w
            inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
            if PROLOGUE == 1:
                pix = pixel_index(img, h0 + dh, w0 + dw, row_h, row_w, height, width, USE_INT64)
                a = bn_activation(a, p0_ptr, p1_ptr, keep_ptr, pix, offs_k, k0, c_in, inside, ct, HAS_KEEP,
                                  BK, WHOLE_K).to(dot_dtype)
            else:
                z_in = tl.reshape(x2_desc.load([img, h0 + dh, w0 + dw, k0]), (BM, BK))
                a = dbn_gradient(a, z_in, p0_ptr, p1_ptr, p2_ptr, offs_k, c_in, inside, ct, WHOLE_K).to(dot_dtype)
            if STORE_PROLOGUE:
                # the centre tap's box is the output tile's own pixels: each value is written once, by the programs
                # of the first channel tile
                if (tap == KSIZE * KSIZE // 2) & (n0 == 0):
                    prologue_out_desc.store([img, h0, w0, k0], tl.reshape(a, (1, BH, BW, BK)))
        wt = tl.reshape(w_desc.load([tap, n0, k0]), (BN, BK))
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(wt, tl.trans(a), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    acc = tl.trans(acc)  # (BM, BN)

    valid = ((h0 + row_h) < height) & ((w0 + row_w) < width)
    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < c_out
    row = pid_m.to(tl.int64) * c_out
    if EPILOGUE == 2:
        # the previous block's dropout, ReLU and BatchNorm backward: g = acc * keep where its pre-activation is > 0,
        # and BatchNorm's sums of g * xhat and g, from g as stored
        z_prev = tl.reshape(e_desc.load([img, h0, w0, n0]), (BM, BN)).to(ct)
        s = channel_vector(e0_ptr, offs_n, c_out, WHOLE_N)
        b = channel_vector(e1_ptr, offs_n, c_out, WHOLE_N)
        g = tl.where(z_prev * s[None, :] + b[None, :] > 0, acc, 0.0)
        if E_HAS_KEEP:
            pix = pixel_index(img, h0, w0, row_h, row_w, height, width, USE_INT64)
            g = g * keep_flags(e_keep_ptr, pix, n0, c_out, valid, ct, BN, WHOLE_N)
        out = g.to(out_desc.dtype)
        store_tile(out, out_desc, out_ptr, img, h0, w0, n0, row_h, row_w, height, width, offs_n, valid, n_ok,
                   c_out, PROLOGUE == 0, USE_INT64, BH, BW, BN)
        mean = channel_vector(e2_ptr, offs_n, c_out, WHOLE_N)
        invstd = channel_vector(e3_ptr, offs_n, c_out, WHOLE_N)
        gs = tl.where(valid[:, None], out.to(ct), 0.0)
        xhat = (z_prev - mean[None, :]) * invstd[None, :]
        tl.store(sum_ptr + row + offs_n, tl.sum(gs * xhat, axis=0), mask=n_ok)
        tl.store(sq_ptr + row + offs_n, tl.sum(gs, axis=0), mask=n_ok)
    else:
        out = acc.to(out_desc.dtype)
        store_tile(out, out_desc, out_ptr, img, h0, w0, n0, row_h, row_w, height, width, offs_n, valid, n_ok,
                   c_out, PROLOGUE == 0, USE_INT64, BH, BW, BN)
        if EPILOGUE == 1:
            zs = tl.where(valid[:, None], out.to(ct), 0.0)
            tl.store(sum_ptr + row + offs_n, tl.sum(zs, axis=0), mask=n_ok)
            tl.store(sq_ptr + row + offs_n, tl.sum(zs * zs, axis=0), mask=n_ok)


def _set_block_shapes(nargs):
    """Autotuner pre-hook: each config's tile is also the descriptors' box."""
    bh, bw, bn, bk = nargs["BH"], nargs["BW"], nargs["BN"], nargs["BK"]
    for name, box in (("x_desc", bk), ("x2_desc", bk), ("prologue_out_desc", bk), ("out_desc", bn), ("e_desc", bn)):
        nargs[name].block_shape = [1, bh, bw, box]
    nargs["w_desc"].block_shape = [1, bn, bk]


def gpu_configs():
    """(BH, BW, BN, warps, stages) tiles: 128 and 256 pixels for wgmma's 64-row granules (128 x 64 with 8 warps for
    the input gradient, whose gate epilogue holds a second tile in registers); each with BK = 64, 32 and 16, of which
    ``prune_configs`` keeps the one whose rows are 128 bytes (the widest TMA swizzle) for the dtype."""
    shapes = [(8, 16, 128, 8, 3), (8, 16, 128, 4, 4), (16, 16, 128, 8, 3), (8, 16, 64, 4, 4), (16, 16, 64, 8, 4),
              (8, 8, 128, 4, 4), (8, 16, 128, 8, 5), (8, 16, 64, 8, 4)]
    return [triton.Config(dict(BH=h, BW=w, BN=n, BK=k), num_warps=warps, num_stages=stages,
                          pre_hook=_set_block_shapes) for h, w, n, warps, stages in shapes for k in (64, 32, 16)]


def shared_bytes_bound(config, element_size: int, prologue: int = PROLOGUE_NONE,
                       epilogue: int = EPILOGUE_STATS, store_prologue: bool = False) -> int:
    """The larger of the loop's buffers and the epilogue's, plus 1 KiB for barriers and scratch: the epilogue's boxes
    reuse the loop's shared memory once it ends (as the compiled kernels of ``bench_fused_conv.py --sm90-report``
    show). The loop's: num_stages buffers of the input (BH*BW x BK; two maps for the dBN prologue) and filter (BN x BK)
    boxes, the prologue's result, which the MMA reads from shared memory, and the box it is stored from
    (STORE_PROLOGUE); the epilogue's: the output box the store stages and the gate's box of the previous z."""
    bh, bw, bn, bk = (config.kwargs[name] for name in ("BH", "BW", "BN", "BK"))
    a_maps = 2 if prologue == PROLOGUE_DBN else 1
    made_boxes = (prologue != PROLOGUE_NONE) + store_prologue
    loop = config.num_stages * (a_maps * bh * bw * bk + bk * bn) + made_boxes * bh * bw * bk
    out_boxes = 2 if epilogue == EPILOGUE_GATE else 1
    return max(loop, out_boxes * bh * bw * bn) * element_size + 1024


def prune_configs(configs, named_args, **kwargs):
    """The autotuner's pruning: ``kept_configs`` for the launch's Cout, dtype, prologue and epilogue."""
    return tuned(kept_configs(configs, named_args["c_out"], named_args["x_desc"].base.element_size(),
                              kwargs.get("PROLOGUE", PROLOGUE_NONE), kwargs.get("EPILOGUE", EPILOGUE_STATS),
                              kwargs.get("STORE_PROLOGUE", False)))


def kept_configs(configs, c_out: int, element_size: int, prologue: int = PROLOGUE_NONE,
                 epilogue: int = EPILOGUE_STATS, store_prologue: bool = False):
    """128-byte input rows; channel tiles far wider than Cout only add masked work; tiles over the shared memory
    fail at launch (keep the smallest where none fits); the gate epilogue holds the previous z's tile beside the
    accumulator, and with more than 64 accumulator values a thread it spills (the sm_90 report: 472 bytes at 128 x 128
    with 4 warps)."""
    def shared(c):
        return shared_bytes_bound(c, element_size, prologue, epilogue, store_prologue)

    def accumulator_per_thread(c):
        return c.kwargs["BH"] * c.kwargs["BW"] * c.kwargs["BN"] // (32 * c.num_warps)

    rows = [c for c in configs if c.kwargs["BK"] * element_size == 128]
    kept = [c for c in rows if c.kwargs["BN"] <= max(64, triton.next_power_of_2(c_out))
            and shared(c) <= SHARED_MEMORY_LIMIT
            and (epilogue != EPILOGUE_GATE or accumulator_per_thread(c) <= 64)]
    return kept or [min(rows, key=shared)]


@functools.cache
def _gpu_kernel():
    """The autotuned kernel, made at the first CUDA launch; the partial sums are zeroed before each config's trial."""
    return triton.autotune(configs=gpu_configs(), key=["height", "width", "c_in", "c_out", "KSIZE", "PROLOGUE",
                                                        "HAS_KEEP", "EPILOGUE", "E_HAS_KEEP", "STORE_PROLOGUE"],
                           prune_configs_by={"early_config_prune": prune_configs},
                           reset_to_zero=["sum_ptr", "sq_ptr"])(fused_conv_kernel)


def signature_types(element: str, acc: str, config) -> dict:
    """The Triton types of the kernel's non-constexpr arguments at `config`'s tile (what a launch specialises to, for
    compiling without one): element the maps' type ("bf16", ...), acc the compute type ("fp32" or "fp64")."""
    bh, bw, bn, bk = (config.kwargs[name] for name in ("BH", "BW", "BN", "BK"))
    a_box, out_box = f"tensordesc<{element}[1, {bh}, {bw}, {bk}]>", f"tensordesc<{element}[1, {bh}, {bw}, {bn}]>"
    vectors = ("p0_ptr", "p1_ptr", "p2_ptr", "e0_ptr", "e1_ptr", "e2_ptr", "e3_ptr", "sum_ptr", "sq_ptr")
    return {"x_desc": a_box, "x2_desc": a_box, "w_desc": f"tensordesc<{element}[1, {bn}, {bk}]>",
            "out_desc": out_box, "out_ptr": f"*{element}", "e_desc": out_box, **{name: f"*{acc}" for name in vectors},
            "keep_ptr": "*u8", "e_keep_ptr": "*u8", "prologue_out_desc": a_box, "height": "i32", "width": "i32",
            "c_in": "i32", "c_out": "i32"}


def _interpret_tile(c_in: int, c_out: int) -> dict:
    lim = _INTERPRET_TILE
    return dict(BH=lim["BH"], BW=lim["BW"], BN=min(max(16, triton.next_power_of_2(c_out)), lim["BN"]),
                BK=min(max(16, triton.next_power_of_2(c_in)), lim["BK"]))


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last -> its (N, H, W, C) contiguous view (no copy)."""
    return t.permute(0, 2, 3, 1)


def stats_rows(n: int, height: int, width: int) -> int:
    """Rows of the partial-sum buffers: one per pixel tile of the smallest tile any config uses."""
    bh, bw = _STATS_ROWS_PIXELS
    return n * triton.cdiv(height, bh) * triton.cdiv(width, bw)


def new_partial_sums(n: int, height: int, width: int, channels: int, dtype: torch.dtype, device):
    """The pair of zeroed partial-sum buffers ``fused_conv_triton`` takes as `sums`, (stats_rows(N, H, W), channels)
    each in `dtype` (the compute dtype), from one fill."""
    return torch.zeros(2, stats_rows(n, height, width), channels, dtype=dtype, device=device).unbind(0)


def add_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One partial-sum buffer's rows added up in float64, as `dtype`: (channels,)."""
    return partial.sum(0, dtype=torch.float64).to(dtype)


def whole_chunks(channels: int, widest: int) -> bool:
    """Whether no channel chunk of up to `widest` channels (a power of two, the widest a launch's configs use) runs
    past `channels`, and a pixel's keep flags of a chunk lie in whole 64-bit words: the kernels' WHOLE_* flags, under
    which they load per-channel vectors and keep words without masks or shifts."""
    return channels % 64 == 0 and channels % widest == 0


def whole_flags(c_in: int, c_out: int) -> dict:
    """The kernel's WHOLE_K and WHOLE_N for a launch from c_in to c_out channels (chunks of at most 64 and 128)."""
    return dict(WHOLE_K=whole_chunks(c_in, 64), WHOLE_N=whole_chunks(c_out, 128))


def word_keep_bits(keep_bits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """keep_bits (bytes,) uint8 as the kernels read them, whole little-endian 64-bit words: the same tensor where it
    starts 8-byte aligned and holds whole words, else a zero-padded copy (the bits past the map are never used)."""
    if keep_bits is None or (keep_bits.data_ptr() % 8 == 0 and keep_bits.numel() % 8 == 0):
        return keep_bits
    words = torch.zeros(triton.cdiv(keep_bits.numel(), 8) * 8, dtype=torch.uint8, device=keep_bits.device)
    words[:keep_bits.numel()] = keep_bits
    return words


def pack_filter(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """weight (Cout, Cin, r, r) -> the kernel's filter operand (r*r, Cout, Cin), tap-major, Cin contiguous (the GEMM's
    K); transposed: that of the convolution's input gradient, (r*r, Cin, Cout) of the filter rotated by 180 degrees
    (stride 1 and symmetric padding make the input gradient a convolution with it)."""
    r = weight.shape[-1]
    if transposed:
        return weight.flip(2, 3).permute(2, 3, 1, 0).reshape(r * r, weight.shape[1], weight.shape[0]).contiguous()
    return weight.permute(2, 3, 0, 1).reshape(r * r, weight.shape[0], weight.shape[1]).contiguous()


class BnPrologue(NamedTuple):
    """a = relu(x * scale + shift) * keep: scale, shift (Cin,) in the compute dtype; keep_bits as ``fused_conv``'s or
    None."""
    scale: torch.Tensor
    shift: torch.Tensor
    keep_bits: Optional[torch.Tensor]


class DbnPrologue(NamedTuple):
    """BatchNorm backward's apply, a = eq_dy * x + eq_x * z + eq_b: x the gradient g at the next block's BatchNorm
    output, z (like x) that block's convolution output, eq_* (Cin,) in the compute dtype."""
    z: torch.Tensor
    eq_dy: torch.Tensor
    eq_x: torch.Tensor
    eq_b: torch.Tensor


class Gate(NamedTuple):
    """The input gradient's epilogue for a previous block with BatchNorm terms (s, b, mean, invstd) and keep bits over
    z_prev (the output's shape, channels_last): out = g = acc * keep where z_prev * s + b > 0, and per channel the
    partial sums of g * (z_prev - mean) * invstd (into sums[0]) and of g (sums[1])."""
    z_prev: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    keep_bits: Optional[torch.Tensor]


def launch_tile(config, cuda: bool, interpret_tile: dict):
    """(tile, launch options) of a launch: `config`'s (a triton.Config of the kernel's ``gpu_configs``) where given,
    else on CUDA (None, {}) for the autotuner's choice, elsewhere the interpreter's tile."""
    if config is not None:
        return dict(config.kwargs), dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return (None, {}) if cuda else (interpret_tile, {})


def fused_conv_triton(x, w_packed, ksize: int, dilation: int, out, *, prologue=None, gate: Optional[Gate] = None,
                      sums=None, prologue_out=None, config=None):
    """Write conv(prologue(x), w) into out (or, with a gate, the gated gradient) and, where `sums` is a pair of
    buffers (zeros on entry), the per-tile sums: of out and out * out (statistics) or the gate's; where
    `prologue_out` is given, the prologue's result (the activation, or BatchNorm backward's dz) into it too, as the
    product used it (for a filter gradient that reads it plainly, instead of making it again at every tap).

    x: (N, Cin, H, W) channels_last, float32/float16/bfloat16/float64; w_packed: (r*r, Cout, Cin) in x's dtype
    (``pack_filter``); prologue: None, BnPrologue or DbnPrologue; out: (N, Cout, H, W) channels_last, x's dtype; sums:
    ``new_partial_sums(N, H, W, Cout, ...)``, or None (not with a gate); prologue_out: None or (N, Cin, H, W)
    channels_last in x's dtype (with a prologue only); config: one of ``gpu_configs()`` to run
    instead of the autotuner's choice (tests of every config).
    """
    if prologue_out is not None and prologue is None:
        raise ValueError("fused_conv_triton: prologue_out needs a prologue")
    n, c_in, h, w = x.shape
    c_out = w_packed.shape[1]
    cuda = x.device.type == "cuda"
    tile, launch = launch_tile(config, cuda, _interpret_tile(c_in, c_out))
    box = tile or dict(BH=8, BW=8, BN=16, BK=16)  # the autotuner's pre-hook sets each config's own on CUDA
    a_box, out_box = [1, box["BH"], box["BW"], box["BK"]], [1, box["BH"], box["BW"], box["BN"]]
    x_desc = TensorDescriptor.from_tensor(nhwc(x), a_box)
    dbn = isinstance(prologue, DbnPrologue)
    x2_desc = TensorDescriptor.from_tensor(nhwc(prologue.z), a_box) if dbn else x_desc
    w_desc = TensorDescriptor.from_tensor(w_packed, [1, box["BN"], box["BK"]])
    out_desc = TensorDescriptor.from_tensor(nhwc(out), out_box)
    e_desc = TensorDescriptor.from_tensor(nhwc(gate.z_prev), out_box) if gate is not None else out_desc
    p_desc = TensorDescriptor.from_tensor(nhwc(prologue_out), a_box) if prologue_out is not None else x_desc
    acc_fp64 = x.dtype == torch.float64
    filler = torch.zeros(1, dtype=torch.float64 if acc_fp64 else torch.float32, device=x.device)  # unused pointers
    vectors = list(prologue[1:] if dbn else prologue[:2]) if prologue is not None else []
    keep_bits = word_keep_bits(prologue.keep_bits) if isinstance(prologue, BnPrologue) else None
    e_vectors = [gate.s, gate.b, gate.mean, gate.invstd] if gate is not None else []
    e_keep = word_keep_bits(gate.keep_bits) if gate is not None else None
    sum_buffers = list(sums) if sums is not None else [filler, filler]
    args = (x_desc, x2_desc, w_desc, out_desc, nhwc(out), e_desc, *(vectors + [filler] * 3)[:3],
            keep_bits if keep_bits is not None else filler, *(e_vectors + [filler] * 4)[:4],
            e_keep if e_keep is not None else filler, *sum_buffers, p_desc, h, w, c_in, c_out)
    flags = dict(KSIZE=ksize, DILATION=dilation,
                 PROLOGUE=PROLOGUE_DBN if dbn else PROLOGUE_NONE if prologue is None else PROLOGUE_BN,
                 HAS_KEEP=keep_bits is not None, STORE_PROLOGUE=prologue_out is not None,
                 **whole_flags(c_in, c_out),
                 EPILOGUE=EPILOGUE_GATE if gate is not None else EPILOGUE_STORE if sums is None else EPILOGUE_STATS,
                 E_HAS_KEEP=e_keep is not None, ACC_FP64=acc_fp64, INPUT_PRECISION=input_precision(x.dtype, x.device),
                 # Triton 3.9's interpreter multiplies bfloat16 dot operands as raw integer bit patterns; bfloat16
                 # products are exact in float32, so upcasting there computes the same sums.
                 DOT_IN_FP32=not cuda and x.dtype == torch.bfloat16,
                 USE_INT64=n * max(c_in, c_out) * h * w >= 2**31)

    def grid(meta):
        return (n * triton.cdiv(h, meta["BH"]) * triton.cdiv(w, meta["BW"]) * triton.cdiv(c_out, meta["BN"]),)

    with torch.cuda.device(x.device) if cuda else contextlib.nullcontext():
        if tile is None:
            _gpu_kernel()[grid](*args, **flags)
        else:
            fused_conv_kernel[grid(tile)](*args, **flags, **tile, **launch)
    return out
