// CUDA kernels of the conv-block epilogue; see bn_relu_dropout.h.
//
// One tiling plan per shape serves every pass, so a value's tile, partial slot and summation order are the same on
// any GPU:
//   planar         a tile is a run of at most kPlanarTile pixels of one (image, channel) plane; the block's threads
//                  stride along it (coalesced loads, one channel per block).
//   channels_last  a tile is a run of `len` pixel rows times `cols` = min(C, 256) channels; thread t owns channel
//                  t % cols and strides over the rows by lanes = 256 / cols, so when cols = C a block reads
//                  lanes * C consecutive values at a time.
// Either way a thread keeps one channel, so per-channel values are loaded once into registers, and no value needs a
// division: the seeded draw's (N, C, H, W) index is stepped along with the rows.
// Reductions: each thread accumulates its values (Welford's update for the moments, plain sums for the gradient),
// the block combines its threads in a fixed tree (Chan's formula for the moments) in float64, and one pair of doubles
// per tile and channel goes to the partials; then one block per channel combines that channel's tiles, again in a
// fixed order. Loads are scalar; every load of a warp is one contiguous run.
// The per-thread steps are __host__ __device__: tests/cpp/test_bn_relu_dropout_cuda_emulation.cu runs the kernels
// block by block on the CPU against a float64 oracle.
// GPU timings are UNMEASURED (written where no GPU was available): bench/bench_bn_relu_dropout.py measures them.
#include "cuda/bn_relu_dropout.h"

#include <cuda_runtime.h>

#include <climits>
#include <type_traits>

#include "cuda/kernel_common.cuh"

namespace lgc {
namespace bn_epilogue_detail {

constexpr int kThreads = 256;
constexpr int64_t kPlanarTile = 16384;  // pixels of one plane a tile holds at most
constexpr int64_t kTargetTiles = 2048;  // channels_last: tiles per channel block a pass aims for
constexpr int64_t kMinRowsPerLane = 8;  // channels_last: the shortest row run a thread walks in a tile
enum DropKind { kNoDrop = 0, kMaskDrop = 1, kSeededDrop = 2 };

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

struct Plan {
  EpilogueShape s;
  int64_t len;             // planar: pixels a tile; channels_last: rows (pixels with all their channels) a tile
  int64_t chunks;          // planar: tiles a plane; channels_last: row runs over all N * P rows
  int64_t channel_blocks;  // channels_last: tiles side by side across the channels; planar: 1
  int cols;                // channels a block covers side by side (planar: 1)
  int lanes;               // threads of a block per channel (planar: all)
  int tree_top;            // the block tree's first step: the largest power of two below lanes (0 for one lane)

  LGC_HD int64_t tiles() const { return s.channels_last ? chunks * channel_blocks : s.n * s.c * chunks; }
  LGC_HD int64_t per_channel() const { return s.channels_last ? chunks : s.n * chunks; }  // partial slots
  // Values of a channel in partial slot `slot` (planar: slot n * chunks + chunk; channels_last: slot = chunk).
  LGC_HD int64_t slot_count(int64_t slot) const {
    const int64_t total = s.channels_last ? s.n * s.p : s.p;
    const int64_t first = (slot % chunks) * len;
    return total - first < len ? total - first : len;
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Plan make_plan(EpilogueShape s) {
  Plan plan{};
  plan.s = s;
  if (!s.channels_last) {
    plan.chunks = s.p > 0 ? ceil_div(s.p, kPlanarTile) : 1;
    plan.len = s.p > 0 ? ceil_div(s.p, plan.chunks) : 1;  // equal runs: no short last tile
    plan.channel_blocks = 1;
    plan.cols = 1;
    plan.lanes = kThreads;
  } else {
    plan.cols = static_cast<int>(s.c < kThreads ? s.c : kThreads);
    plan.lanes = kThreads / plan.cols;
    plan.channel_blocks = ceil_div(s.c, plan.cols);
    const int64_t rows = s.n * s.p;
    const int64_t runs = kTargetTiles / plan.channel_blocks > 1 ? kTargetTiles / plan.channel_blocks : 1;
    int64_t len = ceil_div(rows, runs);
    if (len < plan.lanes * kMinRowsPerLane) len = plan.lanes * kMinRowsPerLane;
    plan.len = len < rows ? len : (rows > 0 ? rows : 1);
    plan.chunks = rows > 0 ? ceil_div(rows, plan.len) : 1;
  }
  plan.tree_top = 0;
  if (plan.lanes > 1) {
    plan.tree_top = 1;
    while (plan.tree_top * 2 < plan.lanes) plan.tree_top *= 2;
  }
  return plan;
}

// The channel thread `thread` of tile `tile` works on, or -1 when it has none (channels_last blocks may have spare
// threads, and channels past C in the last channel block).
LGC_HD int64_t thread_channel(const Plan& plan, int64_t tile, int thread) {
  if (!plan.s.channels_last) return (tile / plan.chunks) % plan.s.c;
  const int64_t c = (tile % plan.channel_blocks) * plan.cols + thread % plan.cols;
  return thread / plan.cols < plan.lanes && c < plan.s.c ? c : -1;
}

// Calls f(offset, index) for each value of tile `tile` that thread `thread` owns (call only when thread_channel is
// not -1): offset into the maps, index in (N, C, H, W) order.
template <typename F>
LGC_HD void visit_thread(const Plan& plan, int64_t tile, int thread, F&& f) {
  const EpilogueShape& s = plan.s;
  if (!s.channels_last) {
    const int64_t first = (tile % plan.chunks) * plan.len;
    const int64_t begin = (tile / plan.chunks) * s.p + first;
    const int64_t end = begin + (s.p - first < plan.len ? s.p - first : plan.len);
    for (int64_t i = begin + thread; i < end; i += kThreads) f(i, i);
    return;
  }
  const int64_t c = (tile % plan.channel_blocks) * plan.cols + thread % plan.cols;
  const int64_t chunk = tile / plan.channel_blocks;
  const int64_t rows = s.n * s.p;
  const int64_t end = (chunk + 1) * plan.len < rows ? (chunk + 1) * plan.len : rows;
  int64_t row = chunk * plan.len + thread / plan.cols;
  int64_t image = row / s.p;
  int64_t pixel = row - image * s.p;
  for (; row < end; row += plan.lanes) {
    f(row * s.c + c, (image * s.c + c) * s.p + pixel);
    pixel += plan.lanes;  // the index is stepped: no division per value
    while (pixel >= s.p) {
      pixel -= s.p;
      ++image;
    }
  }
}

// Everything a pass reads and writes; unused pointers stay null.
template <typename T>
struct Args {
  Plan plan;
  const T* z;
  const T* dy;
  T* out;
  const Acc<T>* scale;
  const Acc<T>* shift;
  const Acc<T>* center;  // grad sums: the centre of sum g * (z - center)
  const Acc<T>* k1;      // grad apply: the statistics' share k1 * z + k0 (read only when centered)
  const Acc<T>* k0;
  Acc<T> out_scale;
  EpilogueDropoutCuda dropout;
};

template <int Drop>
LGC_HD uint64_t load_seed(const EpilogueDropoutCuda& d) {
  if constexpr (Drop == kSeededDrop) {
    return static_cast<uint64_t>(*d.seed);
  } else {
    (void)d;
    return 0;
  }
}

// The drop decision for the value at offset i, (N, C, H, W) index `index`.
template <int Drop>
LGC_HD bool kept(const EpilogueDropoutCuda& d, uint64_t seed, int64_t i, int64_t index) {
  if constexpr (Drop == kMaskDrop) {
    return d.mask[i] != 0;
  } else if constexpr (Drop == kSeededDrop) {
    return philox_keep(seed, static_cast<uint32_t>(index), d.p);
  } else {
    (void)d, (void)seed, (void)i, (void)index;
    return true;
  }
}

template <int Drop, typename T>
LGC_HD void apply_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  const int64_t c = thread_channel(a.plan, tile, thread);
  if (c < 0) return;
  const A scale = a.scale[c], shift = a.shift[c];
  const uint64_t seed = load_seed<Drop>(a.dropout);
  visit_thread(a.plan, tile, thread, [&](int64_t i, int64_t index) {
    const A u = to_acc(a.z[i]) * scale + shift;
    // NaN propagates as in torch.relu, and a dropped NaN stays NaN as in torch's `y * mask`.
    A v = (u < A(0) ? A(0) : u) * a.out_scale;
    if constexpr (Drop != kNoDrop) v = kept<Drop>(a.dropout, seed, i, index) ? v : v * A(0);
    a.out[i] = from_acc<T>(v);
  });
}

// The gradient at the BatchNorm output: dy * out_scale where the ReLU passed z and dropout kept it, else 0.
template <int Drop, typename T>
LGC_HD Acc<T> relu_grad(const Args<T>& a, Acc<T> z, Acc<T> scale, Acc<T> shift, uint64_t seed, int64_t i,
                        int64_t index) {
  using A = Acc<T>;
  const bool live = z * scale + shift > A(0) && kept<Drop>(a.dropout, seed, i, index);
  return live ? to_acc(a.dy[i]) * a.out_scale : A(0);
}

template <int Drop, bool Centered, typename T>
LGC_HD void grad_apply_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  const int64_t c = thread_channel(a.plan, tile, thread);
  if (c < 0) return;
  const A scale = a.scale[c], shift = a.shift[c];
  const A k1 = Centered ? a.k1[c] : A(0), k0 = Centered ? a.k0[c] : A(0);
  const uint64_t seed = load_seed<Drop>(a.dropout);
  visit_thread(a.plan, tile, thread, [&](int64_t i, int64_t index) {
    const A z = to_acc(a.z[i]);
    A v = relu_grad<Drop>(a, z, scale, shift, seed, i, index) * scale;
    if constexpr (Centered) v += z * k1 + k0;
    a.out[i] = from_acc<T>(v);
  });
}

LGC_HD void keep_mask_thread(const Plan& plan, const int64_t* seed_ptr, float p, uint8_t* keep, int64_t tile,
                             int thread) {
  if (thread_channel(plan, tile, thread) < 0) return;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  visit_thread(plan, tile, thread,
               [&](int64_t i, int64_t index) { keep[i] = philox_keep(seed, static_cast<uint32_t>(index), p); });
}

// A thread's, a block's or a channel's share of a reduction. Moments: (count, mean, M2); sums: (count, sum g,
// sum g * (z - center)).
struct Stats {
  double count;
  double a;
  double b;
};

template <bool Moments>
LGC_HD Stats combine(const Stats& x, const Stats& y) {
  if constexpr (Moments) {  // Chan's formula
    if (y.count == 0) return x;
    if (x.count == 0) return y;
    const double n = x.count + y.count;
    const double delta = y.a - x.a;
    return {n, x.a + delta * (y.count / n), x.b + y.b + delta * delta * (x.count * y.count / n)};
  } else {
    return {x.count + y.count, x.a + y.a, x.b + y.b};
  }
}

template <typename T>
LGC_HD Stats moments_thread(const Plan& plan, const T* z, int64_t tile, int thread) {
  using A = Acc<T>;
  A count = 0, mean = 0, m2 = 0;
  if (thread_channel(plan, tile, thread) >= 0) {
    visit_thread(plan, tile, thread, [&](int64_t i, int64_t) {  // Welford's update
      const A x = to_acc(z[i]);
      count += A(1);
      const A delta = x - mean;
      mean += delta / count;
      m2 += delta * (x - mean);
    });
  }
  return {static_cast<double>(count), static_cast<double>(mean), static_cast<double>(m2)};
}

template <int Drop, typename T>
LGC_HD Stats grad_sums_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  const int64_t c = thread_channel(a.plan, tile, thread);
  A sum_g = 0, sum_g_centered = 0;
  if (c >= 0) {
    const A scale = a.scale[c], shift = a.shift[c], center = a.center[c];
    const uint64_t seed = load_seed<Drop>(a.dropout);
    visit_thread(a.plan, tile, thread, [&](int64_t i, int64_t index) {
      const A z = to_acc(a.z[i]);
      const A g = relu_grad<Drop>(a, z, scale, shift, seed, i, index);
      sum_g += g;
      sum_g_centered += g * (z - center);
    });
  }
  return {0.0, static_cast<double>(sum_g), static_cast<double>(sum_g_centered)};
}

// One step of the block tree: shared[lane * cols + col] takes in lane + step of its column. After the steps
// tree_top, tree_top / 2, ..., 1 (a barrier after each), lane 0 of each column holds the column's total.
template <bool Moments>
LGC_HD void tree_step(Stats* shared, int thread, int step, int cols, int lanes) {
  const int lane = thread / cols;
  if (lane < step && lane + step < lanes) {
    shared[thread] = combine<Moments>(shared[thread], shared[thread + step * cols]);
  }
}

// Lane 0 of each column writes its tile's (a, b) for its channel to partials[2 * (c * per_channel + slot)].
LGC_HD void store_partial(const Plan& plan, const Stats* shared, int64_t tile, int thread, double* partials) {
  if (thread >= plan.cols) return;
  const EpilogueShape& s = plan.s;
  int64_t c, slot;
  if (!s.channels_last) {
    const int64_t plane = tile / plan.chunks;
    c = plane % s.c;
    slot = (plane / s.c) * plan.chunks + tile % plan.chunks;
  } else {
    c = (tile % plan.channel_blocks) * plan.cols + thread;
    if (c >= s.c) return;
    slot = tile / plan.channel_blocks;
  }
  double* at = partials + 2 * (c * plan.per_channel() + slot);
  at[0] = shared[thread].a;
  at[1] = shared[thread].b;
}

// Thread `thread`'s share of channel c's partial slots thread, thread + kThreads, ..., combined in that order.
template <bool Moments>
LGC_HD Stats channel_thread(const Plan& plan, const double* partials, int64_t c, int thread) {
  Stats total{0.0, 0.0, 0.0};
  const int64_t slots = plan.per_channel();
  for (int64_t slot = thread; slot < slots; slot += kThreads) {
    const double* at = partials + 2 * (c * slots + slot);
    total = combine<Moments>(total, Stats{static_cast<double>(plan.slot_count(slot)), at[0], at[1]});
  }
  return total;
}

// The channel's results from its total: (mean, biased variance) or (sum g, sum g * (z - center)).
template <bool Moments, typename A>
LGC_HD void finish_channel(const Stats& total, A* first, A* second) {
  *first = static_cast<A>(total.a);
  *second = static_cast<A>(Moments ? total.b / total.count : total.b);
}

template <bool Moments>
__device__ __forceinline__ void reduce_block(Stats* shared, int cols, int lanes, int top) {
  __syncthreads();
  for (int step = top; step > 0; step >>= 1) {
    tree_step<Moments>(shared, threadIdx.x, step, cols, lanes);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* z, Plan plan, double* partials) {
  __shared__ Stats shared[kThreads];
  shared[threadIdx.x] = moments_thread(plan, z, blockIdx.x, threadIdx.x);
  reduce_block<true>(shared, plan.cols, plan.lanes, plan.tree_top);
  store_partial(plan, shared, blockIdx.x, threadIdx.x, partials);
}

template <int Drop, typename T>
__global__ void __launch_bounds__(kThreads) grad_sums_kernel(Args<T> a, double* partials) {
  __shared__ Stats shared[kThreads];
  shared[threadIdx.x] = grad_sums_thread<Drop>(a, blockIdx.x, threadIdx.x);
  reduce_block<false>(shared, a.plan.cols, a.plan.lanes, a.plan.tree_top);
  store_partial(a.plan, shared, blockIdx.x, threadIdx.x, partials);
}

// One block per channel (blockIdx.x = c).
template <bool Moments, typename A>
__global__ void __launch_bounds__(kThreads) channel_kernel(Plan plan, const double* partials, A* first, A* second) {
  __shared__ Stats shared[kThreads];
  const int64_t c = blockIdx.x;
  shared[threadIdx.x] = channel_thread<Moments>(plan, partials, c, threadIdx.x);
  reduce_block<Moments>(shared, 1, kThreads, kThreads / 2);
  if (threadIdx.x == 0) finish_channel<Moments>(shared[0], first + c, second + c);
}

template <int Drop, typename T>
__global__ void __launch_bounds__(kThreads) apply_kernel(Args<T> a) {
  apply_thread<Drop>(a, blockIdx.x, threadIdx.x);
}

template <int Drop, bool Centered, typename T>
__global__ void __launch_bounds__(kThreads) grad_apply_kernel(Args<T> a) {
  grad_apply_thread<Drop, Centered>(a, blockIdx.x, threadIdx.x);
}

__global__ void __launch_bounds__(kThreads) keep_mask_kernel(Plan plan, const int64_t* seed, float p,
                                                             uint8_t* keep) {
  keep_mask_thread(plan, seed, p, keep, blockIdx.x, threadIdx.x);
}

// Calls f(element type tag) for `kind`.
template <typename F>
cudaError_t on_kind(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kFloat16:
      return f(__half{});
    case ScalarKind::kBFloat16:
      return f(__nv_bfloat16{});
    case ScalarKind::kFloat64:
      return f(double{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t on_drop(const EpilogueDropoutCuda& d, F&& f) {
  if (d.mask != nullptr) return f(std::integral_constant<int, kMaskDrop>{});
  if (d.seed != nullptr) return f(std::integral_constant<int, kSeededDrop>{});
  return f(std::integral_constant<int, kNoDrop>{});
}

// The plan of a launch, or an error: nothing to do (cudaSuccess, reported as done = true) or a grid too large.
struct Launch {
  Plan plan;
  bool done;
  cudaError_t err;
};

inline Launch plan_launch(EpilogueShape shape) {
  const Plan plan = make_plan(shape);
  if (shape.n <= 0 || shape.c <= 0 || shape.p <= 0) return {plan, true, cudaSuccess};
  if (plan.tiles() > INT_MAX || shape.c > INT_MAX) return {plan, true, cudaErrorInvalidConfiguration};
  return {plan, false, cudaSuccess};
}

template <typename T>
Args<T> make_args(const Plan& plan, const void* z, const void* dy, void* out, const void* scale, const void* shift,
                  const void* center, const void* k1, const void* k0, double out_scale,
                  const EpilogueDropoutCuda& dropout) {
  using A = Acc<T>;
  return Args<T>{plan,
                 static_cast<const T*>(z),
                 static_cast<const T*>(dy),
                 static_cast<T*>(out),
                 static_cast<const A*>(scale),
                 static_cast<const A*>(shift),
                 static_cast<const A*>(center),
                 static_cast<const A*>(k1),
                 static_cast<const A*>(k0),
                 static_cast<A>(out_scale),
                 dropout};
}

}  // namespace bn_epilogue_detail

namespace d = bn_epilogue_detail;

int64_t bn_epilogue_partials(EpilogueShape shape) {
  const d::Plan plan = d::make_plan(shape);
  return 2 * shape.c * plan.per_channel();
}

cudaError_t bn_moments_cuda(const void* z, ScalarKind kind, EpilogueShape shape, double* partials, void* mean,
                            void* var, cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape);
  if (launch.done) return launch.err;
  const auto blocks = static_cast<unsigned>(launch.plan.tiles());
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    using A = d::Acc<T>;
    d::moments_kernel<T><<<blocks, d::kThreads, 0, stream>>>(static_cast<const T*>(z), launch.plan, partials);
    d::channel_kernel<true, A><<<static_cast<unsigned>(shape.c), d::kThreads, 0, stream>>>(
        launch.plan, partials, static_cast<A*>(mean), static_cast<A*>(var));
    return cudaGetLastError();
  });
}

cudaError_t bn_apply_cuda(const void* z, ScalarKind kind, const void* scale, const void* shift,
                          EpilogueDropoutCuda dropout, double out_scale, void* y, EpilogueShape shape,
                          cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape);
  if (launch.done) return launch.err;
  const auto blocks = static_cast<unsigned>(launch.plan.tiles());
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    const d::Args<T> a = d::make_args<T>(launch.plan, z, nullptr, y, scale, shift, nullptr, nullptr, nullptr,
                                         out_scale, dropout);
    return d::on_drop(dropout, [&](auto drop) {
      d::apply_kernel<decltype(drop)::value, T><<<blocks, d::kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

cudaError_t bn_grad_sums_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                              EpilogueDropoutCuda dropout, const void* center, double out_scale, EpilogueShape shape,
                              double* partials, void* sum_g, void* sum_g_centered, cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape);
  if (launch.done) return launch.err;
  const auto blocks = static_cast<unsigned>(launch.plan.tiles());
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    using A = d::Acc<T>;
    const d::Args<T> a = d::make_args<T>(launch.plan, z, dy, nullptr, scale, shift, center, nullptr, nullptr,
                                         out_scale, dropout);
    return d::on_drop(dropout, [&](auto drop) {
      d::grad_sums_kernel<decltype(drop)::value, T><<<blocks, d::kThreads, 0, stream>>>(a, partials);
      d::channel_kernel<false, A><<<static_cast<unsigned>(shape.c), d::kThreads, 0, stream>>>(
          launch.plan, partials, static_cast<A*>(sum_g), static_cast<A*>(sum_g_centered));
      return cudaGetLastError();
    });
  });
}

cudaError_t bn_grad_apply_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                               EpilogueDropoutCuda dropout, const void* k1, const void* k0, double out_scale,
                               void* dz, EpilogueShape shape, cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape);
  if (launch.done) return launch.err;
  if ((k1 == nullptr) != (k0 == nullptr)) return cudaErrorInvalidValue;
  const auto blocks = static_cast<unsigned>(launch.plan.tiles());
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    const d::Args<T> a = d::make_args<T>(launch.plan, z, dy, dz, scale, shift, nullptr, k1, k0, out_scale, dropout);
    return d::on_drop(dropout, [&](auto drop) {
      constexpr int kDrop = decltype(drop)::value;
      if (k1 != nullptr) {
        d::grad_apply_kernel<kDrop, true, T><<<blocks, d::kThreads, 0, stream>>>(a);
      } else {
        d::grad_apply_kernel<kDrop, false, T><<<blocks, d::kThreads, 0, stream>>>(a);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t dropout_keep_mask_cuda(const int64_t* seed, float p, EpilogueShape shape, uint8_t* keep,
                                   cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape);
  if (launch.done) return launch.err;
  d::keep_mask_kernel<<<static_cast<unsigned>(launch.plan.tiles()), d::kThreads, 0, stream>>>(launch.plan, seed, p,
                                                                                              keep);
  return cudaGetLastError();
}

}  // namespace lgc
