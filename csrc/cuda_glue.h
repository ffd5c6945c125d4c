// What the torch glue of every op needs around its CUDA launchers (glue only: this header includes torch's).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include "cuda/layout.h"
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

// Whether x (N, C, H, W) is stored NHWC-ordered without overlap: channels at stride 1, pixels at one stride of at
// least C, images apart, as a channels_last map or a channel slice of one. Maps with a side of 1 take torch's path (their strides are arbitrary).
inline bool nhwc_ordered(const at::Tensor& x) {
  return x.dim() == 4 && x.size(0) > 0 && x.size(1) > 1 && x.size(2) > 1 && x.size(3) > 1 && x.stride(1) == 1 &&
         x.stride(3) >= x.size(1) && x.stride(2) == x.size(3) * x.stride(3) && x.stride(0) >= x.size(2) * x.stride(2);
}

// x (a CUDA tensor) as a contiguous (N, C, H, W) tensor of its dtype: x itself when it is one, one batched transpose
// (csrc/cuda/layout.cu, coalesced on both sides) when it is NHWC-ordered, else torch's copy.
inline at::Tensor planar_of(const at::Tensor& x) {
  if (x.is_contiguous()) return x;
  if (!nhwc_ordered(x)) return x.contiguous();
  const int64_t c = x.size(1), p = x.size(2) * x.size(3);
  const TransposeShape t{x.size(0), p, c, x.stride(0), x.stride(3), c * p, p};
  const auto elem = static_cast<int>(x.element_size());
  if (!transpose_batched_supported(elem, t)) return x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(transpose_batched_cuda(x.const_data_ptr(), out.mutable_data_ptr(), elem, t,
                                      c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "planar copy");
  return out;
}

// dst = src for a contiguous src of dst's shape and dtype (CUDA tensors): one batched transpose when dst is
// NHWC-ordered, else torch's copy.
inline void copy_planar_into(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.is_contiguous() || !nhwc_ordered(dst) || !src.is_contiguous() || dst.scalar_type() != src.scalar_type() ||
      dst.sizes() != src.sizes()) {
    dst.copy_(src);
    return;
  }
  const int64_t c = dst.size(1), p = dst.size(2) * dst.size(3);
  const TransposeShape t{dst.size(0), c, p, c * p, p, dst.stride(0), dst.stride(3)};
  const auto elem = static_cast<int>(dst.element_size());
  if (!transpose_batched_supported(elem, t)) {
    dst.copy_(src);
    return;
  }
  check_launch(transpose_batched_cuda(src.const_data_ptr(), dst.mutable_data_ptr(), elem, t,
                                      c10::cuda::getCurrentCUDAStream(dst.device().index()).stream()),
               "channels_last copy");
}

}  // namespace lgc
