// CUDA launcher of conv_stack's BatchNorm finalize (no torch headers: the glue is csrc/bn_finalize.cpp).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "epilogue.h"

namespace lgc {

// bn_finalize_channel (csrc/epilogue.h) for channels 0 .. channels - 1, one thread a channel, on `stream`: one launch
// instead of the dozen per-channel torch ops of the reference. Pointers on the device. Returns the launch error.
cudaError_t bn_finalize_cuda(const BnFinalizeArgs<float>& args, int64_t channels, cudaStream_t stream);
cudaError_t bn_finalize_cuda(const BnFinalizeArgs<double>& args, int64_t channels, cudaStream_t stream);

}  // namespace lgc
