// The block and channel reductions of the epilogue's moments and gradient-sum passes (csrc/cuda/bn_relu_dropout.cu):
// a thread's shares, the block's fixed tree over them in float64 (Chan's formula for the moments, plain sums for the
// gradient), the tiles' partials and their combination per channel, always in the same order, so the results depend
// on the shape and the values alone. Device and host (emulation) code alike; see bn_relu_dropout_plan.cuh for the
// tiling.
#pragma once

#include <cstdint>

#include "cuda/bn_relu_dropout_plan.cuh"
#include "cuda/kernel_common.cuh"

namespace lgc {
namespace bn_epilogue_detail {

// A share of a reduction. Moments: (count, mean, M2); sums: (count, sum g, sum g * (z - center)).
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

// A thread's shares of its V channels, which count alike. Planar threads fold their V accumulators (all of one
// channel) into share 0.
template <int V>
struct ThreadStats {
  double count;
  double a[V];
  double b[V];
};

// A block's shares, thread t's channel k at [k][t] (consecutive threads, consecutive banks).
template <int V>
struct BlockShares {
  double count[kThreads];
  double a[V][kThreads];
  double b[V][kThreads];
};

template <int V>
LGC_HD void put_shares(BlockShares<V>& shared, int thread, const ThreadStats<V>& mine) {
  shared.count[thread] = mine.count;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    shared.a[k][thread] = mine.a[k];
    shared.b[k][thread] = mine.b[k];
  }
}

template <bool Moments, int V>
LGC_HD ThreadStats<V> finish_thread(const Plan& plan, double count, const double (&a)[V], const double (&b)[V]) {
  ThreadStats<V> mine{count, {}, {}};
  if (plan.s.channels_last) {
#pragma unroll
    for (int k = 0; k < V; ++k) mine.a[k] = a[k], mine.b[k] = b[k];
  } else {
    Stats folded{count, a[0], b[0]};
#pragma unroll
    for (int k = 1; k < V; ++k) folded = combine<Moments>(folded, Stats{count, a[k], b[k]});
    mine.count = folded.count;
    mine.a[0] = folded.a;
    mine.b[0] = folded.b;
  }
  return mine;
}

// One step of the block tree: thread `thread` (lane thread / cols) takes in lane + step of its column, for its
// `width` channels. After the steps tree_top, tree_top / 2, ..., 1 (a barrier after each), lane 0 of each column holds
// the column's totals.
template <bool Moments, int V>
LGC_HD void tree_step(BlockShares<V>& shared, int thread, int step, int cols, int lanes, int width) {
  const int lane = thread / cols;
  if (lane < step && lane + step < lanes) {
    const int other = thread + step * cols;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < width) {
        const Stats sum = combine<Moments>(Stats{shared.count[thread], shared.a[k][thread], shared.b[k][thread]},
                                           Stats{shared.count[other], shared.a[k][other], shared.b[k][other]});
        shared.a[k][thread] = sum.a;
        shared.b[k][thread] = sum.b;
      }
    }
    shared.count[thread] += shared.count[other];
  }
}

// Lane 0 of each column writes its tile's (a, b) for each of its channels c to partials[2 * (c * per_channel + slot)].
template <int V>
LGC_HD void store_partial(const Plan& plan, const BlockShares<V>& shared, int64_t tile, int thread,
                          double* partials) {
  if (thread >= plan.cols) return;
  const EpilogueShape& s = plan.s;
  const int64_t c = thread_channel(plan, tile, thread);
  if (c < 0) return;
  const int64_t slot =
      s.channels_last ? tile / plan.channel_blocks : (tile / plan.chunks / s.c) * plan.chunks + tile % plan.chunks;
  for (int k = 0; k < plan.width(); ++k) {
    double* at = partials + 2 * ((c + k) * plan.per_channel() + slot);
    at[0] = shared.a[k][thread];
    at[1] = shared.b[k][thread];
  }
}

// Thread `thread`'s share of channel c's partial slots thread, thread + kThreads, ..., combined in that order.
template <bool Moments>
LGC_HD ThreadStats<1> channel_thread(const Plan& plan, const double* partials, int64_t c, int thread) {
  Stats total{0.0, 0.0, 0.0};
  const int64_t slots = plan.per_channel();
  for (int64_t slot = thread; slot < slots; slot += kThreads) {
    const double* at = partials + 2 * (c * slots + slot);
    total = combine<Moments>(total, Stats{static_cast<double>(plan.slot_count(slot)), at[0], at[1]});
  }
  return {total.count, {total.a}, {total.b}};
}

// The channel's results from its totals: (mean, biased variance) or (sum g, sum g * (z - center)).
template <bool Moments, typename A>
LGC_HD void finish_channel(const BlockShares<1>& shared, A* first, A* second) {
  *first = static_cast<A>(shared.a[0][0]);
  *second = static_cast<A>(Moments ? shared.b[0][0] / shared.count[0] : shared.b[0][0]);
}

template <bool Moments, int V>
__device__ __forceinline__ void reduce_block(BlockShares<V>& shared, int cols, int lanes, int top, int width) {
  __syncthreads();
  for (int step = top; step > 0; step >>= 1) {
    tree_step<Moments>(shared, threadIdx.x, step, cols, lanes, width);
    __syncthreads();
  }
}

}  // namespace bn_epilogue_detail
}  // namespace lgc
