// CUDA kernels of the conv-block epilogue's passes and of BatchNorm's per-channel terms; see bn_relu_dropout.h, and
// bn_relu_dropout_plan.cuh for the tiling. The mask draws are in keep_masks.cu.
//
// Bandwidth: a thread moves `vec` values (16 bytes where the shape allows) per access and issues the loads of several
// steps before it uses any, so enough bytes are in flight per SM; per-channel values are loaded once into registers,
// and no value needs a division: the seeded draw's (N, C, H, W) index is stepped along with the rows, and the moments'
// Welford updates of a step share one reciprocal of the count (the thread's vec accumulators count alike).
// Reductions: each thread accumulates its values (Welford's update for the moments, plain sums for the gradient),
// the block combines its threads in a fixed tree (Chan's formula for the moments) in float64, and one pair of doubles
// per tile and channel goes to the partials; then one block per channel combines that channel's tiles, again in a
// fixed order, and its thread 0 goes on to BatchNorm's per-channel terms (and the running update), so the training
// op's forward is two reduction launches and the apply, its backward two and the apply (the gradient-sum tiles
// compute BatchNorm's scale and shift from the batch statistics themselves). No atomics: the results are a function
// of the shape and the values alone.
// Measured on an H100 (bench_bn_relu_dropout.py, 64x128x96x96 bf16 channels_last, fwd+bwd): 1.57 ms, 29 % of the
// bandwidth roofline, from 1.92 ms for one 2-byte value per access; in the training step it is worth 1.26x.
// Occupancy (ptxas -v of CUDA 13 for sm_90): the training step's bf16 vec-8 kernels use 93 (moments), 96 (apply,
// drawn bits), 125 (gradient sums) and 128 (gradient apply) registers, so 2 blocks of 256 threads fit an SM (25 %);
// __launch_bounds__ for 3 blocks spills 20-630 bytes a thread in all four, for 4 blocks 172-776. Nsight Compute at
// 128x128x96x96 (session 29): each kernel at 25 % occupancy reaches 50-63 % of the DRAM peak, stalled on its loads
// ~75 % of the time. The LGC_EPILOGUE_* macros below let a build try other steps and blocks a SM
// (LGC_FAST_NVCC_FLAGS, bench/gpu_session.sh epilogue); the defaults are the measured configuration.
#include "cuda/bn_relu_dropout.h"

#include <cuda_runtime.h>

#include <type_traits>

#include "cuda/bn_relu_dropout_plan.cuh"
#include "cuda/bn_relu_dropout_reduce.cuh"
#include "cuda/kernel_common.cuh"

namespace lgc {
namespace bn_epilogue_detail {

#ifndef LGC_EPILOGUE_MOMENTS_STEPS
#define LGC_EPILOGUE_MOMENTS_STEPS 4
#endif
#ifndef LGC_EPILOGUE_APPLY_STEPS
#define LGC_EPILOGUE_APPLY_STEPS 4
#endif
#ifndef LGC_EPILOGUE_GRAD_STEPS
#define LGC_EPILOGUE_GRAD_STEPS 2
#endif
#ifndef LGC_EPILOGUE_MIN_BLOCKS
#define LGC_EPILOGUE_MIN_BLOCKS 1
#endif
// Steps whose loads a thread issues at once (bytes in flight against registers).
constexpr int kMomentsSteps = LGC_EPILOGUE_MOMENTS_STEPS;
constexpr int kApplySteps = LGC_EPILOGUE_APPLY_STEPS;
constexpr int kGradSteps = LGC_EPILOGUE_GRAD_STEPS;
// Blocks a SM that the streaming kernels (moments, gradient sums, both applies) are compiled for: ptxas caps their
// registers to fit that many.
constexpr int kMinBlocks = LGC_EPILOGUE_MIN_BLOCKS;
static_assert(kMomentsSteps >= 1 && kApplySteps >= 1 && kGradSteps >= 1 && kMinBlocks >= 1, "bad LGC_EPILOGUE_*");
// kDrawnBits: the apply pass draws bernoulli keep bits from the seed and writes them (bn_apply_drawn_cuda).
enum DropKind { kNoDrop = 0, kMaskDrop = 1, kBitsDrop = 2, kSeededDrop = 3, kDrawnBits = 4 };

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

// Everything a pass reads and writes; unused pointers stay null. vector_io: every map (and the mask) is aligned for
// Pack accesses of plan.vec values.
template <typename T>
struct Args {
  using Elem = T;
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
  bool vector_io;
  // The training backward's gradient sums: where var is set, scale and shift are not read but computed per thread
  // from the batch statistics (center, var) and BatchNorm's weight and bias, as the forward computed them.
  const Acc<T>* var = nullptr;
  const Acc<T>* weight = nullptr;
  const Acc<T>* bias = nullptr;
  double eps = 0.0;
};

template <typename T>
bool vector_io_ok(const Args<T>& a) {
  const int elem = sizeof(T), vec = a.plan.vec;
  return pack_aligned(a.z, elem, vec) && pack_aligned(a.dy, elem, vec) && pack_aligned(a.out, elem, vec) &&
         pack_aligned(a.dropout.mask, 1, vec);
}

// The per-channel values of a thread's V values: channels c, c + step, ... (step 0 on planar tiles: one channel).
template <int V, typename A>
LGC_HD void load_channels(const A* v, int64_t c, int step, A (&out)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = v[c + k * step];
}

// BatchNorm's scale and shift of a thread's V values (see load_channels): loaded, or computed (Args::var).
template <int V, typename T>
LGC_HD void load_affine(const Args<T>& a, int64_t c, int step, Acc<T> (&scale)[V], Acc<T> (&shift)[V]) {
  using A = Acc<T>;
  if (a.var == nullptr) {
    load_channels<V>(a.scale, c, step, scale);
    load_channels<V>(a.shift, c, step, shift);
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t at = c + k * step;
    const BnAffineAs<A> t = bn_train_affine_as(a.center[at], a.var[at], a.weight[at], a.bias[at], a.eps);
    scale[k] = t.scale;
    shift[k] = t.shift;
  }
}

template <int Drop>
LGC_HD uint64_t load_seed(const EpilogueDropoutCuda& d) {
  if constexpr (Drop == kSeededDrop || Drop == kDrawnBits) {
    return static_cast<uint64_t>(*d.seed);
  } else {
    (void)d;
    return 0;
  }
}

// The drop decisions for the V values at offset i whose first (N, C, H, W) index is `index` (the next ones follow by
// index_step).
// The keep bits of the V values at offset i: one byte read per 8 values where they start a byte (vec 8 and 16, as
// bf16 and fp16 maps of 8 or more channels, or planes of 8 or more pixels, run), one where they lie in a byte.
template <int V>
LGC_HD void load_bits(const uint8_t* bits, int64_t i, bool (&keep)[V]) {
  const int first = static_cast<int>(i & 7);
  if (V % 8 == 0 && first == 0) {
#pragma unroll
    for (int q = 0; q < (V + 7) / 8; ++q) {
      const uint32_t byte = bits[(i >> 3) + q];
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        if (8 * q + b < V) keep[8 * q + b] = ((byte >> b) & 1u) != 0;
      }
    }
  } else if (first + V <= 8) {
    const uint32_t byte = bits[i >> 3];
#pragma unroll
    for (int k = 0; k < V; ++k) keep[k] = ((byte >> (first + k)) & 1u) != 0;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) keep[k] = keep_bit(bits, i + k);
  }
}

template <int Drop, int V>
LGC_HD void load_keep(const EpilogueDropoutCuda& d, bool vector_io, uint64_t seed, int64_t i, uint32_t index,
                      uint32_t index_step, bool (&keep)[V]) {
  if constexpr (Drop == kMaskDrop) {
    uint8_t bytes[V];
    load_values<V>(d.mask + i, vector_io, bytes);
#pragma unroll
    for (int k = 0; k < V; ++k) keep[k] = bytes[k] != 0;
  } else if constexpr (Drop == kBitsDrop) {
    load_bits<V>(d.bits, i, keep);
  } else if constexpr (Drop == kSeededDrop) {
#pragma unroll
    for (int k = 0; k < V; ++k) keep[k] = philox_keep(seed, index + k * index_step, d.p);
  } else if constexpr (Drop == kDrawnBits) {
    // Offsets are multiples of V, so the V values fill whole bytes of bits, which no other thread writes.
    static_assert(V % 8 == 0, "a drawing thread step covers whole bytes");
#pragma unroll
    for (int q = 0; q < V / 8; ++q) {
      const uint8_t byte = bernoulli_bits_byte(seed, d.threshold, (i >> 3) + q);
      d.drawn[(i >> 3) + q] = byte;
#pragma unroll
      for (int b = 0; b < 8; ++b) keep[8 * q + b] = ((byte >> b) & 1u) != 0;
    }
  } else {
    (void)d, (void)vector_io, (void)seed, (void)i, (void)index, (void)index_step;
#pragma unroll
    for (int k = 0; k < V; ++k) keep[k] = true;
  }
}

template <int Drop, int V, typename T>
LGC_HD void apply_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  constexpr int R = kApplySteps;
  const Plan& plan = a.plan;
  const int64_t c = thread_channel(plan, tile, thread);
  if (c < 0) return;
  A scale[V], shift[V];
  load_channels<V>(a.scale, c, plan.channel_step(), scale);
  load_channels<V>(a.shift, c, plan.channel_step(), shift);
  const uint64_t seed = load_seed<Drop>(a.dropout);
  const auto index_step = static_cast<uint32_t>(plan.index_step());
  visit_thread<R>(plan, tile, thread, [&](const int64_t(&offset)[R], const uint32_t(&index)[R], int count) {
    T z[R][V];
    bool keep[R][V];
    // Every step's loads first, then the keep flags: where those are drawn (seeded, drawn bits), the Philox work runs
    // while the loads are in flight (a drawn byte's store may alias z, so no load could move above it).
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < count) load_values<V>(a.z + offset[r], a.vector_io, z[r]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < count) load_keep<Drop, V>(a.dropout, a.vector_io, seed, offset[r], index[r], index_step, keep[r]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < count) {
        T y[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A u = to_acc(z[r][k]) * scale[k] + shift[k];
          // NaN propagates as in torch.relu, and a dropped NaN stays NaN as in torch's `y * mask`.
          A v = (u < A(0) ? A(0) : u) * a.out_scale;
          if constexpr (Drop != kNoDrop) v = keep[r][k] ? v : v * A(0);
          y[k] = from_acc<T>(v);
        }
        store_values<V>(a.out + offset[r], a.vector_io, y);
      }
    }
  });
}

// The gradient at the BatchNorm output: dy * out_scale where the ReLU passed z and dropout kept it, else 0.
template <typename A>
LGC_HD A relu_grad(A dy, A z, A scale, A shift, bool keep, A out_scale) {
  return z * scale + shift > A(0) && keep ? dy * out_scale : A(0);
}

// Calls f(r, k, z, g) for each value of a grad step batch, g as relu_grad: the loads of all R steps come first.
template <int Drop, int V, int R, typename T, typename F>
LGC_HD void grad_steps(const Args<T>& a, uint64_t seed, const Acc<T> (&scale)[V], const Acc<T> (&shift)[V],
                       const int64_t (&offset)[R], const uint32_t (&index)[R], int count, F&& f) {
  const auto index_step = static_cast<uint32_t>(a.plan.index_step());
  T z[R][V], dy[R][V];
  bool keep[R][V];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < count) {
      load_values<V>(a.z + offset[r], a.vector_io, z[r]);
      load_values<V>(a.dy + offset[r], a.vector_io, dy[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {  // after the loads, as in apply_thread: a seeded draw's work overlaps them
    if (r < count) load_keep<Drop, V>(a.dropout, a.vector_io, seed, offset[r], index[r], index_step, keep[r]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < count) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Acc<T> zv = to_acc(z[r][k]);
        f(r, k, zv, relu_grad(to_acc(dy[r][k]), zv, scale[k], shift[k], keep[r][k], a.out_scale));
      }
    }
  }
}

template <int Drop, bool Centered, int V, typename T>
LGC_HD void grad_apply_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  constexpr int R = kGradSteps;
  const Plan& plan = a.plan;
  const int64_t c = thread_channel(plan, tile, thread);
  if (c < 0) return;
  A scale[V], shift[V], k1[V] = {}, k0[V] = {};
  load_channels<V>(a.scale, c, plan.channel_step(), scale);
  load_channels<V>(a.shift, c, plan.channel_step(), shift);
  if constexpr (Centered) {
    load_channels<V>(a.k1, c, plan.channel_step(), k1);
    load_channels<V>(a.k0, c, plan.channel_step(), k0);
  }
  const uint64_t seed = load_seed<Drop>(a.dropout);
  visit_thread<R>(plan, tile, thread, [&](const int64_t(&offset)[R], const uint32_t(&index)[R], int count) {
    T dz[R][V];
    grad_steps<Drop, V, R>(a, seed, scale, shift, offset, index, count, [&](int r, int k, A z, A g) {
      A v = g * scale[k];
      if constexpr (Centered) v += z * k1[k] + k0[k];
      dz[r][k] = from_acc<T>(v);
    });
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < count) store_values<V>(a.out + offset[r], a.vector_io, dz[r]);
    }
  });
}

template <int V, typename T>
LGC_HD ThreadStats<V> moments_thread(const Plan& plan, const T* z, bool vector_io, int64_t tile, int thread) {
  using A = Acc<T>;
  constexpr int R = kMomentsSteps;
  A count = 0, mean[V] = {}, m2[V] = {};
  if (thread_channel(plan, tile, thread) >= 0) {
    visit_thread<R>(plan, tile, thread, [&](const int64_t(&offset)[R], const uint32_t(&)[R], int steps) {
      T x[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < steps) load_values<V>(z + offset[r], vector_io, x[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < steps) {  // Welford's update, one reciprocal for the V accumulators
          count += A(1);
          const A inverse = A(1) / count;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A value = to_acc(x[r][k]);
            const A delta = value - mean[k];
            mean[k] += delta * inverse;
            m2[k] += delta * (value - mean[k]);
          }
        }
      }
    });
  }
  double a[V], b[V];
#pragma unroll
  for (int k = 0; k < V; ++k) a[k] = mean[k], b[k] = m2[k];
  return finish_thread<true, V>(plan, count, a, b);
}

template <int Drop, int V, typename T>
LGC_HD ThreadStats<V> grad_sums_thread(const Args<T>& a, int64_t tile, int thread) {
  using A = Acc<T>;
  constexpr int R = kGradSteps;
  const Plan& plan = a.plan;
  const int64_t c = thread_channel(plan, tile, thread);
  A sum_g[V] = {}, sum_g_centered[V] = {};
  if (c >= 0) {
    A scale[V], shift[V], center[V];
    load_affine<V>(a, c, plan.channel_step(), scale, shift);
    load_channels<V>(a.center, c, plan.channel_step(), center);
    const uint64_t seed = load_seed<Drop>(a.dropout);
    visit_thread<R>(plan, tile, thread, [&](const int64_t(&offset)[R], const uint32_t(&index)[R], int count) {
      grad_steps<Drop, V, R>(a, seed, scale, shift, offset, index, count, [&](int, int k, A z, A g) {
        sum_g[k] += g;
        sum_g_centered[k] += g * (z - center[k]);
      });
    });
  }
  double first[V], second[V];
#pragma unroll
  for (int k = 0; k < V; ++k) first[k] = sum_g[k], second[k] = sum_g_centered[k];
  return finish_thread<false, V>(plan, 0.0, first, second);
}

template <int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) moments_kernel(const T* z, bool vector_io, Plan plan,
                                                                    double* partials) {
  __shared__ BlockShares<V> shared;
  put_shares(shared, threadIdx.x, moments_thread<V>(plan, z, vector_io, blockIdx.x, threadIdx.x));
  reduce_block<true>(shared, plan.cols, plan.lanes, plan.tree_top, plan.width());
  store_partial(plan, shared, blockIdx.x, threadIdx.x, partials);
}

template <int Drop, int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) grad_sums_kernel(Args<T> a, double* partials) {
  __shared__ BlockShares<V> shared;
  put_shares(shared, threadIdx.x, grad_sums_thread<Drop, V>(a, blockIdx.x, threadIdx.x));
  reduce_block<false>(shared, a.plan.cols, a.plan.lanes, a.plan.tree_top, a.plan.width());
  store_partial(a.plan, shared, blockIdx.x, threadIdx.x, partials);
}

// BatchNorm's per-channel terms of channel c (csrc/epilogue.h), in the accumulation type.
template <typename A>
LGC_HD void affine_channel(int64_t c, const A* mean, const A* var, const A* weight, const A* bias, double eps,
                           A* invstd, A* scale, A* shift) {
  const BnAffineAs<A> t = bn_train_affine_as(mean[c], var[c], weight[c], bias[c], eps);
  invstd[c] = t.invstd;
  scale[c] = t.scale;
  shift[c] = t.shift;
}

// The training forward's per-channel terms of channel c from its final mean and var (see BnTrainTermsCuda).
template <typename A>
LGC_HD void train_terms_channel(int64_t c, const A* mean, const A* var, const BnTrainTermsCuda& t) {
  affine_channel(c, mean, var, static_cast<const A*>(t.weight), static_cast<const A*>(t.bias), t.eps,
                 static_cast<A*>(t.invstd), static_cast<A*>(t.scale), static_cast<A*>(t.shift));
  if (t.running_mean == nullptr) return;
  A* running_mean = static_cast<A*>(t.running_mean);
  A* running_var = static_cast<A*>(t.running_var);
  const BnRunning r = bn_running_update(running_mean[c], running_var[c], mean[c], var[c], t.count, t.momentum);
  running_mean[c] = static_cast<A>(r.mean);
  running_var[c] = static_cast<A>(r.var);
}

// The backward's terms of channel c from its final gradient sums (see BnGradTermsCuda): BatchNorm's scale and shift
// again, as the forward stored them, then k1, k0, dweight and dbias from those.
template <typename A>
LGC_HD void backward_terms_channel(int64_t c, const A* sum_g, const A* sum_g_centered, const BnGradTermsCuda& t) {
  const A* mean = static_cast<const A*>(t.mean);
  const A* var = static_cast<const A*>(t.var);
  const BnAffineAs<A> f = bn_train_affine_as(mean[c], var[c], static_cast<const A*>(t.weight)[c],
                                             static_cast<const A*>(t.bias)[c], t.eps);
  static_cast<A*>(t.scale)[c] = f.scale;
  static_cast<A*>(t.shift)[c] = f.shift;
  const BnGradTerms g = bn_train_grad_terms(f.invstd, f.scale, mean[c], sum_g[c], sum_g_centered[c], t.count);
  static_cast<A*>(t.k1)[c] = static_cast<A>(g.k1);
  static_cast<A*>(t.k0)[c] = static_cast<A>(g.k0);
  static_cast<A*>(t.dweight)[c] = static_cast<A>(g.dweight);
  static_cast<A*>(t.dbias)[c] = static_cast<A>(g.dbias);
}

// One block per channel (blockIdx.x = c); thread 0 also computes the terms from the channel's results: the training
// terms after the moments (Terms = BnTrainTermsCuda), the backward's after the gradient sums where their outputs are
// given (BnGradTermsCuda; the standalone gradient-sum op has none).
template <bool Moments, typename A, typename Terms>
__global__ void __launch_bounds__(kThreads) channel_kernel(Plan plan, const double* partials, A* first, A* second,
                                                           Terms terms) {
  __shared__ BlockShares<1> shared;
  const int64_t c = blockIdx.x;
  put_shares(shared, threadIdx.x, channel_thread<Moments>(plan, partials, c, threadIdx.x));
  reduce_block<Moments>(shared, 1, kThreads, kThreads / 2, 1);
  if (threadIdx.x != 0) return;
  finish_channel<Moments>(shared, first + c, second + c);
  if constexpr (Moments) {
    train_terms_channel(c, first, second, terms);
  } else {
    if (terms.k1 != nullptr) backward_terms_channel(c, first, second, terms);
  }
}

template <int Drop, int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) apply_kernel(Args<T> a) {
  apply_thread<Drop, V>(a, blockIdx.x, threadIdx.x);
}

template <int Drop, bool Centered, int V, typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) grad_apply_kernel(Args<T> a) {
  grad_apply_thread<Drop, Centered, V>(a, blockIdx.x, threadIdx.x);
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
  if (d.bits != nullptr) return f(std::integral_constant<int, kBitsDrop>{});
  if (d.seed != nullptr) return f(std::integral_constant<int, kSeededDrop>{});
  return f(std::integral_constant<int, kNoDrop>{});
}

template <typename T>
Args<T> make_args(const Plan& plan, const void* z, const void* dy, void* out, const void* scale, const void* shift,
                  const void* center, const void* k1, const void* k0, double out_scale,
                  const EpilogueDropoutCuda& dropout) {
  using A = Acc<T>;
  Args<T> a{plan,
            static_cast<const T*>(z),
            static_cast<const T*>(dy),
            static_cast<T*>(out),
            static_cast<const A*>(scale),
            static_cast<const A*>(shift),
            static_cast<const A*>(center),
            static_cast<const A*>(k1),
            static_cast<const A*>(k0),
            static_cast<A>(out_scale),
            dropout,
            false};
  a.vector_io = vector_io_ok(a);
  return a;
}

// The launch of a pass that reads per-channel vectors (apply, grad sums, grad apply): for `kind`'s element type T,
// checks the plan, then calls f(args, blocks, vec tag, drop tag) with the pass's Args<T>.
template <typename F>
cudaError_t on_pass(ScalarKind kind, EpilogueShape shape, const void* z, const void* dy, void* out, const void* scale,
                    const void* shift, const void* center, const void* k1, const void* k0, double out_scale,
                    const EpilogueDropoutCuda& dropout, F&& f) {
  return on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    const Launch launch = plan_launch(shape, sizeof(T));
    if (launch.done) return launch.err;
    const auto blocks = static_cast<unsigned>(launch.plan.tiles());
    const Args<T> a = make_args<T>(launch.plan, z, dy, out, scale, shift, center, k1, k0, out_scale, dropout);
    return on_vec<T>(launch.plan.vec, [&](auto vec) {
      return on_drop(dropout, [&](auto drop) { return f(a, blocks, vec, drop); });
    });
  });
}

// The gradient sums' two launches for `a` (with `terms` for the channel kernel: their outputs may be null).
template <typename T, int Drop, int V>
cudaError_t launch_grad_sums(const Args<T>& a, unsigned blocks, double* partials, void* sum_g, void* sum_g_centered,
                             const BnGradTermsCuda& terms, cudaStream_t stream) {
  using A = Acc<T>;
  grad_sums_kernel<Drop, V, T><<<blocks, kThreads, 0, stream>>>(a, partials);
  channel_kernel<false, A><<<static_cast<unsigned>(a.plan.s.c), kThreads, 0, stream>>>(
      a.plan, partials, static_cast<A*>(sum_g), static_cast<A*>(sum_g_centered), terms);
  return cudaGetLastError();
}

}  // namespace bn_epilogue_detail

namespace d = bn_epilogue_detail;

int64_t bn_epilogue_partials(EpilogueShape shape) {
  const d::Plan plan = d::make_plan(shape, 1);  // per_channel() does not depend on the element size
  return 2 * shape.c * plan.per_channel();
}

cudaError_t bn_moments_cuda(const void* z, ScalarKind kind, EpilogueShape shape, double* partials, void* mean,
                            void* var, const BnTrainTermsCuda& terms, cudaStream_t stream) {
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    using A = d::Acc<T>;
    const d::Launch launch = d::plan_launch(shape, sizeof(T));
    if (launch.done) return launch.err;
    const auto blocks = static_cast<unsigned>(launch.plan.tiles());
    const bool vector_io = d::pack_aligned(z, sizeof(T), launch.plan.vec);
    return d::on_vec<T>(launch.plan.vec, [&](auto vec) {
      d::moments_kernel<decltype(vec)::value, T>
          <<<blocks, d::kThreads, 0, stream>>>(static_cast<const T*>(z), vector_io, launch.plan, partials);
      d::channel_kernel<true, A><<<static_cast<unsigned>(shape.c), d::kThreads, 0, stream>>>(
          launch.plan, partials, static_cast<A*>(mean), static_cast<A*>(var), terms);
      return cudaGetLastError();
    });
  });
}

cudaError_t bn_apply_cuda(const void* z, ScalarKind kind, const void* scale, const void* shift,
                          EpilogueDropoutCuda dropout, double out_scale, void* y, EpilogueShape shape,
                          cudaStream_t stream) {
  return d::on_pass(kind, shape, z, nullptr, y, scale, shift, nullptr, nullptr, nullptr, out_scale, dropout,
                    [&](const auto& a, unsigned blocks, auto vec, auto drop) {
                      using T = typename std::decay_t<decltype(a)>::Elem;
                      d::apply_kernel<decltype(drop)::value, decltype(vec)::value, T>
                          <<<blocks, d::kThreads, 0, stream>>>(a);
                      return cudaGetLastError();
                    });
}

cudaError_t bn_apply_drawn_cuda(const void* z, ScalarKind kind, const void* scale, const void* shift,
                                const int64_t* seed, float p, double out_scale, void* y, uint8_t* bits,
                                EpilogueShape shape, cudaStream_t stream) {
  constexpr int kByteVec = 8;  // values of a byte of bits: the thread steps that cover whole bytes
  const bool two_byte = kind == ScalarKind::kFloat16 || kind == ScalarKind::kBFloat16;
  if (!two_byte || d::make_plan(shape, 2).vec != kByteVec) {
    const cudaError_t err = bernoulli_keep_bits_cuda(seed, p, shape.n * shape.c * shape.p, bits, stream);
    if (err != cudaSuccess) return err;
    return bn_apply_cuda(z, kind, scale, shift, EpilogueDropoutCuda{nullptr, bits, nullptr, p}, out_scale, y, shape,
                         stream);
  }
  EpilogueDropoutCuda dropout{nullptr, nullptr, seed, p};
  dropout.drawn = bits;
  dropout.threshold = bernoulli_threshold(p);
  return d::on_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) != 2) {
      return cudaErrorInvalidValue;
    } else {
      const d::Launch launch = d::plan_launch(shape, sizeof(T));
      if (launch.done) return launch.err;
      const d::Args<T> a = d::make_args<T>(launch.plan, z, nullptr, y, scale, shift, nullptr, nullptr, nullptr,
                                           out_scale, dropout);
      d::apply_kernel<d::kDrawnBits, kByteVec, T>
          <<<static_cast<unsigned>(launch.plan.tiles()), d::kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
  });
}

cudaError_t bn_grad_sums_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                              EpilogueDropoutCuda dropout, const void* center, double out_scale, EpilogueShape shape,
                              double* partials, void* sum_g, void* sum_g_centered, cudaStream_t stream) {
  return d::on_pass(kind, shape, z, dy, nullptr, scale, shift, center, nullptr, nullptr, out_scale, dropout,
                    [&](const auto& a, unsigned blocks, auto vec, auto drop) {
                      using T = typename std::decay_t<decltype(a)>::Elem;
                      return d::launch_grad_sums<T, decltype(drop)::value, decltype(vec)::value>(
                          a, blocks, partials, sum_g, sum_g_centered, BnGradTermsCuda{}, stream);
                    });
}

cudaError_t bn_train_grad_sums_cuda(const void* dy, const void* z, ScalarKind kind, EpilogueDropoutCuda dropout,
                                    double out_scale, EpilogueShape shape, double* partials, void* sum_g,
                                    void* sum_g_centered, const BnGradTermsCuda& terms, cudaStream_t stream) {
  return d::on_pass(kind, shape, z, dy, nullptr, nullptr, nullptr, terms.mean, nullptr, nullptr, out_scale, dropout,
                    [&](const auto& a, unsigned blocks, auto vec, auto drop) {
                      using T = typename std::decay_t<decltype(a)>::Elem;
                      using A = d::Acc<T>;
                      d::Args<T> train = a;
                      train.var = static_cast<const A*>(terms.var);
                      train.weight = static_cast<const A*>(terms.weight);
                      train.bias = static_cast<const A*>(terms.bias);
                      train.eps = terms.eps;
                      return d::launch_grad_sums<T, decltype(drop)::value, decltype(vec)::value>(
                          train, blocks, partials, sum_g, sum_g_centered, terms, stream);
                    });
}

cudaError_t bn_grad_apply_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                               EpilogueDropoutCuda dropout, const void* k1, const void* k0, double out_scale,
                               void* dz, EpilogueShape shape, cudaStream_t stream) {
  if ((k1 == nullptr) != (k0 == nullptr)) return cudaErrorInvalidValue;
  return d::on_pass(kind, shape, z, dy, dz, scale, shift, nullptr, k1, k0, out_scale, dropout,
                    [&](const auto& a, unsigned blocks, auto vec, auto drop) {
                      using T = typename std::decay_t<decltype(a)>::Elem;
                      constexpr int kDrop = decltype(drop)::value, kVec = decltype(vec)::value;
                      if (k1 != nullptr) {
                        d::grad_apply_kernel<kDrop, true, kVec, T><<<blocks, d::kThreads, 0, stream>>>(a);
                      } else {
                        d::grad_apply_kernel<kDrop, false, kVec, T><<<blocks, d::kThreads, 0, stream>>>(a);
                      }
                      return cudaGetLastError();
                    });
}

}  // namespace lgc
