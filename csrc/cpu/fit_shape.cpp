// CPU statistics pass of the shape fit; see fit_shape.h. OpenMP over planes; within a plane only the rows and
// columns of the window's bounding box are read, and the row loops vectorise (select + two reductions).
#include "cpu/fit_shape.h"

#include <algorithm>
#include <cmath>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lgc {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LGC_FIT_SHAPE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LGC_FIT_SHAPE_CLONES
#endif
// The per-plane code must be inlined into each clone to be compiled for its instruction set.
#if defined(__GNUC__)
#define LGC_FIT_SHAPE_INLINE inline __attribute__((always_inline))
#else
#define LGC_FIT_SHAPE_INLINE inline
#endif

// [lo, hi] of the pixels within `radius` of `centre` on an axis of `size` pixels; lo > hi when none.
void window_range(double centre, double radius, int64_t size, int64_t* lo, int64_t* hi) {
  const double a = std::max(0.0, std::floor(centre - radius));
  const double b = std::min(double(size - 1), std::ceil(centre + radius));
  if (!(a <= b)) {  // also NaN
    *lo = 0;
    *hi = -1;
    return;
  }
  *lo = int64_t(a);
  *hi = int64_t(b);
}

// Sums over row[x0 .. x1] of w = v (kept pixels) or 0, and of w * dx with dx = x - ref_x. The 32-bit index keeps the
// int -> float conversion vectorisable.
template <typename T, bool kWindowed>
LGC_FIT_SHAPE_INLINE void row_sums(const T* row, int64_t x0, int64_t x1, T ref_x, T dy2, T r2, T floor, T* sw,
                                   T* sx) {
  const T* p = row + x0;
  const T dx0 = T(x0) - ref_x;
  const int n = int(x1 - x0 + 1);
  T w_sum = 0, x_sum = 0;
#pragma omp simd reduction(+ : w_sum, x_sum)
  for (int i = 0; i < n; ++i) {
    const T dx = dx0 + T(i);
    const T v = p[i];
    const bool keep = (v > floor) & (!kWindowed | (dx * dx + dy2 <= r2));
    const T w = keep ? v : T(0);
    w_sum += w;
    x_sum += w * dx;
  }
  *sw = w_sum;
  *sx = x_sum;
}

template <typename T>
LGC_FIT_SHAPE_INLINE void plane_stats(const T* map, T peak, const T* center, T radius, const double* thresholds, int n_thresholds,
                        int64_t height, int64_t width, T* out) {
  const bool windowed = center != nullptr;
  T ref_x = T(width - 1) / T(2), ref_y = T(height - 1) / T(2);
  int64_t x0 = 0, x1 = width - 1, y0 = 0, y1 = height - 1;
  if (windowed) {
    ref_x = center[0];
    ref_y = center[1];
    window_range(ref_x, radius, width, &x0, &x1);
    window_range(ref_y, radius, height, &y0, &y1);
  }
  const T r2 = radius * radius;
  T floors[kFitShapeMaxThresholds];
  double acc[kFitShapeMaxThresholds][3] = {};
  for (int t = 0; t < n_thresholds; ++t) floors[t] = std::max(T(thresholds[t]) * peak, T(0));
  for (int64_t y = y0; y <= y1 && x0 <= x1; ++y) {
    const T dy = T(y) - ref_y;
    const T dy2 = dy * dy;
    const T* row = map + y * width;
    for (int t = 0; t < n_thresholds; ++t) {
      T sw, sx;
      if (windowed) {
        row_sums<T, true>(row, x0, x1, ref_x, dy2, r2, floors[t], &sw, &sx);
      } else {
        row_sums<T, false>(row, x0, x1, ref_x, dy2, r2, floors[t], &sw, &sx);
      }
      acc[t][0] += sw;
      acc[t][1] += sx;
      acc[t][2] += double(sw) * double(dy);
    }
  }
  for (int t = 0; t < n_thresholds; ++t) {
    const double total = acc[t][0];
    out[3 * t + 0] = T(total);
    out[3 * t + 1] = total > 0 ? T(double(ref_x) + acc[t][1] / total) : ref_x;
    out[3 * t + 2] = total > 0 ? T(double(ref_y) + acc[t][2] / total) : ref_y;
  }
}

LGC_FIT_SHAPE_CLONES void plane_stats_f32(const float* map, float peak, const float* center, float radius,
                                          const double* thresholds, int n_thresholds, int64_t height, int64_t width,
                                          float* out) {
  plane_stats(map, peak, center, radius, thresholds, n_thresholds, height, width, out);
}
LGC_FIT_SHAPE_CLONES void plane_stats_f64(const double* map, double peak, const double* center, double radius,
                                          const double* thresholds, int n_thresholds, int64_t height, int64_t width,
                                          double* out) {
  plane_stats(map, peak, center, radius, thresholds, n_thresholds, height, width, out);
}
void plane_stats_any(const float* map, float peak, const float* center, float radius, const double* thresholds,
                     int n_thresholds, int64_t height, int64_t width, float* out) {
  plane_stats_f32(map, peak, center, radius, thresholds, n_thresholds, height, width, out);
}
void plane_stats_any(const double* map, double peak, const double* center, double radius, const double* thresholds,
                     int n_thresholds, int64_t height, int64_t width, double* out) {
  plane_stats_f64(map, peak, center, radius, thresholds, n_thresholds, height, width, out);
}

template <typename T>
void run(const T* heatmaps, const T* peak, const T* centers, T radius, const double* thresholds, int n_thresholds,
         int64_t planes, int64_t height, int64_t width, T* out, int num_threads) {
  if (planes <= 0 || n_thresholds <= 0) return;
  n_thresholds = std::min(n_thresholds, kFitShapeMaxThresholds);
  const int64_t plane_size = height * width;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  // Small windows are too little work per plane to be worth waking a team for small batches.
  const bool parallel = threads > 1 && planes > 1 && planes * (centers ? radius * radius : T(plane_size)) > 2e4;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
#else
  (void)num_threads;
#endif
  for (int64_t p = 0; p < planes; ++p) {
    plane_stats_any(heatmaps + p * plane_size, peak[p], centers ? centers + 2 * p : nullptr, radius, thresholds,
                    n_thresholds, height, width, out + p * n_thresholds * 3);
  }
}

}  // namespace

void fit_shape_stats_cpu(const float* heatmaps, const float* peak, const float* centers, float radius,
                         const double* thresholds, int n_thresholds, int64_t planes, int64_t height, int64_t width,
                         float* out, int num_threads) {
  run(heatmaps, peak, centers, radius, thresholds, n_thresholds, planes, height, width, out, num_threads);
}

void fit_shape_stats_cpu(const double* heatmaps, const double* peak, const double* centers, double radius,
                         const double* thresholds, int n_thresholds, int64_t planes, int64_t height, int64_t width,
                         double* out, int num_threads) {
  run(heatmaps, peak, centers, radius, thresholds, n_thresholds, planes, height, width, out, num_threads);
}

}  // namespace lgc
