// CUDA launcher of the glue's layout changes between channels_last (NHWC) and planar (NCHW) maps (no torch headers:
// the glue helpers are in csrc/cuda_glue.h). The kernel_conv and lgc_loss kernels read and write planar maps, so a
// channels_last map changes layout on the way in and out; the network hands them planar maps and changes layout
// where those join its channels_last global subnet (csrc/layout.cpp: channels_last_cat, planar_split).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lgc {

// A batch of matrix transposes: dst[b][s][r] = src[b][r][s] for b < batch, r < rows, s < cols. The source's
// element (b, r, s) is at b * src_batch + r * src_row + s, the destination's (b, s, r) at b * dst_batch +
// s * dst_col + r (strides in elements). NHWC -> NCHW: rows = pixels, cols = channels; NCHW -> NHWC: rows =
// channels, cols = pixels.
struct TransposeShape {
  int64_t batch;
  int64_t rows;
  int64_t cols;
  int64_t src_batch;
  int64_t src_row;
  int64_t dst_batch;
  int64_t dst_col;
};

// Whether transpose_batched_cuda takes the shape: elements of 1, 2, 4 or 8 bytes, sides below 2^30 and at most
// 2^31 - 1 tiles of 32 x 32 per matrix.
bool transpose_batched_supported(int elem_bytes, TransposeShape shape);

// Moves elements of elem_bytes as raw bits. Returns the launch error, or cudaErrorInvalidValue for a shape that
// transpose_batched_supported refuses.
cudaError_t transpose_batched_cuda(const void* src, void* dst, int elem_bytes, TransposeShape shape,
                                   cudaStream_t stream);

}  // namespace lgc
