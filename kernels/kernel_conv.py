"""Triton forward of the 45x45 kernel convolution (paper eq. 1) as banded matrix products on tensor cores.

K = (1/5) sum_s g_s g_s^T is separable per Gaussian, so one output tile of one plane of scale * (K * x) is
    Y = (scale/5) sum_s (R_s X) C_s,
with X the input tile (plus a 22-pixel halo where the tile is not the whole map side), R_s the banded Toeplitz
matrix of g_s along the rows (output rows x input rows) and C_s along the columns (input columns x output columns).
A program owns one output tile: for each Gaussian and each chunk of 32 input columns it runs the vertical product
over 32-row chunks of X (loaded with zeros outside the map: the zero padding), then feeds that result, still in
registers, as the left operand of the horizontal product. Chunks wholly outside the map are skipped. The band
matrices are built once per (tile shape, scale, dtype, device) on the host and read through L2; the column bands carry
the factor scale/5 (a float argument would reach the kernel as float32, too coarse for float64 maps).

Tiles: maps up to 64 rows / 128 columns are one tile that way (no halo), padded to a power of two >= 16 (the tl.dot
minimum); otherwise 64-pixel output tiles over 128-pixel input tiles. float32/float16/bfloat16 accumulate in
float32 with 3xTF32 products (input_precision="tf32x3": float32-level error, not TF32's 1e-3); float64 computes in
float64. Any strides (contiguous, channels_last, slices) are read and written in place; the output has
torch.empty_like(x) strides. Under TRITON_INTERPRET=1 (CPU tensors) each program takes its whole tile in one step.
sm_90 compile (triton.compile, no device): 190-220 registers, no spills, 16-48 KB shared memory. Work for
256x68x96^2 float32: 2 tiles of 64x128 per plane, 27.5 MFLOP per plane after skipping, x3 for 3xTF32: ~1.4 PFLOP of
TF32 MMA in all. Measured on an H100 80GB HBM3 (bench/results/nvidia-h100-80gb-hbm3.json): 29.6 ms forward, 13x the
CUDA kernel's 2.23 ms (and 2.9x faster than F.conv2d): a fallback for builds without the CUDA extension only.
"""
import functools

import torch
import triton
import triton.language as tl

RADIUS = 22
SIGMAS = (1.0, 3.0, 5.0, 7.0, 9.0)  # as lgc_fast.ops.kernel_conv
_WHOLE_ROWS = 64    # maps up to this tall are one tile high, without halo
_WHOLE_COLS = 128   # maps up to this wide are one tile wide, without halo
_TILE = 64          # output tile side otherwise; the input side is the next power of two >= 64 + 2 * 22
_CHUNK = 32         # input rows (K of the vertical product) and input columns (K of the horizontal) per step
_MIN_DOT = 16
_MAX_GRID_Y = 65535


@triton.jit
def _kernel_conv_tile(
    x_ptr, y_ptr, row_band_ptr, col_band_ptr,
    channels, height, width, tiles_w,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    TILE_H: tl.constexpr, IN_H: tl.constexpr, HALO_H: tl.constexpr,
    TILE_W: tl.constexpr, IN_W: tl.constexpr, HALO_W: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n = plane // channels
    c = plane % channels
    row0 = (tile // tiles_w) * TILE_H
    col0 = (tile % tiles_w) * TILE_W
    first_row = row0 - HALO_H  # map row of input-tile row 0
    first_col = col0 - HALO_W
    # Input chunks wholly outside the map are zeros: skip them.
    k_begin = tl.maximum(0, -first_row) // BLOCK_K * BLOCK_K
    k_end = tl.minimum(IN_H, height - first_row)
    n_begin = tl.maximum(0, -first_col) // BLOCK_N * BLOCK_N
    n_end = tl.minimum(IN_W, width - first_col)

    x_plane = x_ptr + n * sx_n + c * sx_c
    ks = tl.arange(0, BLOCK_K)
    ns = tl.arange(0, BLOCK_N)
    outs_h = tl.arange(0, TILE_H)
    outs_w = tl.arange(0, TILE_W)
    if ACC_FP64:
        y = tl.zeros((TILE_H, TILE_W), dtype=tl.float64)
    else:
        y = tl.zeros((TILE_H, TILE_W), dtype=tl.float32)
    for s in range(5):
        for j0 in range(n_begin, n_end, BLOCK_N):
            # Vertical pass of Gaussian s over BLOCK_N input columns, then their share of the horizontal pass.
            in_cols = first_col + j0 + ns
            cols_ok = (in_cols >= 0) & (in_cols < width)
            x_cols = x_plane + in_cols.to(tl.int64)[None, :] * sx_w
            if ACC_FP64:
                cols_filtered = tl.zeros((TILE_H, BLOCK_N), dtype=tl.float64)
            else:
                cols_filtered = tl.zeros((TILE_H, BLOCK_N), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                in_rows = first_row + k0 + ks
                rows_ok = (in_rows >= 0) & (in_rows < height)
                x = tl.load(x_cols + in_rows.to(tl.int64)[:, None] * sx_h, mask=rows_ok[:, None] & cols_ok[None, :],
                            other=0.0).to(cols_filtered.dtype)
                row_band = tl.load(row_band_ptr + (s * TILE_H + outs_h)[:, None] * IN_H + (k0 + ks)[None, :])
                # out_dtype names the accumulator's type: Triton 3.6 rejects a float64 acc with the default float32
                cols_filtered = tl.dot(row_band, x, acc=cols_filtered, input_precision=INPUT_PRECISION,
                                       out_dtype=cols_filtered.dtype)
            col_band = tl.load(col_band_ptr + (s * IN_W + j0 + ns)[:, None] * TILE_W + outs_w[None, :])
            y = tl.dot(cols_filtered, col_band, acc=y, input_precision=INPUT_PRECISION, out_dtype=y.dtype)

    out_rows = row0 + outs_h
    out_cols = col0 + outs_w
    out_ok = (out_rows < height)[:, None] & (out_cols < width)[None, :]
    y_ptrs = (y_ptr + n * sy_n + c * sy_c
              + out_rows.to(tl.int64)[:, None] * sy_h + out_cols.to(tl.int64)[None, :] * sy_w)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_ok)


def _side_tiling(size: int, whole_up_to: int) -> tuple[int, int, int]:
    """(output tile, input tile, halo) along a map side of `size` pixels."""
    if size <= whole_up_to:
        tile = max(_MIN_DOT, triton.next_power_of_2(size))
        return tile, tile, 0
    return _TILE, triton.next_power_of_2(_TILE + 2 * RADIUS), RADIUS


@functools.lru_cache(maxsize=64)
def _band(n_out: int, n_in: int, halo: int, in_major: bool, weight: float, dtype: torch.dtype,
          device: str) -> torch.Tensor:
    """(5, n_out, n_in), or (5, n_in, n_out) when in_major: weight * g_s[i - halo - o], zero where |i - halo - o| > 22.

    Input index i is pixel o0 - halo + i of the tile whose first output pixel is o0.
    """
    o = torch.arange(n_out, dtype=torch.float64)[:, None]
    i = torch.arange(n_in, dtype=torch.float64)[None, :]
    k = i - halo - o
    sig = torch.tensor(SIGMAS, dtype=torch.float64)[:, None, None]
    band = weight * torch.exp(-(k**2) / (2.0 * sig**2)) * (k.abs() <= RADIUS)
    if in_major:
        band = band.transpose(1, 2)
    return band.to(dtype=dtype, device=device).contiguous()


def kernel_conv_triton(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x: (N, C, H, W) float32/float16/bfloat16/float64, any strides -> scale * (K * x): (N, C, H, W) like
    torch.empty_like(x)."""
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    y = torch.empty_like(x)
    n, c, h, w = x.shape
    if x.numel() == 0:
        return y
    tile_h, in_h, halo_h = _side_tiling(h, _WHOLE_ROWS)
    tile_w, in_w, halo_w = _side_tiling(w, _WHOLE_COLS)
    tiles_w = triton.cdiv(w, tile_w)
    tiles = triton.cdiv(h, tile_h) * tiles_w
    if tiles > _MAX_GRID_Y:
        raise ValueError(f"x: a {h}x{w} map needs {tiles} tiles, more than the {_MAX_GRID_Y} one launch allows")
    fp64 = x.dtype == torch.float64
    band_dtype = torch.float64 if fp64 else torch.float32
    device = str(x.device)
    # Row bands are stored (out, in), column bands (in, out): the left and right factors of the two products.
    row_band = _band(tile_h, in_h, halo_h, False, 1.0, band_dtype, device)
    col_band = _band(tile_w, in_w, halo_w, True, float(scale) / len(SIGMAS), band_dtype, device)
    # The interpreter pays per loop step, not per element: one step over the whole input tile there.
    chunk = max(in_h, in_w) if x.device.type == "cpu" else _CHUNK
    _kernel_conv_tile[(n * c, tiles)](
        x, y, row_band, col_band,
        c, h, w, tiles_w,
        *x.stride(), *y.stride(),
        TILE_H=tile_h, IN_H=in_h, HALO_H=halo_h, TILE_W=tile_w, IN_W=in_w, HALO_W=halo_w,
        BLOCK_K=min(chunk, in_h), BLOCK_N=min(chunk, in_w),
        INPUT_PRECISION="ieee" if fp64 else "tf32x3", ACC_FP64=fp64,
        # sm_90 (ptxas via triton.compile, no GPU): 190-220 registers and no spills at 8 warps and 2 stages for
        # every tile shape used here; 4 warps or 3 stages spill.
        num_warps=8, num_stages=2,
    )
    return y

