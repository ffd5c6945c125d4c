// CUDA launchers of a conv block's epilogue, BatchNorm + ReLU + activation scale + dropout (no torch headers: the
// glue is csrc/bn_relu_dropout.cpp). The same four passes as the CPU kernels (csrc/cpu/bn_relu_dropout.h) and the
// Triton kernels, with the same seeded draws:
//
//   forward   moments:    z                -> per-channel mean, biased variance
//             apply:      z (+ keep)       -> y  = out_scale * relu(z * scale + shift) * keep
//   backward  grad sums:  dy, z (+ keep)   -> per channel sum g, sum g * (z - center),
//                                             g = dy * out_scale * keep * [z * scale + shift > 0]
//             grad apply: dy, z (+ keep)   -> dz = scale * g + k1 * z + k0   (k1, k0 may be null: 0)
//
// Maps are dense (N, C, P) in the shape's layout, element type `kind`; per-channel vectors (C,) are of the
// accumulation type: float64 for kFloat64 maps, float32 otherwise. Every pointer is device memory. Reductions write
// per-tile partials to `partials` (bn_epilogue_partials(shape) doubles) and combine them in a second kernel in a
// fixed order: deterministic, no atomics, no host synchronisation. Each launcher returns the launch error, if any.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "cuda/scalar_kind.h"
#include "epilogue.h"

namespace lgc {

// What is dropped: keep = mask[i] != 0 where mask is set (laid out like the maps), else keep_bit(bits, i) where bits
// is set, else with seed set a Philox draw (philox_keep) from the int64 *seed, read on the device, and the value's
// (N, C, H, W) index, else nothing. Seeded draws number at most 2^31 values. `drawn` and `threshold` are the apply
// kernel's own (bn_apply_drawn_cuda sets them): the keep bits it draws from the seed and writes.
struct EpilogueDropoutCuda {
  const uint8_t* mask = nullptr;
  const uint8_t* bits = nullptr;
  const int64_t* seed = nullptr;
  float p = 0.0f;
  uint8_t* drawn = nullptr;
  uint32_t threshold = 0;
};

// Doubles of scratch the reductions need for `shape`.
int64_t bn_epilogue_partials(EpilogueShape shape);

// What the training forward's moments pass also writes per channel, once a channel's statistics are final (in its
// channel kernel: no launch of its own): BatchNorm's invstd, scale and shift (bn_train_affine) and, where
// running_mean is not null, nn.BatchNorm2d's running update in place (bn_running_update over `count` values a
// channel). Vectors in the accumulation type; all but the running statistics required.
struct BnTrainTermsCuda {
  const void* weight = nullptr;
  const void* bias = nullptr;
  double eps = 0.0;
  void* invstd = nullptr;
  void* scale = nullptr;
  void* shift = nullptr;
  void* running_mean = nullptr;
  void* running_var = nullptr;
  double momentum = 0.0;
  double count = 0.0;
};

// mean and biased var of z per channel, and what `terms` names.
cudaError_t bn_moments_cuda(const void* z, ScalarKind kind, EpilogueShape shape, double* partials, void* mean,
                            void* var, const BnTrainTermsCuda& terms, cudaStream_t stream);

cudaError_t bn_apply_cuda(const void* z, ScalarKind kind, const void* scale, const void* shift,
                          EpilogueDropoutCuda dropout, double out_scale, void* y, EpilogueShape shape,
                          cudaStream_t stream);

// The apply pass with keep bits it draws: `bits` ((N * C * P + 7) / 8 bytes) become bernoulli_keep_bits_cuda's for
// the int64 *seed and p, and y the apply pass's output with them, bit for bit. One kernel, the draw inside the apply
// pass, where each thread step covers whole bytes (float16 and bfloat16 maps of vec 8: C % 8 == 0 channels_last,
// P % 8 == 0 planar); else the bits kernel, then the apply pass. N * C * P < 2^34.
cudaError_t bn_apply_drawn_cuda(const void* z, ScalarKind kind, const void* scale, const void* shift,
                                const int64_t* seed, float p, double out_scale, void* y, uint8_t* bits,
                                EpilogueShape shape, cudaStream_t stream);

// sum g and sum g * (z - center) per channel of the gradient g through dropout, scale and ReLU.
cudaError_t bn_grad_sums_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                              EpilogueDropoutCuda dropout, const void* center, double out_scale, EpilogueShape shape,
                              double* partials, void* sum_g, void* sum_g_centered, cudaStream_t stream);

// The training backward's per-channel inputs and what its gradient-sum pass also writes per channel once a channel's
// sums are final (in its channel kernel): BatchNorm's scale and shift (bn_train_affine, for the gradient apply) and
// the terms k1, k0, dweight and dbias (bn_train_grad_terms) from the forward's batch statistics, over `count` values
// a channel. Vectors in the accumulation type.
struct BnGradTermsCuda {
  const void* mean = nullptr;
  const void* var = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  double eps = 0.0;
  double count = 0.0;
  void* scale = nullptr;
  void* shift = nullptr;
  void* k1 = nullptr;
  void* k0 = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
};

// bn_grad_sums_cuda for the training backward, centred on the batch mean, with BatchNorm's scale and shift computed
// from `terms` in the tiles (no launch of their own), and what `terms` names.
cudaError_t bn_train_grad_sums_cuda(const void* dy, const void* z, ScalarKind kind, EpilogueDropoutCuda dropout,
                                    double out_scale, EpilogueShape shape, double* partials, void* sum_g,
                                    void* sum_g_centered, const BnGradTermsCuda& terms, cudaStream_t stream);

cudaError_t bn_grad_apply_cuda(const void* dy, const void* z, ScalarKind kind, const void* scale, const void* shift,
                               EpilogueDropoutCuda dropout, const void* k1, const void* k0, double out_scale,
                               void* dz, EpilogueShape shape, cudaStream_t stream);

// keep: (N, C, P) uint8 in shape's layout, 1 = kept: the mask that EpilogueDropoutCuda{nullptr, nullptr, seed, p}
// draws.
cudaError_t dropout_keep_mask_cuda(const int64_t* seed, float p, EpilogueShape shape, uint8_t* keep,
                                   cudaStream_t stream);

// keep: `count` uint8 flags in memory order, the CPU's bernoulli_keep_cpu flags for the int64 *seed (read on the
// device): flag i is word i % 4 of Philox counter i / 4 at least bernoulli_threshold(p). count < 2^34.
cudaError_t bernoulli_keep_mask_cuda(const int64_t* seed, float p, int64_t count, uint8_t* keep, cudaStream_t stream);

// bits: (count + 7) / 8 bytes, the CPU's bernoulli_keep_bits_cpu: bernoulli_keep_mask_cuda's flags packed (keep_bit),
// the last byte's unused bits 0. count < 2^34.
cudaError_t bernoulli_keep_bits_cuda(const int64_t* seed, float p, int64_t count, uint8_t* bits, cudaStream_t stream);

}  // namespace lgc
