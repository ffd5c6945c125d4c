// CUDA launcher of the 45x45 kernel convolution (no torch headers: the glue is csrc/kernel_conv.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"

namespace lgc {

// y = scale * (K * x). x, y: (planes, height, width) contiguous, planes = N * C, element type `kind`. Zero padding,
// same-size output. Accumulates in float32 (float64 for kFloat64); the scale is applied to the sum before the one
// rounding to `kind`. Returns the launch error, if any.
cudaError_t kernel_conv_cuda(const void* x, void* y, ScalarKind kind, int64_t planes, int64_t height, int64_t width,
                             double scale, cudaStream_t stream);

}  // namespace lgc
