// CUDA statistics pass of the shape fit; see fit_shape.h. One block per (face, landmark) plane: each warp walks rows
// of the window's bounding box with its lanes on consecutive columns (coalesced), every thread keeps the sums of all
// thresholds, and one shuffle + shared-memory reduction per block finishes them.
#include "cuda/fit_shape.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lgc {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxT = kFitShapeCudaMaxThresholds;

struct Thresholds {
  double value[kMaxT];
  int count;
};

template <typename Acc>
__device__ __forceinline__ Acc load(const float* p) {
  return Acc(__ldg(p));
}
template <typename Acc>
__device__ __forceinline__ Acc load(const double* p) {
  return Acc(__ldg(p));
}
template <typename Acc>
__device__ __forceinline__ Acc load(const __half* p) {
  return Acc(__half2float(*p));
}
template <typename Acc>
__device__ __forceinline__ Acc load(const __nv_bfloat16* p) {
  return Acc(__bfloat162float(*p));
}

// [lo, hi] of the pixels within `radius` of `centre` on an axis of `size` pixels; lo > hi when none.
__device__ __forceinline__ void window_range(double centre, double radius, int64_t size, int64_t* lo, int64_t* hi) {
  const double a = fmax(0.0, floor(centre - radius));
  const double b = fmin(double(size - 1), ceil(centre + radius));
  if (!(a <= b)) {
    *lo = 0;
    *hi = -1;
    return;
  }
  *lo = int64_t(a);
  *hi = int64_t(b);
}

template <typename In, typename Acc>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const In* __restrict__ heatmaps, const Acc* __restrict__ peak, const Acc* __restrict__ centers,
                 Acc radius, Thresholds thresholds, int64_t height, int64_t width, Acc* __restrict__ out) {
  const int64_t plane = blockIdx.x;
  const In* map = heatmaps + plane * height * width;
  const bool windowed = centers != nullptr;
  Acc ref_x = Acc(width - 1) / Acc(2), ref_y = Acc(height - 1) / Acc(2);
  int64_t x0 = 0, x1 = width - 1, y0 = 0, y1 = height - 1;
  if (windowed) {
    ref_x = centers[2 * plane];
    ref_y = centers[2 * plane + 1];
    window_range(ref_x, radius, width, &x0, &x1);
    window_range(ref_y, radius, height, &y0, &y1);
  }
  const Acc r2 = radius * radius;
  const int nt = thresholds.count;
  Acc floors[kMaxT];
#pragma unroll
  for (int t = 0; t < kMaxT; ++t) {
    const Acc f = Acc(thresholds.value[t]) * peak[plane];
    floors[t] = f > Acc(0) ? f : Acc(0);
  }
  Acc acc[kMaxT][3];
#pragma unroll
  for (int t = 0; t < kMaxT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = Acc(0);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t y = y0 + warp; y <= y1; y += kWarps) {
    const Acc dy = Acc(y) - ref_y;
    const In* row = map + y * width;
    for (int64_t x = x0 + lane; x <= x1; x += 32) {
      const Acc dx = Acc(x) - ref_x;
      if (windowed && dx * dx + dy * dy > r2) continue;
      const Acc v = load<Acc>(row + x);
#pragma unroll
      for (int t = 0; t < kMaxT; ++t) {
        if (t < nt && v > floors[t]) {
          acc[t][0] += v;
          acc[t][1] += v * dx;
          acc[t][2] += v * dy;
        }
      }
    }
  }

  __shared__ Acc partial[kWarps][kMaxT * 3];
#pragma unroll
  for (int t = 0; t < kMaxT; ++t) {
    if (t >= nt) break;  // uniform across the block
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      Acc s = acc[t][k];
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
      if (lane == 0) partial[warp][3 * t + k] = s;
    }
  }
  __syncthreads();
  if (threadIdx.x < 3 * nt) {
    Acc s = Acc(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[w][threadIdx.x];
    partial[0][threadIdx.x] = s;
  }
  __syncthreads();
  if (threadIdx.x < nt) {
    const int t = threadIdx.x;
    const Acc total = partial[0][3 * t];
    Acc* o = out + (plane * nt + t) * 3;
    o[0] = total;
    o[1] = total > Acc(0) ? ref_x + partial[0][3 * t + 1] / total : ref_x;
    o[2] = total > Acc(0) ? ref_y + partial[0][3 * t + 2] / total : ref_y;
  }
}

template <typename In, typename Acc>
cudaError_t launch(const void* heatmaps, const void* peak, const void* centers, double radius,
                   const Thresholds& thresholds, int64_t planes, int64_t height, int64_t width, void* out,
                   cudaStream_t stream) {
  stats_kernel<In, Acc><<<static_cast<unsigned int>(planes), kThreads, 0, stream>>>(
      static_cast<const In*>(heatmaps), static_cast<const Acc*>(peak), static_cast<const Acc*>(centers), Acc(radius),
      thresholds, height, width, static_cast<Acc*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t fit_shape_stats_cuda(const void* heatmaps, ScalarKind kind, const void* peak, const void* centers,
                                 double radius, const double* thresholds, int n_thresholds, int64_t planes,
                                 int64_t height, int64_t width, void* out, cudaStream_t stream) {
  if (n_thresholds < 1 || n_thresholds > kMaxT) return cudaErrorInvalidValue;
  if (planes <= 0) return cudaSuccess;
  if (planes > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
  Thresholds th{};
  for (int t = 0; t < n_thresholds; ++t) th.value[t] = thresholds[t];
  th.count = n_thresholds;
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch<float, float>(heatmaps, peak, centers, radius, th, planes, height, width, out, stream);
    case ScalarKind::kFloat16:
      return launch<__half, float>(heatmaps, peak, centers, radius, th, planes, height, width, out, stream);
    case ScalarKind::kBFloat16:
      return launch<__nv_bfloat16, float>(heatmaps, peak, centers, radius, th, planes, height, width, out, stream);
    case ScalarKind::kFloat64:
      return launch<double, double>(heatmaps, peak, centers, radius, th, planes, height, width, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lgc
