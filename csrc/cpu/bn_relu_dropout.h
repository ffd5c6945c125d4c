// CPU kernels of a conv block's epilogue, BatchNorm + ReLU + activation scale + dropout (no torch headers: the glue
// is csrc/bn_relu_dropout.cpp; the Python op is lgc_fast/ops/bn_relu_dropout.py, whose Triton kernels these mirror
// pass for pass):
//
//   forward   moments:    z                -> per-channel mean, biased variance
//             apply:      z (+ keep)       -> y  = out_scale * relu(z * scale + shift) * keep
//   backward  grad sums:  dy, z (+ keep)   -> per channel sum g, sum g * (z - center),
//                                             g = dy * out_scale * keep * [z * scale + shift > 0]
//             grad apply: dy, z (+ keep)   -> dz = scale * g + k1 * z + k0   (k1, k0 may be null: 0)
//
// Every map is (N, C, P = H * W), dense, in one of two layouts shared by all maps of a call: planar (NCHW
// contiguous) or channels_last (NHWC). Arithmetic in float32 (float64 for float64 maps); sums run in tiles of at
// most 4096 values and are combined across tiles in float64 in a fixed order, so results do not depend on the thread
// count. The moments combine per-tile (mean, M2) pairs with Chan's formula instead of E[z^2] - E[z]^2.
#pragma once

#include <cstdint>

#include "epilogue.h"  // EpilogueShape, philox_keep, keep_bit, bernoulli_bits_byte

namespace lgc {

// IEEE binary16 and bfloat16 values as their bits (torch's at::Half / at::BFloat16 have this layout).
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// What is dropped: keep = mask[i] != 0 where mask is set (laid out like the maps), else keep_bit(bits, i) where bits
// is set, else with `seeded` a Philox draw from seed and the value's (N, C, H, W) index (philox_keep), else nothing.
struct EpilogueDropout {
  const uint8_t* mask = nullptr;
  const uint8_t* bits = nullptr;
  bool seeded = false;
  uint64_t seed = 0;
  float p = 0.0f;
};

// keep: (n, c, p) uint8 in shape's layout, 1 = kept: the mask that EpilogueDropout{nullptr, nullptr, true, seed, p}
// draws.
void dropout_keep_mask_cpu(uint64_t seed, float p, EpilogueShape shape, uint8_t* keep, int threads);

// keep: `count` uint8 flags in memory order, each 1 with probability 1 - p: Philox-4x32-10 of counter j and the seed
// gives four words for values 4j .. 4j + 3, each kept when at least round(p * 2^32). A quarter of the Philox work of
// dropout_keep_mask_cpu, for byte masks that need not equal the seeded kernels' draws. count < 2^34.
void bernoulli_keep_cpu(uint64_t seed, float p, int64_t count, uint8_t* keep, int threads);

// bits: (count + 7) / 8 bytes, bernoulli_keep_cpu's flags packed (keep_bit; bernoulli_bits_byte), the last byte's
// unused bits 0. count < 2^34.
void bernoulli_keep_bits_cpu(uint64_t seed, float p, int64_t count, uint8_t* bits, int threads);

// The kernels for map element type T and arithmetic type A: (float | Float16 | BFloat16, float) and (double,
// double). Per-channel vectors (C,) are of type A.
#define LGC_EPILOGUE_KERNELS(T, A)                                                                                 \
  void bn_moments_cpu(const T* z, EpilogueShape shape, A* mean, A* var, int threads);                            \
  void bn_apply_cpu(const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, A out_scale, T* y, \
                    EpilogueShape shape, int threads);                                                            \
  void bn_grad_sums_cpu(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout,  \
                        const A* center, A out_scale, EpilogueShape shape, A* sum_g, A* sum_g_centered,           \
                        int threads);                                                                             \
  void bn_grad_apply_cpu(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, \
                         const A* k1, const A* k0, A out_scale, T* dz, EpilogueShape shape, int threads);
LGC_EPILOGUE_KERNELS(float, float)
LGC_EPILOGUE_KERNELS(Float16, float)
LGC_EPILOGUE_KERNELS(BFloat16, float)
LGC_EPILOGUE_KERNELS(double, double)
#undef LGC_EPILOGUE_KERNELS

// Conversions used by the kernels, round to nearest even; exposed for the unit test.
float to_float(Float16 h);
float to_float(BFloat16 b);
Float16 to_float16(float f);
BFloat16 to_bfloat16(float f);

}  // namespace lgc
