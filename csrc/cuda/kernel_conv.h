// CUDA launcher of the 45x45 kernel convolution (no torch headers: the glue is csrc/kernel_conv.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"

namespace lgc {

// x, y: (planes, height, width) contiguous, planes = N * C, element type `kind`. Zero padding, same-size output.
// Accumulates in float32 (float64 for kFloat64). Returns the launch error, if any.
cudaError_t kernel_conv_cuda(const void* x, void* y, ScalarKind kind, int64_t planes, int64_t height, int64_t width,
                             cudaStream_t stream);

}  // namespace lgc
