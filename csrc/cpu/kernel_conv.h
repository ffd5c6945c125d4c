// The paper's kernel convolution on the CPU (no torch headers: the glue is csrc/kernel_conv.cpp).
//
// K (45x45) = (1/5) sum_s g_s g_s^T, g_s[k] = exp(-k^2 / (2 sigma_s^2)), sigma = 1, 3, 5, 7, 9, k = -22..22.
// Channel-wise, zero padding, same-size output.
#pragma once

#include <cstdint>

namespace lgc {

constexpr int kKernelConvRadius = 22;
constexpr int kKernelConvGaussians = 5;
constexpr double kKernelConvSigmas[kKernelConvGaussians] = {1.0, 3.0, 5.0, 7.0, 9.0};

// Per-Gaussian tap radius actually applied. Taps of g_s beyond these are dropped: every entry of the truncated
// kernel K' then satisfies |K' - K| <= delta * K (entrywise) with delta < 2^-26 for float (2^-55 for double), which
// is below the element type's rounding of K itself, so the result equals the dense 45x45 convolution up to
// rounding. The bound: K(u, v) >= (1/5) g_9(u) g_9(v) and g_s <= g_9, so a dropped term of g_s at offset u is at most
// g_s(u) / g_9(u) relative to K; tests/cpp/test_kernel_conv.cpp checks delta for these radii.
template <class T>
struct KernelConvRadii;
template <>
struct KernelConvRadii<float> {
  static constexpr int value[kKernelConvGaussians] = {6, 19, 22, 22, 22};
  static constexpr double max_relative_error = 1.0 / (1 << 26);
};
template <>
struct KernelConvRadii<double> {
  static constexpr int value[kKernelConvGaussians] = {8, 22, 22, 22, 22};
  static constexpr double max_relative_error = 1.0 / (double(1 << 30) * double(1 << 25));
};

// y = scale * (K * x). x, y: (planes, height, width) contiguous, planes = N * C; x and y must not overlap.
// num_threads <= 0 uses the OpenMP default. float accumulates in float, double in double; scale rides on the first
// pass's taps, so it costs nothing.
void kernel_conv_cpu(const float* x, float* y, int64_t planes, int64_t height, int64_t width, double scale = 1.0,
                     int num_threads = 0);
void kernel_conv_cpu(const double* x, double* y, int64_t planes, int64_t height, int64_t width, double scale = 1.0,
                     int num_threads = 0);

}  // namespace lgc
