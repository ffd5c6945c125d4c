// CUDA kernels of the training loss; see lgc_loss.h. One block per (face, landmark) plane (grid-stride over planes):
// the block counts the face's visible points for the weight of eq. 3, renders the target's two separable axis tables
// (5 sigmas x 46 pixels each) into shared memory, then each warp walks whole rows, so rows outside the target's
// window skip the target entirely. Forward: per-thread row partials in float64, a fixed-order block reduction, and a
// second kernel that sums each face's planes in order: deterministic, no atomics.
#include "cuda/lgc_loss.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace lgc {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRadius = 22;            // K is 45 x 45
constexpr int kSigmas = 5;             // sigma_s = 1, 3, 5, 7, 9
constexpr int kSpan = 2 * kRadius + 2;  // pixels one axis of a bilinear point's target can reach
constexpr int64_t kMaxBlocks = 1 << 20;

// g[s][k] = exp(-k^2 / (2 sigma_s^2)), k = 0..22, computed in double on the host and passed by value.
template <typename Acc>
struct Taps {
  Acc g[kSigmas][kRadius + 1];
};

template <typename Acc>
Taps<Acc> make_taps() {
  Taps<Acc> taps{};
  for (int s = 0; s < kSigmas; ++s) {
    const double sigma = 2.0 * s + 1.0;
    for (int k = 0; k <= kRadius; ++k) {
      taps.g[s][k] = static_cast<Acc>(std::exp(-double(k * k) / (2.0 * sigma * sigma)));
    }
  }
  return taps;
}

template <typename Acc>
const Taps<Acc>& host_taps() {
  static const Taps<Acc> taps = make_taps<Acc>();
  return taps;
}

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename Acc>
__device__ __forceinline__ bool visible(const Acc* point, bool labelled, int64_t height, int64_t width) {
  return labelled && point[0] >= Acc(0) && point[0] <= static_cast<Acc>(width - 1) && point[1] >= Acc(0) &&
         point[1] <= static_cast<Acc>(height - 1);
}

// One axis of the target: the pixels [lo, hi) it can reach, and the bilinear corner weights of the in-grid corners
// (zero for a corner off the grid).
template <typename Acc>
struct Axis {
  int64_t c0 = 0;
  int64_t lo = 0;
  int64_t hi = 0;
  Acc w0 = 0;
  Acc w1 = 0;
};

// coord must lie in [-1, size): then floor(coord) or floor(coord) + 1 is a pixel of [0, size).
template <typename Acc>
__device__ Axis<Acc> make_axis(Acc coord, int64_t size) {
  Axis<Acc> a;
  a.c0 = static_cast<int64_t>(floor(coord));
  const Acc frac = coord - static_cast<Acc>(a.c0);
  a.w0 = a.c0 >= 0 ? Acc(1) - frac : Acc(0);
  a.w1 = a.c0 + 1 <= size - 1 ? frac : Acc(0);
  a.lo = a.c0 - kRadius > 0 ? a.c0 - kRadius : 0;
  a.hi = a.c0 + 2 + kRadius < size ? a.c0 + 2 + kRadius : size;
  return a;
}

// f[s][j] = scale * (w0 g_s(p - c0) + w1 g_s(p - c0 - 1)) for pixel p = lo + j < hi, 0 beyond.
template <typename Acc>
__device__ void fill_axis(const Axis<Acc>& a, Acc scale, const Taps<Acc>& taps, Acc (*f)[kSpan]) {
  for (int idx = threadIdx.x; idx < kSigmas * kSpan; idx += blockDim.x) {
    const int s = idx / kSpan;
    const int j = idx - s * kSpan;
    const int64_t p = a.lo + j;
    Acc v = 0;
    if (p < a.hi) {
      const int64_t d0 = p - a.c0;
      const int64_t d1 = d0 - 1;
      if (d0 >= -kRadius && d0 <= kRadius) v += a.w0 * taps.g[s][d0 < 0 ? -d0 : d0];
      if (d1 >= -kRadius && d1 <= kRadius) v += a.w1 * taps.g[s][d1 < 0 ? -d1 : d1];
    }
    f[s][j] = scale * v;
  }
}

// Everything a block needs about its plane, in shared memory: T(px, py) = sum_s xf[s][px - x.lo] * yf[s][py - y.lo]
// inside both windows, 0 elsewhere (an empty window means no target).
template <typename Acc>
struct PlaneShared {
  Acc xf[kSigmas][kSpan];
  Acc yf[kSigmas][kSpan];
};

// Computes the weight of eq. 3 (identically in every thread) and renders the target tables. Ends with a barrier.
// Coordinates of unlabelled points are never read.
template <typename Acc>
__device__ Acc setup_plane(const Acc* points, const bool* labelled, int64_t plane, int64_t c, int64_t height,
                           int64_t width, const Taps<Acc>& taps, PlaneShared<Acc>& sh, Axis<Acc>& x, Axis<Acc>& y) {
  const int64_t face = plane / c;
  int64_t count = 0;
  for (int64_t base = 0; base < c; base += blockDim.x) {
    const int64_t k = base + threadIdx.x;
    const bool vis = k < c && visible(points + 2 * (face * c + k), labelled[face * c + k], height, width);
    count += __syncthreads_count(vis);
  }
  const bool lab = labelled[plane];
  const Acc* point = points + 2 * plane;
  const Acc vis = visible(point, lab, height, width) ? Acc(1) : Acc(0);
  const Acc labf = lab ? Acc(1) : Acc(0);
  const Acc share = Acc(1) / static_cast<Acc>(2.0 * static_cast<double>(c));
  const Acc weight = vis + labf / Acc(10) + labf * share * static_cast<Acc>(count);
  x = Axis<Acc>();
  y = Axis<Acc>();
  if (lab) {
    const Acc px = point[0];
    const Acc py = point[1];
    if (px >= Acc(-1) && px < static_cast<Acc>(width) && py >= Acc(-1) && py < static_cast<Acc>(height)) {
      x = make_axis(px, width);
      y = make_axis(py, height);
    }
  }
  fill_axis(x, Acc(1) / Acc(kSigmas), taps, sh.xf);
  fill_axis(y, Acc(1), taps, sh.yf);
  __syncthreads();
  return weight;
}

template <typename Acc>
__device__ __forceinline__ Acc target_at(const PlaneShared<Acc>& sh, const Acc (&yrow)[kSigmas], int64_t j) {
  Acc t = 0;
#pragma unroll
  for (int s = 0; s < kSigmas; ++s) t += yrow[s] * sh.xf[s][j];
  return t;
}

__device__ __forceinline__ double block_sum(double v, double* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kWarps; ++i) total += scratch[i];
  }
  return total;
}

// plane_loss[plane] = w * sum over the plane of (local - T)^2 + (omega - T)^2.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    plane_loss_kernel(const T* __restrict__ local, const T* __restrict__ omega, const Acc* __restrict__ points,
                      const bool* __restrict__ labelled, int64_t planes, int64_t c, int64_t height, int64_t width,
                      Taps<Acc> taps, Acc* __restrict__ plane_loss) {
  __shared__ PlaneShared<Acc> sh;
  __shared__ double scratch[kWarps];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    Axis<Acc> x, y;
    const Acc weight = setup_plane(points, labelled, plane, c, height, width, taps, sh, x, y);
    double partial = 0;
    if (weight != Acc(0)) {
      const T* lp = local + plane * height * width;
      const T* op = omega + plane * height * width;
      for (int64_t py = warp; py < height; py += kWarps) {
        const T* lr = lp + py * width;
        const T* orow = op + py * width;
        Acc row = 0;
        if (py >= y.lo && py < y.hi) {
          Acc yrow[kSigmas];
#pragma unroll
          for (int s = 0; s < kSigmas; ++s) yrow[s] = sh.yf[s][py - y.lo];
          for (int64_t px = lane; px < width; px += 32) {
            const Acc t = px >= x.lo && px < x.hi ? target_at(sh, yrow, px - x.lo) : Acc(0);
            const Acc dl = static_cast<Acc>(load(lr + px)) - t;
            const Acc dor = static_cast<Acc>(load(orow + px)) - t;
            row += dl * dl + dor * dor;
          }
        } else {
          for (int64_t px = lane; px < width; px += 32) {
            const Acc l = static_cast<Acc>(load(lr + px));
            const Acc o = static_cast<Acc>(load(orow + px));
            row += l * l + o * o;
          }
        }
        partial += static_cast<double>(row);
      }
    }
    const double total = block_sum(partial, scratch);
    if (threadIdx.x == 0) plane_loss[plane] = static_cast<Acc>(static_cast<double>(weight) * total);
    __syncthreads();  // the next plane reuses sh and scratch
  }
}

template <typename Acc>
__global__ void face_sum_kernel(const Acc* __restrict__ plane_loss, int64_t n, int64_t c, Acc* __restrict__ loss) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0;
    for (int64_t k = 0; k < c; ++k) total += static_cast<double>(plane_loss[i * c + k]);
    loss[i] = static_cast<Acc>(total);
  }
}

// grad_local = 2 w grad[i] (local - T), grad_omega likewise; zero where w = 0.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const Acc* __restrict__ grad, const T* __restrict__ local, const T* __restrict__ omega,
                    const Acc* __restrict__ points, const bool* __restrict__ labelled, int64_t planes, int64_t c,
                    int64_t height, int64_t width, Taps<Acc> taps, T* __restrict__ grad_local,
                    T* __restrict__ grad_omega) {
  __shared__ PlaneShared<Acc> sh;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    Axis<Acc> x, y;
    const Acc weight = setup_plane(points, labelled, plane, c, height, width, taps, sh, x, y);
    const Acc scale = Acc(2) * weight * grad[plane / c];
    const int64_t base = plane * height * width;
    for (int64_t py = warp; py < height; py += kWarps) {
      const int64_t off = base + py * width;
      if (weight == Acc(0)) {
        for (int64_t px = lane; px < width; px += 32) {
          store(grad_local + off + px, Acc(0));
          store(grad_omega + off + px, Acc(0));
        }
      } else if (py >= y.lo && py < y.hi) {
        Acc yrow[kSigmas];
#pragma unroll
        for (int s = 0; s < kSigmas; ++s) yrow[s] = sh.yf[s][py - y.lo];
        for (int64_t px = lane; px < width; px += 32) {
          const Acc t = px >= x.lo && px < x.hi ? target_at(sh, yrow, px - x.lo) : Acc(0);
          store(grad_local + off + px, scale * (static_cast<Acc>(load(local + off + px)) - t));
          store(grad_omega + off + px, scale * (static_cast<Acc>(load(omega + off + px)) - t));
        }
      } else {
        for (int64_t px = lane; px < width; px += 32) {
          store(grad_local + off + px, scale * static_cast<Acc>(load(local + off + px)));
          store(grad_omega + off + px, scale * static_cast<Acc>(load(omega + off + px)));
        }
      }
    }
    __syncthreads();  // the next plane reuses sh
  }
}

unsigned int plane_blocks(int64_t planes) {
  return static_cast<unsigned int>(planes < kMaxBlocks ? planes : kMaxBlocks);
}

template <typename T, typename Acc>
cudaError_t launch_forward(const void* local, const void* omega, const void* points, const bool* labelled, int64_t n,
                           int64_t c, int64_t height, int64_t width, void* plane_loss, void* loss,
                           cudaStream_t stream) {
  const int64_t planes = n * c;
  if (planes > 0) {
    plane_loss_kernel<T, Acc><<<plane_blocks(planes), kThreads, 0, stream>>>(
        static_cast<const T*>(local), static_cast<const T*>(omega), static_cast<const Acc*>(points), labelled,
        planes, c, height, width, host_taps<Acc>(), static_cast<Acc*>(plane_loss));
  }
  const int64_t face_blocks = (n + kThreads - 1) / kThreads;
  face_sum_kernel<Acc><<<plane_blocks(face_blocks), kThreads, 0, stream>>>(static_cast<const Acc*>(plane_loss), n, c,
                                                                           static_cast<Acc*>(loss));
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_backward(const void* grad, const void* local, const void* omega, const void* points,
                            const bool* labelled, int64_t n, int64_t c, int64_t height, int64_t width,
                            void* grad_local, void* grad_omega, cudaStream_t stream) {
  const int64_t planes = n * c;
  if (planes == 0 || height * width == 0) return cudaSuccess;
  backward_kernel<T, Acc><<<plane_blocks(planes), kThreads, 0, stream>>>(
      static_cast<const Acc*>(grad), static_cast<const T*>(local), static_cast<const T*>(omega),
      static_cast<const Acc*>(points), labelled, planes, c, height, width, host_taps<Acc>(),
      static_cast<T*>(grad_local), static_cast<T*>(grad_omega));
  return cudaGetLastError();
}

}  // namespace

cudaError_t lgc_loss_forward_cuda(const void* local, const void* omega, const void* points, const bool* labelled,
                                  ScalarKind kind, int64_t n, int64_t c, int64_t height, int64_t width,
                                  void* plane_loss, void* loss, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch_forward<float, float>(local, omega, points, labelled, n, c, height, width, plane_loss, loss,
                                          stream);
    case ScalarKind::kFloat16:
      return launch_forward<__half, float>(local, omega, points, labelled, n, c, height, width, plane_loss, loss,
                                           stream);
    case ScalarKind::kBFloat16:
      return launch_forward<__nv_bfloat16, float>(local, omega, points, labelled, n, c, height, width, plane_loss,
                                                  loss, stream);
    case ScalarKind::kFloat64:
      return launch_forward<double, double>(local, omega, points, labelled, n, c, height, width, plane_loss, loss,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t lgc_loss_backward_cuda(const void* grad, const void* local, const void* omega, const void* points,
                                   const bool* labelled, ScalarKind kind, int64_t n, int64_t c, int64_t height,
                                   int64_t width, void* grad_local, void* grad_omega, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return launch_backward<float, float>(grad, local, omega, points, labelled, n, c, height, width, grad_local,
                                           grad_omega, stream);
    case ScalarKind::kFloat16:
      return launch_backward<__half, float>(grad, local, omega, points, labelled, n, c, height, width, grad_local,
                                            grad_omega, stream);
    case ScalarKind::kBFloat16:
      return launch_backward<__nv_bfloat16, float>(grad, local, omega, points, labelled, n, c, height, width,
                                                   grad_local, grad_omega, stream);
    case ScalarKind::kFloat64:
      return launch_backward<double, double>(grad, local, omega, points, labelled, n, c, height, width, grad_local,
                                             grad_omega, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lgc
