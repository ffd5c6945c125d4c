// CUDA launcher of the shape fit's statistics pass (no torch headers: the glue is csrc/fit_shape.cpp). Semantics are
// those of csrc/cpu/fit_shape.h.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"

namespace lgc {

constexpr int kFitShapeCudaMaxThresholds = 4;

// heatmaps: (planes, height, width) contiguous of type `kind`; peak (planes), centers (planes, 2) or nullptr (whole
// map) and out (planes, n_thresholds, 3) = (W, mu_x, mu_y) are float64 for kFloat64 and float32 otherwise, as is the
// accumulation. thresholds: host array of n_thresholds (1 to kFitShapeCudaMaxThresholds) values relative to peak.
// One block per plane. Returns the launch error, if any.
cudaError_t fit_shape_stats_cuda(const void* heatmaps, ScalarKind kind, const void* peak, const void* centers,
                                 double radius, const double* thresholds, int n_thresholds, int64_t planes,
                                 int64_t height, int64_t width, void* out, cudaStream_t stream);

}  // namespace lgc
