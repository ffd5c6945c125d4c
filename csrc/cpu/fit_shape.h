// The statistics pass of the batched shape fit on the CPU (no torch headers: the glue is csrc/fit_shape.cpp).
//
// For one landmark, the pixel equations x = p weighted by the pixel values w_p have the same least-squares solution
// as the single equation x = mu weighted by W = sum w_p, mu = sum w_p p / W (lgc_fast/ops/fit_shape.py). This pass
// computes (W, mu) per plane and threshold over the pixels with value > max(threshold * peak, 0) inside a window.
#pragma once

#include <cstdint>

namespace lgc {

constexpr int kFitShapeMaxThresholds = 4;

// heatmaps: (planes, height, width) contiguous, planes = N * C; peak: (planes) the channel maxima; centers:
// (planes, 2) window centres (x, y), or nullptr for the whole map; the window keeps the pixels with
// (x - cx)^2 + (y - cy)^2 <= radius^2; thresholds: n_thresholds values (1 to kFitShapeMaxThresholds) relative to
// peak. out: (planes, n_thresholds, 3) = (W, mu_x, mu_y), mu the window centre (for the whole map its centre
// ((width - 1) / 2, (height - 1) / 2)) where W = 0. Sums within a row are taken in T, across rows in double; offsets
// are measured from the window centre to keep them small. num_threads <= 0 uses the OpenMP default.
void fit_shape_stats_cpu(const float* heatmaps, const float* peak, const float* centers, float radius,
                         const double* thresholds, int n_thresholds, int64_t planes, int64_t height, int64_t width,
                         float* out, int num_threads = 0);
void fit_shape_stats_cpu(const double* heatmaps, const double* peak, const double* centers, double radius,
                         const double* thresholds, int n_thresholds, int64_t planes, int64_t height, int64_t width,
                         double* out, int num_threads = 0);

}  // namespace lgc
