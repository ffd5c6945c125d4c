// Torch glue of the layout ops on CUDA: lgc_fast_C::channels_last_cat(Tensor[] parts) -> Tensor and
// lgc_fast_C::planar_split(Tensor x, int[] sizes) -> Tensor[], each part moved by csrc/cuda/layout.cu's batched
// transpose (coalesced on both sides; torch's strided copy between the two layouts is coalesced on one side only).
// They join the network's planar maps (kernel_conv's, the loss's) to the channels_last input of the global subnet,
// and split that input's gradient back into planar maps. Other devices run the ops' torch reference
// (lgc_fast/ops/layout.py), so this file registers CUDA kernels only.
#ifdef LGC_WITH_CUDA
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda_glue.h"

namespace lgc {
namespace {

void check_maps(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4, "channels_last_cat: ", what, " must have 4 dimensions (N, C, H, W), got shape ",
              x.sizes());
  TORCH_CHECK(x.is_cuda(), "channels_last_cat: ", what, " must be a CUDA tensor, got ", x.device());
}

// parts: (N, C_i, H, W), one dtype and device -> (N, sum C_i, H, W) channels_last, part i at channels
// [sum_{j<i} C_j, sum_{j<=i} C_j).
at::Tensor channels_last_cat_cuda(at::TensorList parts) {
  TORCH_CHECK(!parts.empty(), "channels_last_cat: parts must hold at least one map");
  const at::Tensor& first = parts[0];
  check_maps(first, "parts[0]");
  int64_t channels = 0;
  for (const at::Tensor& part : parts) {
    check_maps(part, "every part");
    TORCH_CHECK(part.size(0) == first.size(0) && part.size(2) == first.size(2) && part.size(3) == first.size(3),
                "channels_last_cat: every part must have parts[0]'s N, H and W ", first.sizes(), ", got ",
                part.sizes());
    TORCH_CHECK(part.scalar_type() == first.scalar_type() && part.device() == first.device(),
                "channels_last_cat: every part must have parts[0]'s dtype and device");
    channels += part.size(1);
  }
  const c10::cuda::CUDAGuard guard(first.device());
  at::Tensor out = at::empty({first.size(0), channels, first.size(2), first.size(3)},
                             first.options().memory_format(at::MemoryFormat::ChannelsLast));
  int64_t start = 0;
  for (const at::Tensor& part : parts) {
    if (part.numel() > 0) {
      const at::Tensor target = out.narrow(1, start, part.size(1));
      // a planar part (the network's) moves by one batched transpose, any other layout by torch's copy (one pass)
      if (part.is_contiguous()) {
        copy_planar_into(target, part);
      } else {
        target.copy_(part);
      }
    }
    start += part.size(1);
  }
  return out;
}

// x: (N, sum sizes, H, W) -> one contiguous (N, sizes[i], H, W) map per size, never aliasing x.
std::vector<at::Tensor> planar_split_cuda(const at::Tensor& x, at::IntArrayRef sizes) {
  TORCH_CHECK(x.dim() == 4, "planar_split: x must have 4 dimensions (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "planar_split: x must be a CUDA tensor, got ", x.device());
  int64_t channels = 0;
  for (const int64_t size : sizes) {
    TORCH_CHECK(size >= 0, "planar_split: sizes must be >= 0, got ", sizes);
    channels += size;
  }
  TORCH_CHECK(channels == x.size(1), "planar_split: sizes ", sizes, " must add up to x's ", x.size(1), " channels");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> parts;
  parts.reserve(sizes.size());
  int64_t start = 0;
  for (const int64_t size : sizes) {
    const at::Tensor slice = x.narrow(1, start, size);
    at::Tensor part = planar_of(slice);
    // planar_of returns a contiguous slice itself: an op's outputs must not alias its input.
    if (part.is_alias_of(x)) part = part.clone();
    parts.push_back(std::move(part));
    start += size;
  }
  return parts;
}

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def("channels_last_cat(Tensor[] parts) -> Tensor");
  m.def("planar_split(Tensor x, int[] sizes) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("channels_last_cat", &lgc::channels_last_cat_cuda);
  m.impl("planar_split", &lgc::planar_split_cuda);
}
#endif
