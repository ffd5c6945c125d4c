// What the CPU and CUDA kernels of the conv-block epilogue (BatchNorm + ReLU + scale + dropout) share, in host and
// device code alike: the maps' shape, the seeded dropout draws, which are Triton's tl.rand bit for bit, so a seed
// drops the same values on every backend, keep bits, and BatchNorm's per-channel terms.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LGC_EPILOGUE_HD __host__ __device__ __forceinline__
#else
#define LGC_EPILOGUE_HD inline
#endif

namespace lgc {

// Every map of a call is (N, C, P = H * W), dense, in one layout: planar (NCHW contiguous) or channels_last (NHWC).
struct EpilogueShape {
  int64_t n;
  int64_t c;
  int64_t p;  // H * W
  bool channels_last;
};

// Philox-4x32-10's four output words for counter (counter, 0, 0, 0) and key (low, high 32 bits of seed).
LGC_EPILOGUE_HD void philox4(uint64_t seed, uint32_t counter, uint32_t words[4]) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
#if defined(__CUDA_ARCH__)
    // the 32 x 32 -> 64-bit products as two 32-bit halves: nvcc turns the uint64_t form into 64-bit multiplies
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi2 = __umulhi(0xCD9E8D57u, c2), lo2 = 0xCD9E8D57u * c2;
#else
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p2 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi2 = static_cast<uint32_t>(p2 >> 32), lo2 = static_cast<uint32_t>(p2);
#endif
    const uint32_t next0 = hi2 ^ c1 ^ k0;
    const uint32_t next2 = hi0 ^ c3 ^ k1;
    c1 = lo2;
    c3 = lo0;
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// The first word for counter `index`: Triton's tl.randint(seed, index).
LGC_EPILOGUE_HD uint32_t philox_word(uint64_t seed, uint32_t index) {
  uint32_t words[4];
  philox4(seed, index, words);
  return words[0];
}

// Triton's tl.rand(seed, index): the word read as int32 (two's complement, as GCC, Clang and nvcc convert), folded
// onto [0, 2^31) and scaled into [0, 1) in float32. Converted from int32, not uint32: AVX2 has no unsigned
// conversion, and the CPU loops vectorise only with the signed one.
LGC_EPILOGUE_HD float philox_uniform(uint64_t seed, uint32_t index) {
  int32_t x = static_cast<int32_t>(philox_word(seed, index));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// The value at (N, C, H, W) index `index` is kept when its draw is at least p (probability 1 - p).
LGC_EPILOGUE_HD bool philox_keep(uint64_t seed, uint32_t index, float p) { return philox_uniform(seed, index) >= p; }

// bernoulli_keep_mask's flags (CPU and CUDA alike): flag i of the mask, in memory order, is word i % 4 of Philox
// counter i / 4 at least this threshold, so it is kept with probability 1 - p (p < 1 in float32: at most 2^32 - 256).
inline uint32_t bernoulli_threshold(float p) {
  return static_cast<uint32_t>(std::llround(static_cast<double>(p) * 4294967296.0));
}

// Keep bits, the packed form of a keep mask: the flag of the value at offset e of the maps (dense, in the call's
// layout) is bit e % 8, least significant first, of byte e / 8. An eighth of the byte mask's traffic in each pass.
LGC_EPILOGUE_HD bool keep_bit(const uint8_t* bits, int64_t e) { return ((bits[e >> 3] >> (e & 7)) & 1u) != 0; }

// Byte b of bernoulli_keep_bits: flags 8 b .. 8 b + 7 of bernoulli_keep_mask (Philox counters 2 b and 2 b + 1), so
// the bits are that byte mask packed.
LGC_EPILOGUE_HD uint8_t bernoulli_bits_byte(uint64_t seed, uint32_t threshold, int64_t b) {
  uint32_t byte = 0;
  for (int half = 0; half < 2; ++half) {
    uint32_t words[4];
    philox4(seed, static_cast<uint32_t>(2 * b + half), words);
    for (int k = 0; k < 4; ++k) byte |= uint32_t{words[k] >= threshold} << (4 * half + k);
  }
  return static_cast<uint8_t>(byte);
}

// BatchNorm with batch statistics, per channel, in double: the apply pass's z * scale + shift from the batch mean
// and biased variance, and the backward's terms from the gradient's sums (sum g, sum g * (z - mean)) over `count`
// values: dz = scale * g + k1 * z + k0 (= scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = (z - mean) * invstd),
// dweight = sum g * xhat, dbias = sum g.
struct BnAffine {
  double invstd;
  double scale;
  double shift;
};

LGC_EPILOGUE_HD BnAffine bn_train_affine(double mean, double var, double weight, double bias, double eps) {
  const double invstd = 1.0 / sqrt(var + eps);
  const double scale = weight * invstd;
  return {invstd, scale, bias - mean * scale};
}

// bn_train_affine's terms rounded to the accumulation type A, the form the passes store and read: the training
// backward computes them again from the same statistics and must get the forward's values exactly.
template <typename A>
struct BnAffineAs {
  A invstd;
  A scale;
  A shift;
};

template <typename A>
LGC_EPILOGUE_HD BnAffineAs<A> bn_train_affine_as(A mean, A var, A weight, A bias, double eps) {
  const BnAffine t = bn_train_affine(mean, var, weight, bias, eps);
  return {static_cast<A>(t.invstd), static_cast<A>(t.scale), static_cast<A>(t.shift)};
}

struct BnGradTerms {
  double k1;
  double k0;
  double dweight;
  double dbias;
};

LGC_EPILOGUE_HD BnGradTerms bn_train_grad_terms(double invstd, double scale, double mean, double sum_g,
                                                double sum_g_centered, double count) {
  const double k1 = -scale * invstd * invstd * sum_g_centered / count;
  return {k1, -scale * sum_g / count - k1 * mean, sum_g_centered * invstd, sum_g};
}

// nn.BatchNorm2d's running update from a batch's mean and biased variance over `count` (>= 2) values per channel:
// running moves by `momentum` towards the batch's mean and unbiased variance, with torch.lerp's two forms (the one
// that keeps a momentum of 1 exact).
struct BnRunning {
  double mean;
  double var;
};

LGC_EPILOGUE_HD double bn_lerp(double start, double end, double weight) {
  return weight < 0.5 ? start + weight * (end - start) : end - (end - start) * (1.0 - weight);
}

LGC_EPILOGUE_HD BnRunning bn_running_update(double running_mean, double running_var, double mean, double var,
                                            double count, double momentum) {
  return {bn_lerp(running_mean, mean, momentum), bn_lerp(running_var, var * (count / (count - 1.0)), momentum)};
}

// conv_stack's BatchNorm finalize (lgc_fast/ops/bn_finalize.py), per channel c: from the channel's sum and sum of
// squares over `count` values, its batch mean and biased variance in double (E[z^2] - E[z]^2 cancels in float),
// the variance clamped at 0, and where update_running nn.BatchNorm2d's running update (unbiased variance, count - 1
// taken as at least 1); outside batch statistics the running ones. Then the prologue's terms pre = z * s + b with
// gamma_eff = gamma * factor (beta likewise): s = gamma_eff * invstd, b = beta * factor - mean * s. Every vector in
// one type A; running_mean / running_var may be null where neither update_running nor !batch_stats reads them.
template <typename A>
struct BnFinalizeArgs {
  const A* total;
  const A* sq_total;
  const A* gamma;
  const A* beta;
  A* running_mean;
  A* running_var;
  A* mean;
  A* invstd;
  A* gamma_eff;
  A* s;
  A* b;
  double count;
  double momentum;
  double eps;
  double factor;
  bool batch_stats;
  bool update_running;
};

template <typename A>
LGC_EPILOGUE_HD void bn_finalize_channel(const BnFinalizeArgs<A>& a, int64_t c) {
  double mean, var;
  if (a.batch_stats) {
    mean = static_cast<double>(a.total[c]) / a.count;
    var = static_cast<double>(a.sq_total[c]) / a.count - mean * mean;
    var = var > 0.0 ? var : 0.0;
    if (a.update_running) {
      const double unbiased = var * (a.count / (a.count > 1.0 ? a.count - 1.0 : 1.0));
      a.running_mean[c] = static_cast<A>(bn_lerp(a.running_mean[c], mean, a.momentum));
      a.running_var[c] = static_cast<A>(bn_lerp(a.running_var[c], unbiased, a.momentum));
    }
  } else {
    mean = a.running_mean[c];
    var = a.running_var[c];
  }
  const double invstd = 1.0 / sqrt(var + a.eps);
  const double gamma_eff = static_cast<double>(a.gamma[c]) * a.factor, s = gamma_eff * invstd;
  a.mean[c] = static_cast<A>(mean);
  a.invstd[c] = static_cast<A>(invstd);
  a.gamma_eff[c] = static_cast<A>(gamma_eff);
  a.s[c] = static_cast<A>(s);
  a.b[c] = static_cast<A>(static_cast<double>(a.beta[c]) * a.factor - mean * s);
}

}  // namespace lgc
