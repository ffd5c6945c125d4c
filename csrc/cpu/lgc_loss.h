// CPU kernels of the training loss (paper eq. 3-4) with targets rendered from coordinates (no torch headers: the
// glue is csrc/lgc_loss.cpp). The target of landmark (i, n) is T = K * G, G the bilinear splat of the point onto the
// grid (corners outside it dropped), K the 45x45 kernel (1/5) sum_s g_s g_s^T; T is evaluated separably inside its
// window of at most 46 x 46 pixels and is zero elsewhere, so no dense G and no convolution.
#pragma once

#include <cstdint>

namespace lgc {

// Shapes, all row-major contiguous: local, omega, grad_local, grad_omega (n, c, height, width); points (n, c, 2) as
// (x, y) in 0-based pixel coordinates; labelled (n, c); loss, grad (n). Coordinates of unlabelled points are never
// read. Float32 maps accumulate in float32 within a row and in float64 across rows; float64 maps in float64.

// loss[i] = sum_n w_in * sum_pixels [(local - T)^2 + (omega - T)^2]. Planes with w = 0 are not read.
void lgc_loss_forward_cpu(const float* local, const float* omega, const float* points, const bool* labelled,
                          int64_t n, int64_t c, int64_t height, int64_t width, float* loss);
void lgc_loss_forward_cpu(const double* local, const double* omega, const double* points, const bool* labelled,
                          int64_t n, int64_t c, int64_t height, int64_t width, double* loss);

// grad_local = 2 w grad[i] (local - T), grad_omega = 2 w grad[i] (omega - T); zero where w = 0.
void lgc_loss_backward_cpu(const float* grad, const float* local, const float* omega, const float* points,
                           const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width,
                           float* grad_local, float* grad_omega);
void lgc_loss_backward_cpu(const double* grad, const double* local, const double* omega, const double* points,
                           const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width,
                           double* grad_local, double* grad_omega);

// w: (n, c), the weights of eq. 3: V + L/10 + L/(2c) sum_k V_ik, V = labelled and 0 <= x <= width-1, 0 <= y <=
// height-1. Exposed for the unit test; the kernels above compute the same values.
void lgc_loss_weights_cpu(const float* points, const bool* labelled, int64_t n, int64_t c, int64_t height,
                          int64_t width, float* w);
void lgc_loss_weights_cpu(const double* points, const bool* labelled, int64_t n, int64_t c, int64_t height,
                          int64_t width, double* w);

}  // namespace lgc
