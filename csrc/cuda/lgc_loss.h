// CUDA launchers of the training loss (no torch headers: the glue is csrc/lgc_loss.cpp). Same semantics as
// csrc/cpu/lgc_loss.h: targets rendered from the coordinates inside the kernel, never a dense G or a convolution.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"

namespace lgc {

// "Accumulation type" below: float64 for kind == kFloat64, float32 otherwise.
// local, omega: (n, c, height, width) contiguous, element type `kind`; points: (n, c, 2) contiguous, accumulation
// type; labelled: (n, c) contiguous bool. plane_loss: scratch of n * c accumulation-type elements; loss: (n),
// accumulation type. Each plane's sum is a fixed-order block reduction and the per-face sum a fixed-order loop, so
// the result is deterministic (no atomics). Returns the launch error, if any.
cudaError_t lgc_loss_forward_cuda(const void* local, const void* omega, const void* points, const bool* labelled,
                                  ScalarKind kind, int64_t n, int64_t c, int64_t height, int64_t width,
                                  void* plane_loss, void* loss, cudaStream_t stream);

// grad: (n), accumulation type; grad_local, grad_omega: like local, element type `kind`.
// grad_local = 2 w grad[i] (local - T), grad_omega = 2 w grad[i] (omega - T); zero where w = 0.
cudaError_t lgc_loss_backward_cuda(const void* grad, const void* local, const void* omega, const void* points,
                                   const bool* labelled, ScalarKind kind, int64_t n, int64_t c, int64_t height,
                                   int64_t width, void* grad_local, void* grad_omega, cudaStream_t stream);

}  // namespace lgc
