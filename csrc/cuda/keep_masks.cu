// CUDA kernels of the conv-block epilogue's dropout masks (see bn_relu_dropout.h): the seeded keep mask, whose flags
// are the (N, C, H, W) index's philox_keep as in every pass that draws them again, and the i.i.d. draws for ConvBlock,
// a byte mask (bernoulli_keep_mask) or keep bits (bernoulli_keep_bits), the CPU draws' flags bit for bit. The seed is
// read on the device: no host synchronisation.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/bn_relu_dropout.h"
#include "cuda/bn_relu_dropout_plan.cuh"

namespace lgc {
namespace bn_epilogue_detail {

constexpr int kMaskSteps = 4;  // steps whose stores a thread of keep_mask_kernel batches

template <int V>
LGC_HD void keep_mask_thread(const Plan& plan, const int64_t* seed_ptr, float p, uint8_t* keep, bool vector_io,
                             int64_t tile, int thread) {
  constexpr int R = kMaskSteps;
  if (thread_channel(plan, tile, thread) < 0) return;
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const auto index_step = static_cast<uint32_t>(plan.index_step());
  visit_thread<R>(plan, tile, thread, [&](const int64_t(&offset)[R], const uint32_t(&index)[R], int count) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < count) {
        uint8_t bytes[V];
#pragma unroll
        for (int k = 0; k < V; ++k) bytes[k] = philox_keep(seed, index[r] + k * index_step, p);
        store_values<V>(keep + offset[r], vector_io, bytes);
      }
    }
  });
}

// bernoulli_keep_mask: thread step `group` writes flags [16 group, 16 group + 16) of `count`, from four Philox
// counters (bernoulli_threshold): the CPU's bernoulli_keep_cpu bit for bit. One 16-byte store where the group is whole
// and keep aligned. A quarter of the seeded mask's Philox work, and a pure write: torch's bernoulli_ took 230 us a
// 128 x 128 x 96 x 96 layer in the training step's H100 profile.
constexpr int kBernoulliFlags = 16;

LGC_HD void bernoulli_group(uint64_t seed, uint32_t threshold, int64_t count, int64_t group, uint8_t* keep,
                            bool vector_io) {
  const int64_t first = group * kBernoulliFlags;
  uint8_t flags[kBernoulliFlags];
#pragma unroll
  for (int q = 0; q < kBernoulliFlags / 4; ++q) {
    uint32_t words[4];
    philox4(seed, static_cast<uint32_t>(first / 4 + q), words);
#pragma unroll
    for (int k = 0; k < 4; ++k) flags[4 * q + k] = words[k] >= threshold;
  }
  if (vector_io && first + kBernoulliFlags <= count) {
    store_values<kBernoulliFlags>(keep + first, true, flags);
  } else {
    for (int k = 0; k < kBernoulliFlags && first + k < count; ++k) keep[first + k] = flags[k];
  }
}

// bernoulli_keep_bits: thread step `group` writes bytes [4 group, 4 group + 4) of `bytes` (flags 32 group ..), one
// 4-byte store where the group is whole and bits aligned; `tail` keeps the last byte's flags below `count`.
constexpr int kBitsBytes = 4;

LGC_HD void bernoulli_bits_group(uint64_t seed, uint32_t threshold, int64_t bytes, uint32_t tail, int64_t group,
                                 uint8_t* bits, bool vector_io) {
  const int64_t first = group * kBitsBytes;
  uint8_t out[kBitsBytes];
#pragma unroll
  for (int k = 0; k < kBitsBytes; ++k) {
    out[k] = bernoulli_bits_byte(seed, threshold, first + k);
    if (first + k == bytes - 1) out[k] &= static_cast<uint8_t>(tail);  // the last byte (constant index: registers)
  }
  if (vector_io && first + kBitsBytes <= bytes) {
    store_values<kBitsBytes>(bits + first, true, out);
  } else {
    for (int k = 0; k < kBitsBytes && first + k < bytes; ++k) bits[first + k] = out[k];
  }
}

template <int V>
__global__ void __launch_bounds__(kThreads) keep_mask_kernel(Plan plan, const int64_t* seed, float p, uint8_t* keep,
                                                             bool vector_io) {
  keep_mask_thread<V>(plan, seed, p, keep, vector_io, blockIdx.x, threadIdx.x);
}

__global__ void __launch_bounds__(kThreads) bernoulli_kernel(const int64_t* seed, uint32_t threshold, int64_t count,
                                                             int64_t groups, uint8_t* keep, bool vector_io) {
  const auto s = static_cast<uint64_t>(*seed);
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x; g < groups; g += stride) {
    bernoulli_group(s, threshold, count, g, keep, vector_io);
  }
}

__global__ void __launch_bounds__(kThreads) bernoulli_bits_kernel(const int64_t* seed, uint32_t threshold,
                                                                  int64_t bytes, uint32_t tail, int64_t groups,
                                                                  uint8_t* bits, bool vector_io) {
  const auto s = static_cast<uint64_t>(*seed);
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t g = int64_t{blockIdx.x} * kThreads + threadIdx.x; g < groups; g += stride) {
    bernoulli_bits_group(s, threshold, bytes, tail, g, bits, vector_io);
  }
}

}  // namespace bn_epilogue_detail

namespace d = bn_epilogue_detail;

cudaError_t dropout_keep_mask_cuda(const int64_t* seed, float p, EpilogueShape shape, uint8_t* keep,
                                   cudaStream_t stream) {
  const d::Launch launch = d::plan_launch(shape, 1);
  if (launch.done) return launch.err;
  const auto blocks = static_cast<unsigned>(launch.plan.tiles());
  const bool vector_io = d::pack_aligned(keep, 1, launch.plan.vec);
  return d::on_vec<uint8_t>(launch.plan.vec, [&](auto vec) {
    d::keep_mask_kernel<decltype(vec)::value><<<blocks, d::kThreads, 0, stream>>>(launch.plan, seed, p, keep,
                                                                                  vector_io);
    return cudaGetLastError();
  });
}

cudaError_t bernoulli_keep_mask_cuda(const int64_t* seed, float p, int64_t count, uint8_t* keep, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int64_t groups = (count + d::kBernoulliFlags - 1) / d::kBernoulliFlags;
  const int64_t blocks = std::min<int64_t>((groups + d::kThreads - 1) / d::kThreads, int64_t{1} << 20);
  d::bernoulli_kernel<<<static_cast<unsigned>(blocks), d::kThreads, 0, stream>>>(
      seed, bernoulli_threshold(p), count, groups, keep, d::pack_aligned(keep, 1, d::kBernoulliFlags));
  return cudaGetLastError();
}

cudaError_t bernoulli_keep_bits_cuda(const int64_t* seed, float p, int64_t count, uint8_t* bits, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int64_t bytes = (count + 7) / 8;
  const int64_t groups = (bytes + d::kBitsBytes - 1) / d::kBitsBytes;
  const int64_t blocks = std::min<int64_t>((groups + d::kThreads - 1) / d::kThreads, int64_t{1} << 20);
  const uint32_t tail = count % 8 == 0 ? 0xffu : (1u << (count % 8)) - 1u;
  d::bernoulli_bits_kernel<<<static_cast<unsigned>(blocks), d::kThreads, 0, stream>>>(
      seed, bernoulli_threshold(p), bytes, tail, groups, bits, d::pack_aligned(bits, 1, d::kBitsBytes));
  return cudaGetLastError();
}

}  // namespace lgc
