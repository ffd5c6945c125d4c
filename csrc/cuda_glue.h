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
// least C, images apart, as a channels_last map or a channel slice of one. Maps with a side of 1 take torch's path
// (their strides are arbitrary).
inline bool nhwc_ordered(const at::Tensor& x) {
  return x.dim() == 4 && x.size(0) > 0 && x.size(1) > 1 && x.size(2) > 1 && x.size(3) > 1 && x.stride(1) == 1 &&
         x.stride(3) >= x.size(1) && x.stride(2) == x.size(3) * x.stride(3) && x.stride(0) >= x.size(2) * x.stride(2);
}

// The batched transpose (csrc/cuda/layout.cu, coalesced on both sides) src -> dst for `t`, on the current stream of
// dst's device; false, launching nothing, for a shape it does not take.
inline bool launch_transpose(const at::Tensor& src, const at::Tensor& dst, const TransposeShape& t) {
  const auto elem = static_cast<int>(dst.element_size());
  if (!transpose_batched_supported(elem, t)) return false;
  check_launch(transpose_batched_cuda(src.const_data_ptr(), dst.mutable_data_ptr(), elem, t,
                                      c10::cuda::getCurrentCUDAStream(dst.device().index()).stream()),
               "layout transpose");
  return true;
}

// x (a CUDA tensor) as a contiguous (N, C, H, W) tensor of its dtype: x itself when it is one, one batched transpose
// when it is NHWC-ordered, else torch's copy.
inline at::Tensor planar_of(const at::Tensor& x) {
  if (x.is_contiguous()) return x;
  if (nhwc_ordered(x)) {
    const int64_t c = x.size(1), p = x.size(2) * x.size(3);
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (launch_transpose(x, out, {x.size(0), p, c, x.stride(0), x.stride(3), c * p, p})) return out;
  }
  return x.contiguous();
}

// dst = src for a contiguous src of dst's shape and dtype (CUDA tensors): one batched transpose when dst is
// NHWC-ordered, else torch's copy.
inline void copy_planar_into(const at::Tensor& dst, const at::Tensor& src) {
  if (!dst.is_contiguous() && nhwc_ordered(dst) && src.is_contiguous() && dst.scalar_type() == src.scalar_type() &&
      dst.sizes() == src.sizes()) {
    const int64_t c = dst.size(1), p = dst.size(2) * dst.size(3);
    if (launch_transpose(src, dst, {dst.size(0), c, p, c * p, p, dst.stride(0), dst.stride(3)})) return;
  }
  dst.copy_(src);
}

}  // namespace lgc
