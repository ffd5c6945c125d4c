// The tiling plan of the CUDA epilogue kernels (bn_relu_dropout.cu, keep_masks.cu), how a thread walks its values,
// their vector loads and stores, and the launchers' plan and vec dispatch. Host and device alike:
// tests/cpp/test_bn_relu_dropout_cuda_emulation.cu runs it on the CPU.
//
// One plan per shape and element size serves every pass, so a value's tile, partial slot and summation order are the
// same on any GPU and for any alignment of the maps:
//   planar         a tile is a run of at most kPlanarTile pixels of one (image, channel) plane; thread t takes `vec`
//                  consecutive pixels at t * vec, then strides by kThreads * vec (one channel per block).
//   channels_last  a tile is a run of `len` pixel rows times cols * vec channels; thread t owns the `vec` consecutive
//                  channels of group t % cols and strides over the rows by lanes = kThreads / cols.
// `vec` is the largest power of two that divides the vectorised extent (P planar, C channels_last) and keeps vec
// values within 16 bytes: every vector then starts aligned when the map's base is. Where a base is not (a view), the
// same plan runs with scalar accesses, so alignment never changes a result.
#pragma once

#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/kernel_common.cuh"
#include "epilogue.h"

namespace lgc {
namespace bn_epilogue_detail {

constexpr int kThreads = 256;
constexpr int kMaxVectorBytes = 16;
constexpr int64_t kPlanarTile = 16384;       // pixels of one plane a tile holds at most
constexpr int64_t kPlanarTileQuantum = 16;   // planar tiles start at multiples of this: every vec divides it
constexpr int64_t kTargetTiles = 2048;       // channels_last: row runs a pass aims for (per 256 channels)
constexpr int64_t kMinTileRows = 64;         // channels_last: the shortest row run of a tile

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The largest power of two dividing `extent` whose values of `elem_bytes` fit one 16-byte access.
inline int vector_width(int64_t extent, int elem_bytes) {
  int vec = 1;
  while (2 * vec * elem_bytes <= kMaxVectorBytes && extent % (2 * vec) == 0) vec *= 2;
  return vec;
}

struct Plan {
  EpilogueShape s;
  int64_t len;             // planar: pixels a tile; channels_last: rows (pixels with all their channels) a tile
  int64_t chunks;          // planar: tiles a plane; channels_last: row runs over all N * P rows
  int64_t channel_blocks;  // channels_last: tiles side by side across the channels; planar: 1
  int vec;                 // values a thread takes per step: consecutive channels (channels_last) or pixels (planar)
  int cols;                // threads side by side across a row (planar: 1)
  int lanes;               // threads of a block per channel group (planar: all)
  int tree_top;            // the block tree's first step: the largest power of two below lanes (0 for one lane)

  LGC_HD int64_t tiles() const { return s.channels_last ? chunks * channel_blocks : s.n * s.c * chunks; }
  // Partial slots per channel: a function of the shape alone (not of vec), as bn_epilogue_partials promises.
  LGC_HD int64_t per_channel() const { return s.channels_last ? chunks : s.n * chunks; }
  // Values of a channel in partial slot `slot` (planar: slot n * chunks + chunk; channels_last: slot = chunk).
  LGC_HD int64_t slot_count(int64_t slot) const {
    const int64_t total = s.channels_last ? s.n * s.p : s.p;
    const int64_t first = (slot % chunks) * len;
    return total - first < len ? total - first : len;
  }
  LGC_HD int width() const { return s.channels_last ? vec : 1; }         // channels a thread reduces
  LGC_HD int channel_step() const { return s.channels_last ? 1 : 0; }    // between a step's values
  LGC_HD int64_t index_step() const { return s.channels_last ? s.p : 1; }  // (N, C, H, W) index between them
};

inline Plan make_plan(EpilogueShape s, int elem_bytes) {
  Plan plan{};
  plan.s = s;
  if (!s.channels_last) {
    plan.vec = vector_width(s.p, elem_bytes);
    const int64_t even = s.p > 0 ? ceil_div(s.p, ceil_div(s.p, kPlanarTile)) : 1;
    plan.len = ceil_div(even, kPlanarTileQuantum) * kPlanarTileQuantum;
    plan.chunks = s.p > 0 ? ceil_div(s.p, plan.len) : 1;
    plan.channel_blocks = 1;
    plan.cols = 1;
    plan.lanes = kThreads;
  } else {
    plan.vec = vector_width(s.c, elem_bytes);
    const int64_t groups = s.c / plan.vec;
    plan.cols = static_cast<int>(groups < kThreads ? groups : kThreads);
    plan.lanes = kThreads / plan.cols;
    plan.channel_blocks = ceil_div(groups, plan.cols);
    const int64_t rows = s.n * s.p;
    const int64_t wide = ceil_div(s.c, kThreads);  // the row runs depend on the shape alone, not on vec
    const int64_t runs = kTargetTiles / wide > 1 ? kTargetTiles / wide : 1;
    int64_t len = ceil_div(rows, runs);
    if (len < kMinTileRows) len = kMinTileRows;
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

// The first channel of thread `thread` in tile `tile`, or -1 when it has none (channels_last blocks may have spare
// threads, and groups past C in the last channel block). Its values are of channels first + k * channel_step().
LGC_HD int64_t thread_channel(const Plan& plan, int64_t tile, int thread) {
  if (!plan.s.channels_last) return (tile / plan.chunks) % plan.s.c;
  const int64_t c = ((tile % plan.channel_blocks) * plan.cols + thread % plan.cols) * plan.vec;
  return thread / plan.cols < plan.lanes && c < plan.s.c ? c : -1;
}

// Walks the steps of thread `thread` in tile `tile` (call only when thread_channel is not -1), R at a time so that a
// kernel issues R steps' loads before it uses any: f(offset, index, count) with the map offsets and the (N, C, H, W)
// indices (uint32: seeded draws number at most 2^31) of the first value of steps 0 .. count - 1 (count <= R; the
// entries past count are unset).
template <int R, typename F>
LGC_HD void visit_thread(const Plan& plan, int64_t tile, int thread, F&& f) {
  const EpilogueShape& s = plan.s;
  int64_t offset[R];
  uint32_t index[R];
  if (!s.channels_last) {
    const int64_t first = (tile % plan.chunks) * plan.len;
    const int64_t begin = (tile / plan.chunks) * s.p + first;
    const int64_t end = begin + (s.p - first < plan.len ? s.p - first : plan.len);
    const int64_t stride = int64_t{kThreads} * plan.vec;
    for (int64_t at = begin + int64_t{thread} * plan.vec; at < end; at += R * stride) {
      int count = 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (at + r * stride < end) {
          offset[r] = at + r * stride;
          index[r] = static_cast<uint32_t>(offset[r]);
          count = r + 1;
        }
      }
      f(offset, index, count);
    }
    return;
  }
  const int64_t c = ((tile % plan.channel_blocks) * plan.cols + thread % plan.cols) * plan.vec;
  const int64_t chunk = tile / plan.channel_blocks;
  const int64_t rows = s.n * s.p;
  const int64_t end = (chunk + 1) * plan.len < rows ? (chunk + 1) * plan.len : rows;
  int64_t row = chunk * plan.len + thread / plan.cols;
  int64_t image = row / s.p;
  int64_t pixel = row - image * s.p;
  while (row < end) {
    int count = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row < end) {
        offset[r] = row * s.c + c;
        index[r] = static_cast<uint32_t>((image * s.c + c) * s.p + pixel);
        count = r + 1;
        row += plan.lanes;
        pixel += plan.lanes;  // the index is stepped: no division per row
        while (pixel >= s.p) {
          pixel -= s.p;
          ++image;
        }
      }
    }
    f(offset, index, count);
  }
}

// V values of T as one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Whether p may be accessed as Packs of V values of `elem_bytes` (null pointers pass: they are never read).
inline bool pack_aligned(const void* p, int elem_bytes, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(elem_bytes) * vec) == 0;
}

// The V values at p: one access where `vector_io` (p aligned to Pack<T, V>), else V scalar ones.
template <int V, typename T>
LGC_HD void load_values(const T* p, bool vector_io, T (&out)[V]) {
  if (vector_io) {
    const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = pack.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = p[k];
  }
}

template <int V, typename T>
LGC_HD void store_values(T* p, bool vector_io, const T (&values)[V]) {
  if (vector_io) {
    Pack<T, V> pack;
#pragma unroll
    for (int k = 0; k < V; ++k) pack.v[k] = values[k];
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = values[k];
  }
}

// Calls f(std::integral_constant<int, vec>) for a plan's vec (a power of two, at most 16 bytes of T): tries Vec = 1,
// 2, 4, ... in turn.
template <typename T, int Vec = 1, typename F>
cudaError_t on_vec(int vec, F&& f) {
  if constexpr (Vec * static_cast<int>(sizeof(T)) > kMaxVectorBytes) {
    return cudaErrorInvalidValue;
  } else {
    if (vec == Vec) return f(std::integral_constant<int, Vec>{});
    return on_vec<T, 2 * Vec>(vec, std::forward<F>(f));
  }
}

// The plan of a launch for elements of `elem_bytes`, or an error: nothing to do (cudaSuccess, reported as done =
// true) or a grid too large.
struct Launch {
  Plan plan;
  bool done;
  cudaError_t err;
};

inline Launch plan_launch(EpilogueShape shape, int elem_bytes) {
  const Plan plan = make_plan(shape, elem_bytes);
  if (shape.n <= 0 || shape.c <= 0 || shape.p <= 0) return {plan, true, cudaSuccess};
  if (plan.tiles() > INT_MAX || shape.c > INT_MAX) return {plan, true, cudaErrorInvalidConfiguration};
  return {plan, false, cudaSuccess};
}

}  // namespace bn_epilogue_detail
}  // namespace lgc
