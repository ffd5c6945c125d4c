// CUDA launcher of the glue's layout changes between channels_last (NHWC) and planar (NCHW) maps (no torch headers:
// the glue helpers are in csrc/cuda_glue.h). The kernel_conv and lgc_loss kernels read and write planar maps; the
// training step's maps are channels_last, so every call changes layout on the way in and out.
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

// Elements of elem_bytes = 1, 2, 4 or 8 bytes (moved as raw bits). Returns the launch error, or
// cudaErrorInvalidValue for another element size.
cudaError_t transpose_batched_cuda(const void* src, void* dst, int elem_bytes, TransposeShape shape,
                                   cudaStream_t stream);

}  // namespace lgc
