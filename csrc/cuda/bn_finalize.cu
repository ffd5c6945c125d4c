// CUDA kernel of conv_stack's BatchNorm finalize: one thread a channel (csrc/epilogue.h's bn_finalize_channel, the
// CPU kernel's arithmetic).
#include "cuda/bn_finalize.h"

#include <cuda_runtime.h>

namespace lgc {
namespace bn_finalize_detail {

constexpr int kThreads = 128;

template <typename A>
__global__ void __launch_bounds__(kThreads) finalize_kernel(BnFinalizeArgs<A> args, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < channels) bn_finalize_channel(args, c);
}

template <typename A>
cudaError_t launch(const BnFinalizeArgs<A>& args, int64_t channels, cudaStream_t stream) {
  if (channels <= 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((channels + kThreads - 1) / kThreads);
  finalize_kernel<A><<<blocks, kThreads, 0, stream>>>(args, channels);
  return cudaGetLastError();
}

}  // namespace bn_finalize_detail

cudaError_t bn_finalize_cuda(const BnFinalizeArgs<float>& args, int64_t channels, cudaStream_t stream) {
  return bn_finalize_detail::launch(args, channels, stream);
}

cudaError_t bn_finalize_cuda(const BnFinalizeArgs<double>& args, int64_t channels, cudaStream_t stream) {
  return bn_finalize_detail::launch(args, channels, stream);
}

}  // namespace lgc
