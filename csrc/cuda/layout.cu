// CUDA batched transposes for the glue's layout changes; see layout.h.
//
// torch's strided copy between channels_last and planar maps is coalesced on one side only: in the H100 profile of
// the training step (bench/profile_gpu.py, batch 128) its 14 copies a step averaged 673 us, about 1 TB/s for the
// 128 x 136 x 96 x 96 bf16 maps, 9 ms a step. Here a block moves 32 x 32 tiles through shared memory:
// 32 x 8 threads read 4 rows each along the source's unit stride, and after the barrier write 4 rows each along
// the destination's, so both sides are coalesced. Shared rows are padded by one element, so the second phase's
// column reads spread over the banks. A tile's origin costs one 32-bit division; offsets within a matrix are int.
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
constexpr int64_t kMaxSide = int64_t{1} << 30;  // rows and columns are int inside the kernel
constexpr unsigned kMaxGridX = 1u << 30;
constexpr unsigned kMaxGridY = 65535;

template <typename W>
using Tile = W[kTile][kTile + 1];

LGC_HD int ceil_tiles(int64_t side) { return static_cast<int>((side + kTile - 1) / kTile); }
// Tiles of one matrix; they run along the columns, then down the rows.
LGC_HD int64_t tiles_per_matrix(const TransposeShape& t) { return int64_t{ceil_tiles(t.rows)} * ceil_tiles(t.cols); }

// Matrix b's tile `tile`: its first row and column. One 32-bit division per tile (a block's threads all do it).
struct TileOrigin {
  int64_t b;
  int r0, s0;
};

LGC_HD TileOrigin origin_of(const TransposeShape& t, int64_t b, int tile) {
  const auto across = static_cast<unsigned>(ceil_tiles(t.cols));
  const unsigned down = static_cast<unsigned>(tile) / across;
  return {b, static_cast<int>(down) * kTile, static_cast<int>(static_cast<unsigned>(tile) - down * across) * kTile};
}

// Phase 1 of thread (tx, ty): source rows r0 + ty + k (k = 0, 8, 16, 24), column s0 + tx, into shared[row][col].
template <typename W>
LGC_HD void load_tile(const TransposeShape& t, const W* src, const TileOrigin& o, int tx, int ty, Tile<W>& shared) {
  const int s = o.s0 + tx;
  const W* matrix = src + o.b * t.src_batch;
#pragma unroll
  for (int k = 0; k < kTile; k += kRowsPerPass) {
    const int r = o.r0 + ty + k;
    if (r < t.rows && s < t.cols) shared[ty + k][tx] = matrix[r * t.src_row + s];
  }
}

// Phase 2: destination rows (source columns) s0 + ty + k, column (source row) r0 + tx, from shared[col][row].
template <typename W>
LGC_HD void store_tile(const TransposeShape& t, W* dst, const TileOrigin& o, int tx, int ty, const Tile<W>& shared) {
  const int r = o.r0 + tx;
  W* matrix = dst + o.b * t.dst_batch;
#pragma unroll
  for (int k = 0; k < kTile; k += kRowsPerPass) {
    const int s = o.s0 + ty + k;
    if (r < t.rows && s < t.cols) matrix[s * t.dst_col + r] = shared[tx][ty + k];
  }
}

// blockIdx.x strides over a matrix's tiles, blockIdx.y over the matrices.
template <typename W>
__global__ void __launch_bounds__(kTile * kRowsPerPass)
    transpose_kernel(TransposeShape t, const W* __restrict__ src, W* __restrict__ dst) {
  __shared__ Tile<W> shared;
  const auto tiles = static_cast<int>(tiles_per_matrix(t));
  for (int64_t b = blockIdx.y; b < t.batch; b += gridDim.y) {
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const TileOrigin o = origin_of(t, b, tile);
      load_tile(t, src, o, threadIdx.x, threadIdx.y, shared);
      __syncthreads();
      store_tile(t, dst, o, threadIdx.x, threadIdx.y, shared);
      __syncthreads();  // the next tile overwrites shared
    }
  }
}

template <typename W>
cudaError_t launch(const void* src, void* dst, TransposeShape t, cudaStream_t stream) {
  if (t.batch <= 0 || t.rows <= 0 || t.cols <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles_per_matrix(t), kMaxGridX)),
                  static_cast<unsigned>(std::min<int64_t>(t.batch, kMaxGridY)));
  transpose_kernel<W><<<grid, dim3(kTile, kRowsPerPass), 0, stream>>>(t, static_cast<const W*>(src),
                                                                     static_cast<W*>(dst));
  return cudaGetLastError();
}

}  // namespace layout_detail

bool transpose_batched_supported(int elem_bytes, TransposeShape shape) {
  namespace d = layout_detail;
  const bool sized = elem_bytes == 1 || elem_bytes == 2 || elem_bytes == 4 || elem_bytes == 8;
  return sized && shape.rows < d::kMaxSide && shape.cols < d::kMaxSide && d::tiles_per_matrix(shape) <= INT_MAX;
}

cudaError_t transpose_batched_cuda(const void* src, void* dst, int elem_bytes, TransposeShape shape,
                                   cudaStream_t stream) {
  namespace d = layout_detail;
  if (!transpose_batched_supported(elem_bytes, shape)) return cudaErrorInvalidValue;
  switch (elem_bytes) {
    case 1: return d::launch<uint8_t>(src, dst, shape, stream);
    case 2: return d::launch<uint16_t>(src, dst, shape, stream);
    case 4: return d::launch<uint32_t>(src, dst, shape, stream);
    case 8: return d::launch<uint64_t>(src, dst, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lgc
