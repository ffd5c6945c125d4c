// Torch glue of the kernel convolution: op lgc_fast_C::kernel_conv(Tensor x, float scale=1.0) -> Tensor (scale * K * x)
// on CPU and CUDA.
// The kernels take (planes, H, W) contiguous buffers; other layouts (channels_last, strided views) are computed on a
// contiguous copy and written into torch::empty_like(x), so the output strides are what the op's fake promises
// (on CUDA, channels_last maps change layout with csrc/cuda/layout.cu's transpose).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/kernel_conv.h"

#ifdef LGC_WITH_CUDA
#include "cuda/kernel_conv.h"
#include "cuda_glue.h"
#endif

namespace lgc {
namespace {

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "kernel_conv: x must have 4 dimensions (N, C, H, W), got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
              "kernel_conv: x must be float32, float16, bfloat16 or float64, got ", t);
  TORCH_CHECK(x.size(1) >= 1, "kernel_conv: x must have at least one channel (C >= 1), got shape ", x.sizes());
}

void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale), "kernel_conv: scale must be a finite number, got ", scale);
}

// `like` as a contiguous (N, C, H, W) tensor of type `type`: `like` itself when it already is one.
at::Tensor contiguous_as(const at::Tensor& like, at::ScalarType type) {
  if (like.scalar_type() == type && like.is_contiguous()) return like;
  return at::empty(like.sizes(), like.options().dtype(type)).copy_(like);
}

// Where the kernel writes: `out` itself when it is contiguous of type `type`, else a contiguous scratch.
at::Tensor target_for(const at::Tensor& out, at::ScalarType type) {
  if (out.scalar_type() == type && out.is_contiguous()) return out;
  return at::empty(out.sizes(), out.options().dtype(type));
}

at::Tensor kernel_conv_cpu_op(const at::Tensor& x, double scale) {
  check_input(x);
  check_scale(scale);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  // Half and bfloat16 are computed in float32 and rounded once at the end.
  const at::ScalarType type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor input = contiguous_as(x, type);
  at::Tensor target = target_for(out, type);
  const int64_t planes = x.size(0) * x.size(1);
  const int threads = at::get_num_threads();
  if (type == at::kDouble) {
    kernel_conv_cpu(input.data_ptr<double>(), target.data_ptr<double>(), planes, x.size(2), x.size(3), scale,
                    threads);
  } else {
    kernel_conv_cpu(input.data_ptr<float>(), target.data_ptr<float>(), planes, x.size(2), x.size(3), scale,
                    threads);
  }
  if (!target.is_same(out)) out.copy_(target);
  return out;
}

#ifdef LGC_WITH_CUDA
// channels_last maps (a caller's; the network's own are planar) go in and out through the batched transpose of
// planar_of and copy_planar_into, which is coalesced on both sides, unlike torch's strided copy.
at::Tensor kernel_conv_cuda_op(const at::Tensor& x, double scale) {
  check_input(x);
  check_scale(scale);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor input = planar_of(x);
  at::Tensor target = target_for(out, x.scalar_type());
  const cudaError_t err = kernel_conv_cuda(input.const_data_ptr(), target.mutable_data_ptr(),
                                           scalar_kind(x.scalar_type()), x.size(0) * x.size(1), x.size(2),
                                           x.size(3), scale,
                                           c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  check_launch(err, "kernel_conv");
  if (!target.is_same(out)) copy_planar_into(out, target);
  return out;
}
#endif

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def("kernel_conv(Tensor x, float scale=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("kernel_conv", &lgc::kernel_conv_cpu_op);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("kernel_conv", &lgc::kernel_conv_cuda_op);
}
#endif
