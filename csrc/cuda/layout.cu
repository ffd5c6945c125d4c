// CUDA batched transposes for the glue's layout changes; see layout.h.
//
// torch's strided copy between channels_last and planar maps is coalesced on one side only: in the H100 profile of
// the training step (bench/profile_gpu.py, batch 128) its 14 copies a step averaged 673 us, about 1 TB/s for the
// 128 x 136 x 96 x 96 bf16 maps, 9 ms a step. Here a block moves 32 x 32 tiles through shared memory:
// 32 x 8 threads read 4 rows each along the source's unit stride, and after the barrier write 4 rows each along
// the destination's, so both sides are coalesced. Shared rows are padded by one element, so the second phase's
// column reads spread over the banks.
#include "cuda/layout.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/kernel_common.cuh"

namespace lgc {
namespace layout_detail {

constexpr int kTile = 32;         // a tile is kTile x kTile elements
constexpr int kRowsPerPass = 8;   // blockDim = (kTile, kRowsPerPass): each thread moves kTile / kRowsPerPass values
constexpr int64_t kMaxBlocks = INT_MAX;

template <typename W>
using Tile = W[kTile][kTile + 1];

LGC_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LGC_HD int64_t tile_count(const TransposeShape& t) {
  return t.batch * ceil_div(t.rows, kTile) * ceil_div(t.cols, kTile);
}

// Tile `tile`'s matrix and first row and column (tiles run along the columns, then rows, then matrices).
struct TileOrigin {
  int64_t b, r0, s0;
};

LGC_HD TileOrigin origin_of(const TransposeShape& t, int64_t tile) {
  const int64_t across = ceil_div(t.cols, kTile);
  const int64_t down = ceil_div(t.rows, kTile);
  return {tile / (across * down), (tile / across) % down * kTile, tile % across * kTile};
}

// Phase 1 of thread (tx, ty): source rows r0 + ty + k (k = 0, 8, 16, 24), column s0 + tx, into shared[row][col].
template <typename W>
LGC_HD void load_tile(const TransposeShape& t, const W* src, int64_t tile, int tx, int ty, Tile<W>& shared) {
  const TileOrigin o = origin_of(t, tile);
  const int64_t s = o.s0 + tx;
#pragma unroll
  for (int k = 0; k < kTile; k += kRowsPerPass) {
    const int64_t r = o.r0 + ty + k;
    if (r < t.rows && s < t.cols) shared[ty + k][tx] = src[o.b * t.src_batch + r * t.src_row + s];
  }
}

// Phase 2: destination rows (source columns) s0 + ty + k, column (source row) r0 + tx, from shared[col][row].
template <typename W>
LGC_HD void store_tile(const TransposeShape& t, W* dst, int64_t tile, int tx, int ty, const Tile<W>& shared) {
  const TileOrigin o = origin_of(t, tile);
  const int64_t r = o.r0 + tx;
#pragma unroll
  for (int k = 0; k < kTile; k += kRowsPerPass) {
    const int64_t s = o.s0 + ty + k;
    if (r < t.rows && s < t.cols) dst[o.b * t.dst_batch + s * t.dst_col + r] = shared[tx][ty + k];
  }
}

template <typename W>
__global__ void __launch_bounds__(kTile * kRowsPerPass)
    transpose_kernel(TransposeShape t, const W* __restrict__ src, W* __restrict__ dst, int64_t tiles) {
  __shared__ Tile<W> shared;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    load_tile(t, src, tile, threadIdx.x, threadIdx.y, shared);
    __syncthreads();
    store_tile(t, dst, tile, threadIdx.x, threadIdx.y, shared);
    __syncthreads();  // the next tile overwrites shared
  }
}

template <typename W>
cudaError_t launch(const void* src, void* dst, TransposeShape t, cudaStream_t stream) {
  const int64_t tiles = tile_count(t);
  if (tiles == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>(std::min(tiles, kMaxBlocks));
  transpose_kernel<W><<<blocks, dim3(kTile, kRowsPerPass), 0, stream>>>(t, static_cast<const W*>(src),
                                                                       static_cast<W*>(dst), tiles);
  return cudaGetLastError();
}

}  // namespace layout_detail

cudaError_t transpose_batched_cuda(const void* src, void* dst, int elem_bytes, TransposeShape shape,
                                   cudaStream_t stream) {
  namespace d = layout_detail;
  switch (elem_bytes) {
    case 1: return d::launch<uint8_t>(src, dst, shape, stream);
    case 2: return d::launch<uint16_t>(src, dst, shape, stream);
    case 4: return d::launch<uint32_t>(src, dst, shape, stream);
    case 8: return d::launch<uint64_t>(src, dst, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lgc
