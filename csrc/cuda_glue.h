// What the torch glue of every op needs around its CUDA launchers (glue only: this header includes torch's).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"

namespace lgc {

// The launchers' element type for a float32, float16, bfloat16 or float64 tensor (others read as float32).
inline ScalarKind scalar_kind(at::ScalarType t) {
  if (t == at::kHalf) return ScalarKind::kFloat16;
  if (t == at::kBFloat16) return ScalarKind::kBFloat16;
  if (t == at::kDouble) return ScalarKind::kFloat64;
  return ScalarKind::kFloat32;
}

// Raises `op`: CUDA kernel launch failed: <why> for a launcher's error.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace lgc
