// CPU kernel convolution: scale * K with K = (1/5) sum_s g_s g_s^T, applied as separable passes.
//
// Per (plane, column strip, row band) work unit:
//   horizontal pass: each input row, zero-padded into a row buffer, gives five rows h_s = (scale/5) g_s (*) x; the
//     symmetric pair sums x[j-k] + x[j+k] are formed once and shared by the five Gaussians.
//   vertical pass: y = sum_s g_s (*) h_s down the columns, several output rows per block so that each loaded row
//     of h_s feeds several outputs from registers, and several FMA chains per row to hide the FMA latency.
// h is stored in column panels of one SIMD vector (8 floats / 4 doubles) so the vertical pass streams contiguous
// memory; rows are processed in chunks, carrying the 2*22 halo rows of h from one chunk to the next.
#include "cpu/kernel_conv.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vectors pass between always-inlined helpers only, so the "default" clone's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace lgc {
namespace {

#define LGC_INLINE inline __attribute__((always_inline))

constexpr int kR = kKernelConvRadius;
constexpr int kG = kKernelConvGaussians;
constexpr int kRowsPerBlock = 4;     // output rows per vertical-pass block
constexpr int kChains = 2;           // independent accumulators per output row
constexpr int64_t kMaxStrip = 128;   // columns per work unit
constexpr int64_t kMaxChunk = 128;   // output rows per chunk (multiple of kRowsPerBlock)
constexpr int64_t kMinBandRows = 64;
constexpr int64_t kMinPixelsPerThread = 65536;

template <class T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <class T>
using Vec = typename VecOf<T>::type;
template <class T>
constexpr int64_t kLanes = 32 / sizeof(T);

template <class T>
LGC_INLINE Vec<T> broadcast(T value) {
  Vec<T> v;
  for (int64_t l = 0; l < kLanes<T>; ++l) v[l] = value;
  return v;
}

template <class T>
struct Taps {
  T horizontal[kG][kR + 1];       // (scale / 5) g_s[k], broadcast where used
  Vec<T> vertical[kG][kR + 1];    // g_s[k], broadcast
};

template <class T>
Taps<T> make_taps(double scale) {
  Taps<T> t;
  for (int s = 0; s < kG; ++s) {
    for (int k = 0; k <= kR; ++k) {
      const double sigma = kKernelConvSigmas[s];
      const double g = std::exp(-double(k) * k / (2.0 * sigma * sigma));
      t.horizontal[s][k] = T(g * (scale / kG));
      t.vertical[s][k] = broadcast(T(g));
    }
  }
  return t;
}

template <class T>
LGC_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Workspace layout: h_s for panel p, buffer row b at hbuf + ((s * panels + p) * stride + b) * lanes.
template <class T>
struct Strip {
  const T* x;    // plane base
  T* y;          // plane base
  int64_t height, width;
  int64_t col0, cols, panels;  // strip columns [col0, col0 + cols), panels = ceil(cols / lanes)
  T* row;        // panels * lanes + 2R zero-padded input row
  T* h;          // aligned to 32 bytes
  int64_t stride;
  const Taps<T>* taps;

  LGC_INLINE Vec<T>* hrow(int s, int64_t p, int64_t b) const {
    return reinterpret_cast<Vec<T>*>(h + ((s * panels + p) * stride + b) * kLanes<T>);
  }
};

// NV adjacent panels of one input row (centre = row buffer position of the first output) into h.
template <class T, int NV>
LGC_INLINE void horizontal_panels(const Strip<T>& st, const T* centre, int64_t p, int64_t b) {
  constexpr int64_t L = kLanes<T>;
  constexpr const int* radius = KernelConvRadii<T>::value;
  const auto& w = st.taps->horizontal;
  Vec<T> acc[kG][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const Vec<T> c = load(centre + v * L);
#pragma GCC unroll 8
    for (int s = 0; s < kG; ++s) acc[s][v] = broadcast(w[s][0]) * c;
  }
#pragma GCC unroll 32
  for (int k = 1; k <= kR; ++k) {
    Vec<T> pair[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) pair[v] = load(centre + v * L - k) + load(centre + v * L + k);
#pragma GCC unroll 8
    for (int s = 0; s < kG; ++s) {
      if (k > radius[s]) continue;
      const Vec<T> wsk = broadcast(w[s][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][v] += wsk * pair[v];
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < kG; ++s) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *st.hrow(s, p + v, b) = acc[s][v];
  }
}

// Image row r (or zeros outside the image) into buffer row b of every h_s.
template <class T>
LGC_INLINE void horizontal_row(const Strip<T>& st, int64_t r, int64_t b) {
  constexpr int64_t L = kLanes<T>;
  if (r < 0 || r >= st.height) {
    for (int s = 0; s < kG; ++s)
      for (int64_t p = 0; p < st.panels; ++p) *st.hrow(s, p, b) = Vec<T>{};
    return;
  }
  // row[t] is column col0 - R + t, zero outside [0, width).
  const int64_t n = st.panels * L + 2 * kR;
  const int64_t first = std::max<int64_t>(0, kR - st.col0);
  const int64_t last = std::min<int64_t>(n, st.width - st.col0 + kR);
  std::fill(st.row, st.row + first, T(0));
  std::memcpy(st.row + first, st.x + r * st.width + st.col0 - kR + first, sizeof(T) * (last - first));
  std::fill(st.row + last, st.row + n, T(0));
  int64_t p = 0;
  for (; p + 1 < st.panels; p += 2) horizontal_panels<T, 2>(st, st.row + kR + p * L, p, b);
  if (p < st.panels) horizontal_panels<T, 1>(st, st.row + kR + p * L, p, b);
}

// Output rows i .. i + kRowsPerBlock - 1 of the chunk (buffer row of output i is i + R), panel p, stored as full
// vectors at out, out + out_stride, ...
template <class T>
LGC_INLINE void vertical_block(const Strip<T>& st, int64_t p, int64_t i, T* out, int64_t out_stride) {
  constexpr const int* radius = KernelConvRadii<T>::value;
  const auto& w = st.taps->vertical;
  Vec<T> acc[kRowsPerBlock][kChains] = {};
#pragma GCC unroll 8
  for (int s = 0; s < kG; ++s) {
    const Vec<T>* h = st.hrow(s, p, i + kR);
#pragma GCC unroll 8
    for (int a = 0; a < kRowsPerBlock; ++a) acc[a][0] += w[s][0] * h[a];
#pragma GCC unroll 32
    for (int k = 1; k <= kR; ++k) {
      if (k > radius[s]) continue;
#pragma GCC unroll 8
      for (int a = 0; a < kRowsPerBlock; ++a) acc[a][k % kChains] += w[s][k] * (h[a - k] + h[a + k]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < kRowsPerBlock; ++a) {
    Vec<T> sum = acc[a][0];
#pragma GCC unroll 8
    for (int c = 1; c < kChains; ++c) sum += acc[a][c];
    std::memcpy(out + a * out_stride, &sum, sizeof(sum));
  }
}

// Output rows [row0, row1) of the strip.
template <class T>
LGC_INLINE void strip_rows(const Strip<T>& st, int64_t row0, int64_t row1) {
  constexpr int64_t L = kLanes<T>;
  int64_t carried = 0;  // buffer rows [0, carried) already hold h from the previous chunk
  for (int64_t rc = row0; rc < row1; rc += kMaxChunk) {
    const int64_t rows = std::min(kMaxChunk, row1 - rc);
    const int64_t blocked = (rows + kRowsPerBlock - 1) / kRowsPerBlock * kRowsPerBlock;
    // Buffer row b holds image row rc - R + b.
    for (int64_t b = carried; b < blocked + 2 * kR; ++b) horizontal_row(st, rc - kR + b, b);
    for (int64_t p = 0; p < st.panels; ++p) {
      const int64_t lanes = std::min(L, st.cols - p * L);
      T* out = st.y + rc * st.width + st.col0 + p * L;
      for (int64_t i = 0; i < blocked; i += kRowsPerBlock) {
        // The ragged edges of the strip go through a scratch tile.
        const bool whole = lanes == L && i + kRowsPerBlock <= rows;
        alignas(32) T tile[kRowsPerBlock * L];
        vertical_block(st, p, i, whole ? out + i * st.width : tile, whole ? st.width : L);
        if (!whole) {
          for (int64_t a = 0; a < std::min<int64_t>(kRowsPerBlock, rows - i); ++a)
            std::copy(tile + a * L, tile + a * L + lanes, out + (i + a) * st.width);
        }
      }
    }
    if (rc + rows < row1) {
      for (int s = 0; s < kG; ++s)
        for (int64_t p = 0; p < st.panels; ++p)
          std::memmove(st.hrow(s, p, 0), st.hrow(s, p, rows), sizeof(Vec<T>) * 2 * kR);
      carried = 2 * kR;
    }
  }
}

// x86: an AVX2+FMA build and a baseline build of the kernels, picked at load time for the CPU at hand.
#if defined(__x86_64__) && defined(__GNUC__)
#define LGC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LGC_CLONES
#endif

LGC_CLONES void strip_rows_f32(const Strip<float>* st, int64_t row0, int64_t row1) {
  strip_rows(*st, row0, row1);
}
LGC_CLONES void strip_rows_f64(const Strip<double>* st, int64_t row0, int64_t row1) {
  strip_rows(*st, row0, row1);
}
void strip_rows_any(const Strip<float>* st, int64_t row0, int64_t row1) { strip_rows_f32(st, row0, row1); }
void strip_rows_any(const Strip<double>* st, int64_t row0, int64_t row1) { strip_rows_f64(st, row0, row1); }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
void run(const T* x, T* y, int64_t planes, int64_t height, int64_t width, double scale, int num_threads) {
  if (planes <= 0 || height <= 0 || width <= 0) return;
  constexpr int64_t L = kLanes<T>;
  const Taps<T> taps_table = make_taps<T>(scale);
#ifdef _OPENMP
  const int64_t threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int64_t threads = 1;
  (void)num_threads;
#endif
  // Column strips of equal width (a multiple of the SIMD width except the last).
  int64_t strips = (width + kMaxStrip - 1) / kMaxStrip;
  const int64_t strip_cols = ((width + strips - 1) / strips + L - 1) / L * L;
  strips = (width + strip_cols - 1) / strip_cols;
  // Row bands only when planes x strips leave threads idle; each band recomputes 2R rows of h.
  const int64_t columns = planes * strips;
  int64_t bands = 1;
  if (columns < 4 * threads) {
    bands = std::min((4 * threads + columns - 1) / columns, (height + kMinBandRows - 1) / kMinBandRows);
    bands = std::max<int64_t>(bands, 1);
  }
  int64_t band_rows = (height + bands - 1) / bands;
  band_rows = (band_rows + kRowsPerBlock - 1) / kRowsPerBlock * kRowsPerBlock;
  bands = (height + band_rows - 1) / band_rows;

  const int64_t panels_max = strip_cols / L;
  const int64_t stride = std::min(kMaxChunk, band_rows) + 2 * kR;
  const int64_t h_bytes = int64_t(sizeof(Vec<T>)) * kG * panels_max * stride;
  const int64_t row_len = panels_max * L + 2 * kR;
  const int64_t units = planes * strips * bands;
  // A thread per kMinPixelsPerThread pixels at most: waking threads costs more than small maps take.
  const int64_t by_size = planes * height * width / kMinPixelsPerThread;
  const int team = static_cast<int>(std::max<int64_t>(1, std::min({threads, units, by_size})));
  // Per-thread workspaces, allocated up front so that a failure throws outside the parallel region.
  std::unique_ptr<void, FreeDeleter> h_mem(std::aligned_alloc(32, h_bytes * team));
  std::unique_ptr<T[]> rows(new T[row_len * team]);
  if (!h_mem) throw std::bad_alloc();

#pragma omp parallel num_threads(team)
  {
#ifdef _OPENMP
    const int64_t me = omp_get_thread_num();
#else
    const int64_t me = 0;
#endif
#pragma omp for schedule(dynamic)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t plane = u / (strips * bands);
      const int64_t strip = (u / bands) % strips;
      const int64_t band = u % bands;
      Strip<T> st;
      st.x = x + plane * height * width;
      st.y = y + plane * height * width;
      st.height = height;
      st.width = width;
      st.col0 = strip * strip_cols;
      st.cols = std::min(strip_cols, width - st.col0);
      st.panels = (st.cols + L - 1) / L;
      st.row = rows.get() + me * row_len;
      st.h = reinterpret_cast<T*>(static_cast<char*>(h_mem.get()) + me * h_bytes);
      st.stride = stride;
      st.taps = &taps_table;
      strip_rows_any(&st, band * band_rows, std::min(height, (band + 1) * band_rows));
    }
  }
}

}  // namespace

void kernel_conv_cpu(const float* x, float* y, int64_t planes, int64_t height, int64_t width, double scale,
                     int num_threads) {
  run(x, y, planes, height, width, scale, num_threads);
}

void kernel_conv_cpu(const double* x, double* y, int64_t planes, int64_t height, int64_t width, double scale,
                     int num_threads) {
  run(x, y, planes, height, width, scale, num_threads);
}

}  // namespace lgc
