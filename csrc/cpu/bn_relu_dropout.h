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
#include <cstring>

namespace lgc {

// IEEE binary16 and bfloat16 values as their bits (torch's at::Half / at::BFloat16 have this layout).
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

struct EpilogueShape {
  int64_t n;
  int64_t c;
  int64_t p;  // H * W
  bool channels_last;
};

// What is dropped: keep = mask[i] != 0 where mask is set (laid out like the maps), else with `seeded` a Philox draw
// from seed and the value's (N, C, H, W) index (philox_keep), else nothing.
struct EpilogueDropout {
  const uint8_t* mask = nullptr;
  bool seeded = false;
  uint64_t seed = 0;
  float p = 0.0f;
};

// Philox-4x32-10's first output word for counter (index, 0, 0, 0) and key (low, high 32 bits of seed): Triton's
// tl.randint(seed, index), so draws here equal the Triton kernels' draws.
inline uint32_t philox_word(uint64_t seed, uint32_t index) {
  uint32_t c0 = index, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p2 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t next0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's tl.rand(seed, index): the word as int32, folded onto [0, 2^31) and scaled into [0, 1) in float32.
inline float philox_uniform(uint64_t seed, uint32_t index) {
  int32_t x;
  const uint32_t word = philox_word(seed, index);
  std::memcpy(&x, &word, sizeof x);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// The value at (N, C, H, W) index `index` is kept when its draw is at least p (probability 1 - p).
inline bool philox_keep(uint64_t seed, uint32_t index, float p) { return philox_uniform(seed, index) >= p; }

// keep: (n, c, p) uint8 in shape's layout, 1 = kept: the mask that EpilogueDropout{nullptr, true, seed, p} draws.
void dropout_keep_mask_cpu(uint64_t seed, float p, EpilogueShape shape, uint8_t* keep, int threads);

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
