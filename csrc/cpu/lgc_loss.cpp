// CPU kernels of the training loss; see lgc_loss.h. OpenMP over (face, landmark) planes; inside a plane the rows
// outside the target's window only need sum(local^2 + omega^2), and inside it the target row is built from two
// small per-plane tables because K(u, v) = (1/5) sum_s g_s(u) g_s(v) and the bilinear weights are separable too.
#include "cpu/lgc_loss.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace lgc {
namespace {

constexpr int64_t kRadius = 22;             // K is 45 x 45
constexpr int kSigmas = 5;                  // sigma_s = 1, 3, 5, 7, 9
constexpr int64_t kSpan = 2 * kRadius + 2;  // pixels one axis of a bilinear point's target can reach
constexpr int64_t kChunk = 1024;            // row elements summed in T before the partial goes into a double

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LGC_LOSS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LGC_LOSS_CLONES
#endif

// taps<T>()[s][k] = g_s(k) = exp(-k^2 / (2 sigma_s^2)), k = 0..22, computed in double and rounded once.
template <typename T>
const std::array<std::array<T, kRadius + 1>, kSigmas>& taps() {
  static const auto table = [] {
    std::array<std::array<T, kRadius + 1>, kSigmas> g{};
    for (int s = 0; s < kSigmas; ++s) {
      const double sigma = 2.0 * s + 1.0;
      for (int64_t k = 0; k <= kRadius; ++k) g[s][k] = static_cast<T>(std::exp(-double(k * k) / (2.0 * sigma * sigma)));
    }
    return g;
  }();
  return table;
}

// One axis of a target: f[s][p - lo] = scale * sum over the in-grid corners a of weight_a * g_s(p - corner_a) for
// pixels p in [lo, hi); the factor is zero outside. An empty window (lo == hi) means no target.
template <typename T>
struct AxisWindow {
  int64_t lo = 0;
  int64_t hi = 0;
  T f[kSigmas][kSpan];
};

// coord must lie in [-1, size): then floor(coord) or floor(coord) + 1 is a pixel of [0, size).
template <typename T>
void build_axis(T coord, int64_t size, T scale, AxisWindow<T>& axis) {
  const auto& g = taps<T>();
  const int64_t c0 = static_cast<int64_t>(std::floor(coord));
  const T frac = coord - static_cast<T>(c0);
  const bool first_in = c0 >= 0;
  const bool second_in = c0 + 1 <= size - 1;
  axis.lo = std::max<int64_t>(0, c0 - kRadius);
  axis.hi = std::min<int64_t>(size, c0 + 1 + kRadius + 1);
  for (int s = 0; s < kSigmas; ++s) {
    for (int64_t p = axis.lo; p < axis.hi; ++p) {
      const int64_t d0 = p - c0;
      const int64_t d1 = d0 - 1;
      T v = 0;
      if (first_in && std::abs(d0) <= kRadius) v += (T(1) - frac) * g[s][std::abs(d0)];
      if (second_in && std::abs(d1) <= kRadius) v += frac * g[s][std::abs(d1)];
      axis.f[s][p - axis.lo] = scale * v;
    }
  }
}

// T(px, py) = sum_s x.f[s][px - x.lo] * y.f[s][py - y.lo] inside both windows, 0 elsewhere.
template <typename T>
struct PlaneTarget {
  AxisWindow<T> x;
  AxisWindow<T> y;
};

// Coordinates are read only for labelled points; a point whose four corners all fall off the grid (or a NaN one)
// has no target.
template <typename T>
void build_target(const T* point, bool labelled, int64_t height, int64_t width, PlaneTarget<T>& target) {
  target.x.lo = target.x.hi = target.y.lo = target.y.hi = 0;
  if (!labelled) return;
  const T x = point[0];
  const T y = point[1];
  if (!(x >= T(-1) && x < static_cast<T>(width) && y >= T(-1) && y < static_cast<T>(height))) return;
  build_axis(x, width, T(1) / T(kSigmas), target.x);
  build_axis(y, height, T(1), target.y);
}

template <typename T>
void target_row(const PlaneTarget<T>& target, int64_t py, T* row) {
  const int64_t span = target.x.hi - target.x.lo;
  const int64_t r = py - target.y.lo;
  for (int64_t j = 0; j < span; ++j) row[j] = 0;
  for (int s = 0; s < kSigmas; ++s) {
    const T ys = target.y.f[s][r];
    for (int64_t j = 0; j < span; ++j) row[j] += ys * target.x.f[s][j];
  }
}

template <typename T>
inline __attribute__((always_inline)) double sum_squares(const T* l, const T* o, int64_t count) {
  double total = 0;
  for (int64_t start = 0; start < count; start += kChunk) {
    const int64_t end = std::min(count, start + kChunk);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = start; j < end; ++j) acc += l[j] * l[j] + o[j] * o[j];
    total += static_cast<double>(acc);
  }
  return total;
}

// count <= kSpan, so one accumulator suffices.
template <typename T>
inline __attribute__((always_inline)) double sum_squares_target(const T* l, const T* o, const T* t, int64_t count) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < count; ++j) {
    const T dl = l[j] - t[j];
    const T dor = o[j] - t[j];
    acc += dl * dl + dor * dor;
  }
  return static_cast<double>(acc);
}

// sum over the plane of (local - T)^2 + (omega - T)^2.
template <typename T>
inline __attribute__((always_inline)) double plane_sum(const T* l, const T* o, const PlaneTarget<T>& target,
                                                       int64_t height, int64_t width) {
  double total = 0;
  T row[kSpan];
  const int64_t x_lo = target.x.lo;
  const int64_t x_hi = target.x.hi;
  for (int64_t py = 0; py < height; ++py) {
    const T* lr = l + py * width;
    const T* orow = o + py * width;
    if (py < target.y.lo || py >= target.y.hi) {
      total += sum_squares(lr, orow, width);
      continue;
    }
    target_row(target, py, row);
    total += sum_squares(lr, orow, x_lo);
    total += sum_squares_target(lr + x_lo, orow + x_lo, row, x_hi - x_lo);
    total += sum_squares(lr + x_hi, orow + x_hi, width - x_hi);
  }
  return total;
}

template <typename T>
inline __attribute__((always_inline)) void scale_row(const T* src, T* dst, int64_t count, T scale) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) dst[j] = scale * src[j];
}

template <typename T>
inline __attribute__((always_inline)) void plane_grad(const T* l, const T* o, const PlaneTarget<T>& target, T scale,
                                                      int64_t height, int64_t width, T* gl, T* go) {
  T row[kSpan];
  const int64_t x_lo = target.x.lo;
  const int64_t x_hi = target.x.hi;
  for (int64_t py = 0; py < height; ++py) {
    const int64_t off = py * width;
    if (py < target.y.lo || py >= target.y.hi) {
      scale_row(l + off, gl + off, width, scale);
      scale_row(o + off, go + off, width, scale);
      continue;
    }
    target_row(target, py, row);
    scale_row(l + off, gl + off, x_lo, scale);
    scale_row(o + off, go + off, x_lo, scale);
    const int64_t w0 = off + x_lo;
#pragma omp simd
    for (int64_t j = 0; j < x_hi - x_lo; ++j) {
      gl[w0 + j] = scale * (l[w0 + j] - row[j]);
      go[w0 + j] = scale * (o[w0 + j] - row[j]);
    }
    scale_row(l + off + x_hi, gl + off + x_hi, width - x_hi, scale);
    scale_row(o + off + x_hi, go + off + x_hi, width - x_hi, scale);
  }
}

// Per-precision entry points of the hot loops, cloned for AVX2 where the compiler can.
LGC_LOSS_CLONES double plane_sum_cloned(const float* l, const float* o, const PlaneTarget<float>& t, int64_t h,
                                        int64_t w) {
  return plane_sum(l, o, t, h, w);
}
LGC_LOSS_CLONES double plane_sum_cloned(const double* l, const double* o, const PlaneTarget<double>& t, int64_t h,
                                        int64_t w) {
  return plane_sum(l, o, t, h, w);
}
LGC_LOSS_CLONES void plane_grad_cloned(const float* l, const float* o, const PlaneTarget<float>& t, float scale,
                                       int64_t h, int64_t w, float* gl, float* go) {
  plane_grad(l, o, t, scale, h, w, gl, go);
}
LGC_LOSS_CLONES void plane_grad_cloned(const double* l, const double* o, const PlaneTarget<double>& t, double scale,
                                       int64_t h, int64_t w, double* gl, double* go) {
  plane_grad(l, o, t, scale, h, w, gl, go);
}

template <typename T>
bool visible(const T* point, bool labelled, int64_t height, int64_t width) {
  return labelled && point[0] >= T(0) && point[0] <= static_cast<T>(width - 1) && point[1] >= T(0) &&
         point[1] <= static_cast<T>(height - 1);
}

// Eq. 3 with the reference's operation order, so that the weights match it to the last bit.
template <typename T>
void weights(const T* points, const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width, T* w) {
  const T share = T(1) / static_cast<T>(2.0 * static_cast<double>(c));
  for (int64_t i = 0; i < n; ++i) {
    int64_t count = 0;
    for (int64_t k = 0; k < c; ++k) count += visible(points + 2 * (i * c + k), labelled[i * c + k], height, width);
    for (int64_t k = 0; k < c; ++k) {
      const int64_t p = i * c + k;
      const T vis = visible(points + 2 * p, labelled[p], height, width) ? T(1) : T(0);
      const T lab = labelled[p] ? T(1) : T(0);
      w[p] = vis + lab / T(10) + lab * share * static_cast<T>(count);
    }
  }
}

template <typename T>
void forward(const T* local, const T* omega, const T* points, const bool* labelled, int64_t n, int64_t c,
             int64_t height, int64_t width, T* loss) {
  const int64_t planes = n * c;
  const int64_t plane_size = height * width;
  std::vector<T> w(static_cast<size_t>(planes));
  weights(points, labelled, n, c, height, width, w.data());
  std::vector<double> plane_loss(static_cast<size_t>(planes), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    if (w[p] == T(0)) continue;
    PlaneTarget<T> target;
    build_target(points + 2 * p, labelled[p], height, width, target);
    const int64_t off = p * plane_size;
    plane_loss[p] = static_cast<double>(w[p]) * plane_sum_cloned(local + off, omega + off, target, height, width);
  }
  // A fixed summation order over landmarks: the result does not depend on the thread count.
  for (int64_t i = 0; i < n; ++i) {
    double total = 0;
    for (int64_t k = 0; k < c; ++k) total += plane_loss[i * c + k];
    loss[i] = static_cast<T>(total);
  }
}

template <typename T>
void backward(const T* grad, const T* local, const T* omega, const T* points, const bool* labelled, int64_t n,
              int64_t c, int64_t height, int64_t width, T* grad_local, T* grad_omega) {
  const int64_t planes = n * c;
  const int64_t plane_size = height * width;
  std::vector<T> w(static_cast<size_t>(planes));
  weights(points, labelled, n, c, height, width, w.data());
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const int64_t off = p * plane_size;
    if (w[p] == T(0)) {
      std::fill(grad_local + off, grad_local + off + plane_size, T(0));
      std::fill(grad_omega + off, grad_omega + off + plane_size, T(0));
      continue;
    }
    PlaneTarget<T> target;
    build_target(points + 2 * p, labelled[p], height, width, target);
    const T scale = T(2) * w[p] * grad[p / c];
    plane_grad_cloned(local + off, omega + off, target, scale, height, width, grad_local + off, grad_omega + off);
  }
}

}  // namespace

void lgc_loss_forward_cpu(const float* local, const float* omega, const float* points, const bool* labelled,
                          int64_t n, int64_t c, int64_t height, int64_t width, float* loss) {
  forward(local, omega, points, labelled, n, c, height, width, loss);
}
void lgc_loss_forward_cpu(const double* local, const double* omega, const double* points, const bool* labelled,
                          int64_t n, int64_t c, int64_t height, int64_t width, double* loss) {
  forward(local, omega, points, labelled, n, c, height, width, loss);
}

void lgc_loss_backward_cpu(const float* grad, const float* local, const float* omega, const float* points,
                           const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width,
                           float* grad_local, float* grad_omega) {
  backward(grad, local, omega, points, labelled, n, c, height, width, grad_local, grad_omega);
}
void lgc_loss_backward_cpu(const double* grad, const double* local, const double* omega, const double* points,
                           const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width,
                           double* grad_local, double* grad_omega) {
  backward(grad, local, omega, points, labelled, n, c, height, width, grad_local, grad_omega);
}

void lgc_loss_weights_cpu(const float* points, const bool* labelled, int64_t n, int64_t c, int64_t height,
                          int64_t width, float* w) {
  weights(points, labelled, n, c, height, width, w);
}
void lgc_loss_weights_cpu(const double* points, const bool* labelled, int64_t n, int64_t c, int64_t height,
                          int64_t width, double* w) {
  weights(points, labelled, n, c, height, width, w);
}

}  // namespace lgc
