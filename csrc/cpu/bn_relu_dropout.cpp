// CPU kernels of the conv-block epilogue; see bn_relu_dropout.h. One OpenMP loop over tiles per pass: a planar
// tile is a run of at most kTile pixels of one (image, channel) plane, a channels_last tile a run of pixels of one
// image with all their channels (at most kTile values). The innermost loop always walks contiguous memory.
#include "cpu/bn_relu_dropout.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lgc {
namespace {

constexpr int64_t kTile = 4096;
enum DropKind { kNoDrop, kMaskDrop, kBitsDrop, kSeededDrop };

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    return float_of(sign | bits_of(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
  }
  if (exponent == 31) return float_of(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN (payload kept)
  return float_of(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN stays NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity (and infinity)
  if (magnitude < 0x38800000u) {                       // below 2^-14: a subnormal half, in units of 2^-24
    const float units = float_of(magnitude) * 16777216.0f;
    const uint32_t whole = static_cast<uint32_t>(units);
    const float rest = units - static_cast<float>(whole);
    const uint32_t rounded = whole + ((rest > 0.5f || (rest == 0.5f && (whole & 1u))) ? 1u : 0u);
    return sign | static_cast<uint16_t>(rounded);
  }
  uint32_t r = magnitude - (112u << 23);  // rebias the exponent, then round the 13 dropped bits to nearest even
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float bfloat_to_float(uint16_t b) { return float_of(uint32_t{b} << 16); }

inline uint16_t float_to_bfloat(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(Float16 v) { return half_to_float(v.bits); }
inline float widen(BFloat16 v) { return bfloat_to_float(v.bits); }

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(Float16* p, float v) { p->bits = float_to_half(v); }
inline void store(BFloat16* p, float v) { p->bits = float_to_bfloat(v); }

// How the maps split into tiles: `len` pixels a tile, `chunks` tiles along P per image (and channel, planar).
struct Tiling {
  EpilogueShape s;
  int64_t len;
  int64_t chunks;

  explicit Tiling(EpilogueShape shape) : s(shape) {
    len = std::min<int64_t>(s.channels_last ? std::max<int64_t>(1, kTile / s.c) : kTile, std::max<int64_t>(s.p, 1));
    chunks = (s.p + len - 1) / len;
  }
  int64_t count() const { return s.channels_last ? s.n * chunks : s.n * s.c * chunks; }
  int64_t per_channel() const { return s.n * chunks; }  // tiles holding each channel's values
  int64_t pixels(int64_t t) const { return std::min(len, s.p - (t % chunks) * len); }
  // The offsets of tile t's values: one run [first, first + values) of the maps' memory in either layout.
  int64_t first(int64_t t) const {
    const int64_t p0 = (t % chunks) * len;
    return s.channels_last ? ((t / chunks) * s.p + p0) * s.c : (t / chunks) * s.p + p0;
  }
  int64_t values(int64_t t) const { return s.channels_last ? pixels(t) * s.c : pixels(t); }
  // Where tile t's partial sums of channel c go: slot c * per_channel() + slot_of(t).
  int64_t slot_of(int64_t t) const { return s.channels_last ? t : (t / (chunks * s.c)) * chunks + t % chunks; }
};

// Calls f(t) for t in [0, tiles) on up to `threads` OpenMP threads (0: OpenMP's default).
template <typename F>
void parallel_for(int64_t tiles, int threads, F&& f) {
#ifdef _OPENMP
  const int64_t wanted = threads > 0 ? threads : omp_get_max_threads();
  const int team = static_cast<int>(std::max<int64_t>(1, std::min(wanted, tiles)));
#pragma omp parallel for num_threads(team) schedule(static)
  for (int64_t t = 0; t < tiles; ++t) f(t);
#else
  (void)threads;
  for (int64_t t = 0; t < tiles; ++t) f(t);
#endif
}

template <typename F>
void for_each_tile(const Tiling& tiling, int threads, F&& f) {
  parallel_for(tiling.count(), threads, f);
}

// Calls f(offset, channel, index) for every value of tile t: offset into the maps, index in (N, C, H, W) order.
template <typename F>
inline void visit_tile(const Tiling& tiling, int64_t t, F&& f) {
  const EpilogueShape& s = tiling.s;
  const int64_t p0 = (t % tiling.chunks) * tiling.len;
  const int64_t pixels = tiling.pixels(t);
  if (!s.channels_last) {
    const int64_t plane = t / tiling.chunks;  // n * C + c
    const int64_t c = plane % s.c;
    const int64_t begin = plane * s.p + p0;
#pragma omp simd
    for (int64_t i = begin; i < begin + pixels; ++i) f(i, c, i);
    return;
  }
  const int64_t n = t / tiling.chunks;
  for (int64_t q = p0; q < p0 + pixels; ++q) {
    const int64_t base = (n * s.p + q) * s.c;
    int64_t index = n * s.c * s.p + q;  // stepped, not c * P: a 64-bit vector multiply would stop vectorisation
#pragma omp simd linear(index : s.p)
    for (int64_t c = 0; c < s.c; ++c) {
      f(base + c, c, index);
      index += s.p;
    }
  }
}

// Per channel of tile t, (sum f.first, sum f.second) for f(offset, channel, index) -> (a, b), into sums[2 * c]
// and sums[2 * c + 1] (planar: only the tile's channel is written).
template <typename A, typename F>
inline void tile_sums(const Tiling& tiling, int64_t t, A* sums, F&& f) {
  const EpilogueShape& s = tiling.s;
  const int64_t p0 = (t % tiling.chunks) * tiling.len;
  const int64_t pixels = tiling.pixels(t);
  if (!s.channels_last) {
    const int64_t plane = t / tiling.chunks;
    const int64_t c = plane % s.c;
    const int64_t begin = plane * s.p + p0;
    A sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
    for (int64_t i = begin; i < begin + pixels; ++i) {
      const auto ab = f(i, c, i);
      sa += ab.a;
      sb += ab.b;
    }
    sums[2 * c] = sa;
    sums[2 * c + 1] = sb;
    return;
  }
  std::fill(sums, sums + 2 * s.c, A(0));
  const int64_t n = t / tiling.chunks;
  for (int64_t q = p0; q < p0 + pixels; ++q) {
    const int64_t base = (n * s.p + q) * s.c;
    int64_t index = n * s.c * s.p + q;  // stepped, as in visit_tile
#pragma omp simd linear(index : s.p)
    for (int64_t c = 0; c < s.c; ++c) {
      const auto ab = f(base + c, c, index);
      sums[2 * c] += ab.a;
      sums[2 * c + 1] += ab.b;
      index += s.p;
    }
  }
}

template <typename A>
struct Pair {
  A a;
  A b;
};

// Stores tile t's per-channel pairs (sums[2 * c], sums[2 * c + 1]) at partial[2 * (c * per_channel + slot)] (+1):
// all channels of a channels_last tile, the one channel of a planar tile.
template <typename A>
void store_partials(const Tiling& tiling, int64_t t, const A* sums, double* partial) {
  const int64_t slot = tiling.slot_of(t);
  const int64_t first = tiling.s.channels_last ? 0 : (t / tiling.chunks) % tiling.s.c;
  const int64_t last = tiling.s.channels_last ? tiling.s.c : first + 1;
  for (int64_t c = first; c < last; ++c) {
    const int64_t at = 2 * (c * tiling.per_channel() + slot);
    partial[at] = sums[2 * c];
    partial[at + 1] = sums[2 * c + 1];
  }
}

// Each byte's eight keep bits as eight 0/1 bytes, least significant bit first.
struct BitBytes {
  uint64_t of[256];
  constexpr BitBytes() : of() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < 8; ++k) of[byte] |= uint64_t((byte >> k) & 1) << (8 * k);
    }
  }
};
constexpr BitBytes kBitBytes;

// Keep bits of a tile as one byte a value, so the elementwise loops read them as a byte mask and vectorise (read
// bit by bit the passes ran about 6x slower). flags[i - first] is the flag of offset i.
struct TileFlags {
  std::vector<uint8_t> flags;
  int64_t first = 0;

  // Expands the bits of offsets [begin, begin + count), from the byte holding `begin`, eight a table lookup.
  void expand(const uint8_t* bits, int64_t begin, int64_t count) {
    const int64_t b0 = begin >> 3, b1 = (begin + count + 7) >> 3;
    flags.resize(static_cast<size_t>(8 * (b1 - b0)));
    for (int64_t b = b0; b < b1; ++b) std::memcpy(flags.data() + 8 * (b - b0), &kBitBytes.of[bits[b]], 8);
    first = 8 * b0;
  }
};

// The drop decision for the value at offset i, (N, C, H, W) index `index`; keep bits come expanded (TileFlags:
// flags[i - flags_first]).
template <int Drop>
inline bool kept(const EpilogueDropout& dropout, const uint8_t* flags, int64_t flags_first, int64_t i,
                 int64_t index) {
  if constexpr (Drop == kMaskDrop) return dropout.mask[i] != 0;
  if constexpr (Drop == kBitsDrop) return flags[i - flags_first] != 0;
  if constexpr (Drop == kSeededDrop) return philox_keep(dropout.seed, static_cast<uint32_t>(index), dropout.p);
  (void)dropout, (void)flags, (void)flags_first, (void)i, (void)index;
  return true;
}

template <typename F>
void with_drop_kind(const EpilogueDropout& dropout, F&& f) {
  if (dropout.mask != nullptr) {
    f(std::integral_constant<int, kMaskDrop>{});
  } else if (dropout.bits != nullptr) {
    f(std::integral_constant<int, kBitsDrop>{});
  } else if (dropout.seeded) {
    f(std::integral_constant<int, kSeededDrop>{});
  } else {
    f(std::integral_constant<int, kNoDrop>{});
  }
}

// Everything one pass reads and writes; unused pointers stay null.
template <typename T, typename A>
struct Pass {
  Tiling tiling;
  const T* z;
  const T* dy;
  T* out;
  const A* scale;
  const A* shift;
  const A* center;  // grad sums: the centre of sum g * (z - center)
  const A* k1;      // grad apply: the statistics' share k1 * z + k0, or null for none
  const A* k0;
  A out_scale;
  EpilogueDropout dropout;
  double* partial;  // reductions: 2 * C * per_channel() partial sums
  const uint8_t* flags = nullptr;  // keep bits, expanded for the tile at hand (tile_flags)
  int64_t flags_first = 0;
};

// For keep bits, expands tile t's into `scratch` (the calling thread's) and points pass.flags at them.
template <int Drop, typename T, typename A>
inline void tile_flags(Pass<T, A>& pass, int64_t t) {
  if constexpr (Drop == kBitsDrop) {
    thread_local TileFlags scratch;
    scratch.expand(pass.dropout.bits, pass.tiling.first(t), pass.tiling.values(t));
    pass.flags = scratch.flags.data();
    pass.flags_first = scratch.first;
  } else {
    (void)pass, (void)t;
  }
}

// One tile of each pass. sums: 3 * C scratch values of the calling thread.
template <typename T, typename A>
inline void moments_tile(const Pass<T, A>& pass, int64_t t, A* sums) {
  // Sum, then the sum of squares about the tile's own mean (the tile is still in cache), so the variance stays exact
  // where the mean is large against the spread.
  const Tiling& tiling = pass.tiling;
  const T* z = pass.z;
  A* means = sums + 2 * tiling.s.c;  // kept apart: tile_sums clears the pairs
  tile_sums(tiling, t, sums, [&](int64_t i, int64_t, int64_t) { return Pair<A>{widen(z[i]), A(0)}; });
  const A count = static_cast<A>(tiling.pixels(t));
  for (int64_t c = 0; c < tiling.s.c; ++c) means[c] = sums[2 * c] / count;
  tile_sums(tiling, t, sums, [&](int64_t i, int64_t c, int64_t) {
    const A d = widen(z[i]) - means[c];
    return Pair<A>{A(0), d * d};
  });
  for (int64_t c = 0; c < tiling.s.c; ++c) sums[2 * c] = means[c];
  store_partials(tiling, t, sums, pass.partial);
}

// The elementwise tiles work on a local copy of the pass: GCC then knows the loop's stores cannot change its
// pointers and vectorises (through the shared reference the grad loops measured about 13x slower).
template <typename T, typename A>
inline void apply_tile(const Pass<T, A>& shared, int64_t t) {
  Pass<T, A> pass = shared;
  with_drop_kind(pass.dropout, [&](auto drop) {
    tile_flags<decltype(drop)::value>(pass, t);
    visit_tile(pass.tiling, t, [&](int64_t i, int64_t c, int64_t index) {
      const A u = widen(pass.z[i]) * pass.scale[c] + pass.shift[c];
      // NaN propagates as in torch.relu, and a dropped NaN stays NaN as in torch's `y * mask`.
      A v = (u < A(0) ? A(0) : u) * pass.out_scale;
      if constexpr (decltype(drop)::value != kNoDrop) {
        v = kept<decltype(drop)::value>(pass.dropout, pass.flags, pass.flags_first, i, index) ? v : v * A(0);
      }
      store(pass.out + i, v);
    });
  });
}

// g = dy * out_scale where the ReLU passed z and dropout kept it, else 0.
template <int Drop, typename T, typename A>
inline A relu_grad(const Pass<T, A>& pass, int64_t i, int64_t c, int64_t index) {
  // Every load unconditional and `&`, not `&&`: a branch would stop the loop from vectorising.
  const A g = widen(pass.dy[i]) * pass.out_scale;
  const bool live = (widen(pass.z[i]) * pass.scale[c] + pass.shift[c] > A(0)) &
                    kept<Drop>(pass.dropout, pass.flags, pass.flags_first, i, index);
  return live ? g : A(0);
}

template <typename T, typename A>
inline void grad_sums_tile(const Pass<T, A>& shared, int64_t t, A* sums) {
  Pass<T, A> pass = shared;
  with_drop_kind(pass.dropout, [&](auto drop) {
    tile_flags<decltype(drop)::value>(pass, t);
    tile_sums(pass.tiling, t, sums, [&](int64_t i, int64_t c, int64_t index) {
      const A g = relu_grad<decltype(drop)::value>(pass, i, c, index);
      return Pair<A>{g, g * (widen(pass.z[i]) - pass.center[c])};
    });
  });
  store_partials(pass.tiling, t, sums, pass.partial);
}

template <typename T, typename A>
inline void grad_apply_tile(const Pass<T, A>& shared, int64_t t) {
  Pass<T, A> pass = shared;
  with_drop_kind(pass.dropout, [&](auto drop) {
    tile_flags<decltype(drop)::value>(pass, t);
    visit_tile(pass.tiling, t, [&](int64_t i, int64_t c, int64_t index) {
      A v = relu_grad<decltype(drop)::value>(pass, i, c, index) * pass.scale[c];
      if (pass.k1 != nullptr) v += widen(pass.z[i]) * pass.k1[c] + pass.k0[c];
      store(pass.out + i, v);
    });
  });
}

// The tiles as plain functions, each compiled for AVX2 as well as for the baseline (chosen at load time, as in
// lgc_loss.cpp), with everything they call inlined so that the AVX2 copy is AVX2 throughout.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LGC_TILE_CLONES __attribute__((target_clones("avx2", "default"), flatten))
#else
#define LGC_TILE_CLONES
#endif
#define LGC_TILE_FUNCTIONS(T, A)                                                                                    \
  LGC_TILE_CLONES void run_moments_tile(const Pass<T, A>& pass, int64_t t, A* sums) { moments_tile(pass, t, sums); } \
  LGC_TILE_CLONES void run_apply_tile(const Pass<T, A>& pass, int64_t t) { apply_tile(pass, t); }                 \
  LGC_TILE_CLONES void run_grad_sums_tile(const Pass<T, A>& pass, int64_t t, A* sums) {                           \
    grad_sums_tile(pass, t, sums);                                                                                \
  }                                                                                                               \
  LGC_TILE_CLONES void run_grad_apply_tile(const Pass<T, A>& pass, int64_t t) { grad_apply_tile(pass, t); }
LGC_TILE_FUNCTIONS(float, float)
LGC_TILE_FUNCTIONS(Float16, float)
LGC_TILE_FUNCTIONS(BFloat16, float)
LGC_TILE_FUNCTIONS(double, double)
#undef LGC_TILE_FUNCTIONS

LGC_TILE_CLONES void run_keep_mask_tile(const Tiling& tiling, uint64_t seed, float p, uint8_t* keep, int64_t t) {
  visit_tile(tiling, t, [&](int64_t i, int64_t, int64_t index) {
    keep[i] = philox_keep(seed, static_cast<uint32_t>(index), p) ? 1 : 0;
  });
}

// Flags [4 * first, 4 * end) of bernoulli_keep_cpu (the caller keeps 4 * end <= the buffer's size).
LGC_TILE_CLONES void run_bernoulli_groups(uint64_t seed, uint32_t threshold, int64_t first, int64_t end,
                                          uint8_t* keep) {
  for (int64_t j = first; j < end; ++j) {
    uint32_t words[4];
    philox4(seed, static_cast<uint32_t>(j), words);
    for (int k = 0; k < 4; ++k) keep[4 * j + k] = words[k] >= threshold;
  }
}

// Bytes [first, end) of bernoulli_keep_bits_cpu, all whole.
LGC_TILE_CLONES void run_bernoulli_bytes(uint64_t seed, uint32_t threshold, int64_t first, int64_t end,
                                         uint8_t* bits) {
  for (int64_t b = first; b < end; ++b) bits[b] = bernoulli_bits_byte(seed, threshold, b);
}

// Runs a reduction's tiles (each with 3 * C values of scratch) and returns its partial sums.
template <typename T, typename A, typename F>
std::vector<double> reduce_tiles(Pass<T, A>& pass, int threads, F&& run_tile) {
  std::vector<double> partial(static_cast<size_t>(2 * pass.tiling.s.c * pass.tiling.per_channel()));
  pass.partial = partial.data();
  for_each_tile(pass.tiling, threads, [&](int64_t t) {
    std::vector<A> sums(static_cast<size_t>(3 * pass.tiling.s.c));
    run_tile(pass, t, sums.data());
  });
  return partial;
}

template <typename T, typename A>
void moments(const T* z, EpilogueShape shape, A* mean, A* var, int threads) {
  Pass<T, A> pass{Tiling(shape), z, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, A(0), {}, nullptr};
  const std::vector<double> partial =
      reduce_tiles(pass, threads, [](const Pass<T, A>& p, int64_t t, A* sums) { run_moments_tile(p, t, sums); });
  // Chan's combination of the tiles' (count, mean, M2), in slot order.
  const int64_t per_channel = pass.tiling.per_channel();
  for (int64_t c = 0; c < shape.c; ++c) {
    double n_all = 0, mean_all = 0, m2_all = 0;
    for (int64_t j = 0; j < per_channel; ++j) {
      const double n_tile = static_cast<double>(pass.tiling.pixels(j));
      const double delta = partial[2 * (c * per_channel + j)] - mean_all;
      const double n_new = n_all + n_tile;
      mean_all += delta * n_tile / n_new;
      m2_all += partial[2 * (c * per_channel + j) + 1] + delta * delta * n_all * n_tile / n_new;
      n_all = n_new;
    }
    mean[c] = static_cast<A>(mean_all);
    var[c] = static_cast<A>(m2_all / n_all);
  }
}

template <typename T, typename A>
void apply(const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, A out_scale, T* y,
           EpilogueShape shape, int threads) {
  const Pass<T, A> pass{Tiling(shape), z,       nullptr,   y,       scale, shift,
                        nullptr,       nullptr, nullptr, out_scale, dropout, nullptr};
  for_each_tile(pass.tiling, threads, [&](int64_t t) { run_apply_tile(pass, t); });
}

template <typename T, typename A>
void grad_sums(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout,
               const A* center, A out_scale, EpilogueShape shape, A* sum_g, A* sum_g_centered, int threads) {
  Pass<T, A> pass{Tiling(shape), z, dy, nullptr, scale, shift, center, nullptr, nullptr, out_scale, dropout, nullptr};
  const std::vector<double> partial =
      reduce_tiles(pass, threads, [](const Pass<T, A>& p, int64_t t, A* sums) { run_grad_sums_tile(p, t, sums); });
  const int64_t per_channel = pass.tiling.per_channel();
  for (int64_t c = 0; c < shape.c; ++c) {
    double a = 0, b = 0;
    for (int64_t j = 0; j < per_channel; ++j) {
      a += partial[2 * (c * per_channel + j)];
      b += partial[2 * (c * per_channel + j) + 1];
    }
    sum_g[c] = static_cast<A>(a);
    sum_g_centered[c] = static_cast<A>(b);
  }
}

template <typename T, typename A>
void grad_apply(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, const A* k1,
                const A* k0, A out_scale, T* dz, EpilogueShape shape, int threads) {
  const Pass<T, A> pass{Tiling(shape), z, dy, dz, scale, shift, nullptr, k1, k0, out_scale, dropout, nullptr};
  for_each_tile(pass.tiling, threads, [&](int64_t t) { run_grad_apply_tile(pass, t); });
}

}  // namespace

float to_float(Float16 h) { return half_to_float(h.bits); }
float to_float(BFloat16 b) { return bfloat_to_float(b.bits); }
Float16 to_float16(float f) { return Float16{float_to_half(f)}; }
BFloat16 to_bfloat16(float f) { return BFloat16{float_to_bfloat(f)}; }

void dropout_keep_mask_cpu(uint64_t seed, float p, EpilogueShape shape, uint8_t* keep, int threads) {
  const Tiling tiling(shape);
  for_each_tile(tiling, threads, [&](int64_t t) { run_keep_mask_tile(tiling, seed, p, keep, t); });
}

void bernoulli_keep_cpu(uint64_t seed, float p, int64_t count, uint8_t* keep, int threads) {
  const uint32_t threshold = bernoulli_threshold(p);
  const int64_t groups = count / 4;  // whole groups of four; the last 0-3 flags come from one more counter
  parallel_for((groups + kTile - 1) / kTile, threads, [&](int64_t t) {  // a tile: kTile groups
    run_bernoulli_groups(seed, threshold, t * kTile, std::min(groups, (t + 1) * kTile), keep);
  });
  if (count % 4 != 0) {
    uint32_t words[4];
    philox4(seed, static_cast<uint32_t>(groups), words);
    for (int64_t k = 0; k < count % 4; ++k) keep[4 * groups + k] = words[k] >= threshold;
  }
}

void bernoulli_keep_bits_cpu(uint64_t seed, float p, int64_t count, uint8_t* bits, int threads) {
  const uint32_t threshold = bernoulli_threshold(p);
  const int64_t whole = count / 8;
  parallel_for((whole + kTile - 1) / kTile, threads, [&](int64_t t) {  // a tile: kTile bytes
    run_bernoulli_bytes(seed, threshold, t * kTile, std::min(whole, (t + 1) * kTile), bits);
  });
  if (count % 8 != 0) bits[whole] = bernoulli_bits_byte(seed, threshold, whole) & ((1u << (count % 8)) - 1u);
}

#define LGC_EPILOGUE_KERNELS(T, A)                                                                                 \
  void bn_moments_cpu(const T* z, EpilogueShape shape, A* mean, A* var, int threads) {                           \
    moments(z, shape, mean, var, threads);                                                                        \
  }                                                                                                               \
  void bn_apply_cpu(const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, A out_scale, T* y, \
                    EpilogueShape shape, int threads) {                                                           \
    apply(z, scale, shift, dropout, out_scale, y, shape, threads);                                                \
  }                                                                                                               \
  void bn_grad_sums_cpu(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout,  \
                        const A* center, A out_scale, EpilogueShape shape, A* sum_g, A* sum_g_centered,           \
                        int threads) {                                                                            \
    grad_sums(dy, z, scale, shift, dropout, center, out_scale, shape, sum_g, sum_g_centered, threads);            \
  }                                                                                                               \
  void bn_grad_apply_cpu(const T* dy, const T* z, const A* scale, const A* shift, const EpilogueDropout& dropout, \
                         const A* k1, const A* k0, A out_scale, T* dz, EpilogueShape shape, int threads) {        \
    grad_apply(dy, z, scale, shift, dropout, k1, k0, out_scale, dz, shape, threads);                              \
  }
LGC_EPILOGUE_KERNELS(float, float)
LGC_EPILOGUE_KERNELS(Float16, float)
LGC_EPILOGUE_KERNELS(BFloat16, float)
LGC_EPILOGUE_KERNELS(double, double)
#undef LGC_EPILOGUE_KERNELS

}  // namespace lgc
