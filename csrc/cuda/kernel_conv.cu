// CUDA forward of the 45x45 kernel convolution (paper eq. 1): y = scale * (K * x) per plane, zero padding, same size.
//
// Variant: separable, on the CUDA cores, float32 accumulation (float64 for double inputs). K = (1/5) sum_s g_s g_s^T:
//   y[o][c] = (1/5) sum_r sum_s g_s[|o - r|] h_s[r][c],   h_s[r][c] = sum_k g_s[|k|] x[r][c + k].
// A thread owns P adjacent columns of a strip (P = 2; 1 for double) and streams down its rows once:
//   horizontal: the 22 symmetric pair sums x[c-k] + x[c+k] are shared by the five Gaussians;
//   vertical: row r adds C_d = sum_s g_s[d] h_s[r] to output rows r-d and r+d, kept as 44 running sums per column in
//     registers (one add per row and sum; the shift by one row is folded into the adds, so no register moves);
//     after row r, output row r-22 is complete and is written.
// No h plane is stored, and rows outside the map are zero padding, so the vertical halo costs nothing inside a plane.
// The taps are compile-time constants (FFMA immediates: no constant-memory loads); taps below 2^-30 of the centre
// (2^-60 in double) are skipped. SASS of the float row loop (sm_90, nvcc 13): 374 FFMA + 130 FADD + 23 LDS.64 +
// ~14 other instructions per row and thread, i.e. ~270 per output pixel; 168 registers, no spills in the loop.
// The input rows go through shared memory in batches of 8 (two __syncthreads per batch), converted to the
// accumulation type once; halo columns outside the map are zero-filled once per block. Global loads are scalar but
// coalesced (consecutive threads, consecutive columns): ~1.5 per pixel, under 1% of the instructions.
//
// Sizing: a segment is a strip of P t consecutive columns of one plane (t <= 128 threads); a block holds G segments
// (G t <= 128 threads; at small widths the segments are different planes) and a range of output rows. Shared
// memory: 8 rows x G x (P t + 44) accumulation elements (8.75 KB at 96x96 float; always <= 48 KB, no opt-in).
// At 96x96: t = 48, G = 2 (two planes per 96-thread block, 8704 blocks for 256x68). At 1024 wide: t = 128, four
// 256-column strips. Rows are split into chunks (each re-reads 22 rows above and below) only when there are too few
// blocks for the SMs (see split_rows; occupancy from cudaOccupancyMaxActiveBlocksPerMultiprocessor): on 132 SMs
// 1x68x1024^2 -> 4 chunks of 256 rows, 1x1x2160x3840 -> 17 chunks of 128 rows. The grid is one-dimensional (at most
// 2^31 - 1 blocks); rows and columns are int (sides up to 2^30), plane and row offsets int64.
//
// Not implemented: the banded tensor-core form Y = sum_s A_s X A_s^T with a 3xTF32 split. With the band padded to
// mma tiles (m16n8k8: 16 output rows need 64 input rows per Gaussian) both passes cost ~1.8 mma per pixel, times 3
// for the split, which is no fewer issue slots than the ~270 instructions per pixel here.
// Issue-bound estimate for 256x68x96^2 float32 on an H100 SXM: 160M pixels * ~270 instructions / 32 lanes /
// (132 SMs * 4 issues/clock * ~1.75 GHz) ~= 1.5 ms (memory floor ~0.4 ms). Measured on an H100 80GB HBM3
// (bench/bench_kernel_conv.py, bench/results/nvidia-h100-80gb-hbm3.json): 2.23 ms forward, 4.47 ms forward+backward;
// 1x68x1024^2 1.17 ms.
#include "cuda/kernel_conv.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <type_traits>

#include "cuda/kernel_common.cuh"

namespace lgc {
namespace kernel_conv_detail {

constexpr int kRadius = 22;                  // the kernel is 45 = 2 * 22 + 1 taps wide
constexpr int kHalfTaps = kRadius + 1;       // g_s[0..22]
constexpr int kSigmas = 5;                   // sigma = 1, 3, 5, 7, 9
constexpr int kRunning = 2 * kRadius;        // running output sums per column
constexpr int kMaxThreads = 128;             // threads per block
constexpr int kBatchRows = 8;                // input rows per shared-memory buffer
constexpr int kLoadsPerRow = 3;              // a segment row loads at most 3t columns (see make_plan)
constexpr size_t kSharedBudget = 48 * 1024;  // no opt-in needed
constexpr int64_t kMaxSide = int64_t{1} << 30;  // rows and columns are int inside the kernel

// g_s[k] = exp(-k^2 / (2 sigma_s^2)), k = 0..22, stored as 0 below 2^-60 (the kernel weight 1/5 is applied to
// the output).
#define LGC_KERNEL_CONV_TAPS                                                                                      \
  {                                                                                                               \
    {1.0, 0.6065306597126334, 0.1353352832366127, 0.011108996538242306, 0.00033546262790251185,                   \
     3.726653172078671e-06, 1.522997974471263e-08, 2.289734845645553e-11, 1.2664165549094176e-14,                 \
     2.576757109154981e-18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},                                               \
    {1.0, 0.9459594689067654, 0.8007374029168081, 0.6065306597126334, 0.41111229050718745,                        \
     0.24935220877729622, 0.1353352832366127, 0.06572852861653047, 0.028565500784550377, 0.011108996538242306,    \
     0.0038659201394728076, 0.001203859994828203, 0.00033546262790251185, 8.364834722972752e-05,                  \
     1.866446911352057e-05, 3.726653172078671e-06, 6.658361469857315e-07, 1.0645371411076024e-07,                 \
     1.522997974471263e-08, 1.9497677860172307e-09, 2.233631436203166e-10, 2.289734845645553e-11,                 \
     2.1004092927322525e-12},                                                                                     \
    {1.0, 0.9801986733067553, 0.9231163463866358, 0.835270211411272, 0.7261490370736909, 0.6065306597126334,      \
     0.4867522559599717, 0.37531109885139957, 0.27803730045319414, 0.19789869908361465, 0.1353352832366127,       \
     0.08892161745938634, 0.056134762834133725, 0.034047454734599344, 0.019841094744370288,                       \
     0.011108996538242306, 0.005976022895005943, 0.0030887154082367687, 0.001533810679324463,                     \
     0.0007318024188804728, 0.00033546262790251185, 0.00014774836023203364, 6.252150377482026e-05},              \
    {1.0, 0.9898478033787338, 0.9600054412854777, 0.9122540768285452, 0.8493658165683124, 0.7748374288832494,     \
     0.6925693242051977, 0.6065306597126334, 0.5204501210207021, 0.4375647377002692, 0.360447788597821,           \
     0.2909238070461482, 0.23006629899380907, 0.17826397958504792, 0.1353352832366127, 0.10066889977289777,       \
     0.0733696513683829, 0.05239314106982558, 0.03665804195337801, 0.025130488985274417, 0.01687988414878991,     \
     0.011108996538242306, 0.007163364470919217},                                                                 \
    {1.0, 0.9938461733264412, 0.9756109800648459, 0.9459594689067654, 0.9059551911095096, 0.8569968914352789,     \
     0.8007374029168081, 0.7389912962803088, 0.6736384553447268, 0.6065306597126334, 0.5394075072376266,          \
     0.47382672639536405, 0.41111229050718745, 0.35232195499549696, 0.29823409618142155, 0.24935220877729622,     \
     0.20592424643419874, 0.16797323675753362, 0.1353352832366127, 0.10770114519003211, 0.08465798862252998,      \
     0.06572852861653047, 0.05040553336275365},                                                                   \
  }

// Largest k whose tap g_s[k] is kept: g_s[k] >= 2^-30 in float (2^-60 in double); the rest cannot move a sum.
LGC_HD constexpr int last_tap(bool wide, int s) { return s == 0 ? (wide ? 9 : 6) : (s == 1 && !wide ? 19 : 22); }

// Called with constant arguments only (inside fully unrolled loops), so every tap folds into an FFMA immediate.
template <typename Acc>
LGC_HD constexpr Acc tap(int s, int k) {
  constexpr double taps[kSigmas][kHalfTaps] = LGC_KERNEL_CONV_TAPS;
  return static_cast<Acc>(taps[s][k]);
}
#undef LGC_KERNEL_CONV_TAPS

// kCols: adjacent columns per thread (two share their float2 shared-memory loads); kMinBlocks caps the registers
// (3 blocks of 128 threads: 168 per thread, enough for 2 x 44 running sums without spills in the row loop).
template <typename T>
struct Traits {
  using Acc = float;
  using Vec = float2;
  static constexpr int kCols = 2;
  static constexpr int kMinBlocks = 3;
};
template <>
struct Traits<double> {
  using Acc = double;
  using Vec = double;
  static constexpr int kCols = 1;
  static constexpr int kMinBlocks = 2;
};

LGC_HD double element(double v, int) { return v; }
LGC_HD float element(float2 v, int q) { return q == 0 ? v.x : v.y; }

// a * b + c rounded once (float or double), on the device and in the host emulation alike.
template <typename T>
LGC_HD T fused(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

LGC_HD int smaller(int a, int b) { return a < b ? a : b; }
LGC_HD int larger(int a, int b) { return a > b ? a : b; }

// How the (planes, height, width) volume is cut into blocks. Chosen on the host, passed by value to the kernel.
// P = Traits<In>::kCols. Rows and columns are int (the launcher rejects sides over 2^30); plane offsets int64.
struct Plan {
  int height = 0;
  int width = 0;
  int seg_threads = 0;     // t: threads of one segment; thread i owns columns c0 + P i .. c0 + P i + P - 1
  int segs_per_block = 0;  // G: segments (strips of possibly different planes) sharing one block
  int pitch = 0;           // shared-memory row of a segment: columns c0 - 22 .. c0 + P t + 21
  int chunk_rows = 0;      // output rows per block
  int chunks = 0;          // row chunks per segment
  int strips = 0;          // segments per plane
  int64_t segments = 0;    // planes * strips
  int64_t blocks = 0;
  double weight = 1.0 / kSigmas;  // the kernel weight 1/5 times the caller's scale, applied as each output is stored

  LGC_HD int threads() const { return seg_threads * segs_per_block; }
  LGC_HD int buffer_elems() const { return kBatchRows * segs_per_block * pitch; }
};

// Everything one thread keeps across the row loop (registers on the device: every index below is static).
template <typename In>
struct Column {
  using Acc = typename Traits<In>::Acc;
  const In* src = nullptr;  // this segment's plane
  In* dst = nullptr;
  bool active = false;      // false for the padding segments of the last block
  int lane = 0;
  int seg = 0;
  int col = 0;              // first owned column
  int load_lo = 0;          // loaded columns [load_lo, load_hi) of every row
  int load_hi = 0;
  int smem_shift = 0;       // shared-memory index of column c is c + smem_shift
  int out_begin = 0, out_end = 0, in_begin = 0, in_end = 0;
  Acc run[Traits<In>::kCols][kRunning];  // run[p][j]: partial sum of output row (next input row) - 22 + j
};

template <typename In>
LGC_HD void column_init(Column<In>& c, const Plan& plan, const In* x, In* y, int64_t block, int thread) {
  c.seg = thread / plan.seg_threads;
  c.lane = thread % plan.seg_threads;
  const int64_t group = block / plan.chunks;
  const int chunk = static_cast<int>(block % plan.chunks);
  const int64_t segment = group * plan.segs_per_block + c.seg;
  c.active = segment < plan.segments;
  const int64_t plane = c.active ? segment / plan.strips : 0;
  constexpr int P = Traits<In>::kCols;
  const int c0 = static_cast<int>(segment % plan.strips) * P * plan.seg_threads;
  const int64_t plane_offset = plane * plan.height * plan.width;
  c.src = x + plane_offset;
  c.dst = y + plane_offset;
  c.col = c0 + P * c.lane;
  c.load_lo = larger(c0 - kRadius, 0);
  c.load_hi = smaller(c0 + P * plan.seg_threads + kRadius, plan.width);
  c.smem_shift = kRadius - c0;
  c.out_begin = chunk * plan.chunk_rows;
  c.out_end = smaller(c.out_begin + plan.chunk_rows, plan.height);
  c.in_begin = larger(c.out_begin - kRadius, 0);
  c.in_end = smaller(c.out_end + kRadius, plan.height);
#pragma unroll
  for (int p = 0; p < P; ++p) {
#pragma unroll
    for (int j = 0; j < kRunning; ++j) c.run[p][j] = 0;
  }
}

template <typename In>
LGC_HD int batch_count(const Column<In>& c) {
  return (c.in_end - c.in_begin + kBatchRows - 1) / kBatchRows;
}

// Global -> shared buffer (converted to the accumulation type): rows of batch b, columns load_lo + lane + k t.
// Columns outside the map are never written and stay zero.
template <typename In>
LGC_HD void column_load(const Column<In>& c, const Plan& plan, int batch, typename Traits<In>::Acc* buffer) {
#pragma unroll
  for (int rr = 0; rr < kBatchRows; ++rr) {
    const int row = c.in_begin + batch * kBatchRows + rr;
    const In* src = c.src + int64_t{row} * plan.width;
    typename Traits<In>::Acc* dst = buffer + (rr * plan.segs_per_block + c.seg) * plan.pitch + c.smem_shift;
#pragma unroll
    for (int k = 0; k < kLoadsPerRow; ++k) {
      const int col = c.load_lo + c.lane + k * plan.seg_threads;
      if (c.active && row < c.in_end && col < c.load_hi) dst[col] = to_acc(src[col]);
    }
  }
}

// Output row `row` of the thread's columns from sums[p] (p < P), times plan.weight (scale / 5).
template <typename In>
LGC_HD void store_row(const Column<In>& c, const Plan& plan, int row, const typename Traits<In>::Acc* sums,
                      int stride) {
  using Acc = typename Traits<In>::Acc;
  In* out = c.dst + int64_t{row} * plan.width + c.col;
  const Acc weight = static_cast<Acc>(plan.weight);
#pragma unroll
  for (int p = 0; p < Traits<In>::kCols; ++p) {
    if (c.col + p < plan.width) out[p] = from_acc<In>(sums[p * stride] * weight);
  }
}

// One input row r: horizontal pass for the thread's P columns, then their contributions to output rows r-22..r+22.
// `row` points at the shared-memory element of column col - 22 (44 + P elements, aligned for Traits::Vec).
template <typename In>
LGC_HD void column_step(Column<In>& c, const Plan& plan, const typename Traits<In>::Acc* row, int r) {
  using Acc = typename Traits<In>::Acc;
  using Vec = typename Traits<In>::Vec;
  constexpr int P = Traits<In>::kCols;
  constexpr bool wide = std::is_same_v<Acc, double>;
  constexpr int kElems = 2 * kRadius + P;
  Acc e[kElems];
  const Vec* row_vec = reinterpret_cast<const Vec*>(row);
#pragma unroll
  for (int m = 0; m < kElems / P; ++m) {
    const Vec v = row_vec[m];
#pragma unroll
    for (int q = 0; q < P; ++q) e[P * m + q] = element(v, q);
  }
  Acc h[P][kSigmas];
#pragma unroll
  for (int p = 0; p < P; ++p) {
#pragma unroll
    for (int s = 0; s < kSigmas; ++s) h[p][s] = tap<Acc>(s, 0) * e[kRadius + p];
  }
#pragma unroll
  for (int k = kRadius; k >= 1; --k) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const Acc pair = e[kRadius + p - k] + e[kRadius + p + k];
#pragma unroll
      for (int s = 0; s < kSigmas; ++s) {
        if (k <= last_tap(wide, s)) h[p][s] = fused(tap<Acc>(s, k), pair, h[p][s]);
      }
    }
  }
  Acc out[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    // contrib[d]: this row's share of output rows r - d and r + d.
    Acc contrib[kHalfTaps];
#pragma unroll
    for (int d = 0; d <= kRadius; ++d) {
      Acc sum = 0;
#pragma unroll
      for (int s = 0; s < kSigmas; ++s) {
        if (d <= last_tap(wide, s)) sum = fused(tap<Acc>(s, d), h[p][s], sum);
      }
      contrib[d] = sum;
    }
    // Add the row and shift by one: run[j] becomes output row (r + 1) - 22 + j, which is r - d for j = 21 - d and
    // r + d for j = 21 + d. Ascending j reads run[j + 1] before it is overwritten.
    out[p] = c.run[p][0] + contrib[kRadius];
#pragma unroll
    for (int j = 0; j + 1 < kRunning; ++j) {
      c.run[p][j] = c.run[p][j + 1] + contrib[j < kRadius ? kRadius - 1 - j : j + 1 - kRadius];
    }
    c.run[p][kRunning - 1] = contrib[kRadius];
  }
  const int done = r - kRadius;  // < out_end because r < in_end <= out_end + 22
  if (c.active && done >= c.out_begin) store_row(c, plan, done, out, 1);
}

template <typename In>
LGC_HD void column_consume(Column<In>& c, const Plan& plan, int batch, const typename Traits<In>::Acc* buffer) {
  const int first = c.in_begin + batch * kBatchRows;
  const int rows = smaller(c.in_end - first, kBatchRows);
  const typename Traits<In>::Acc* base = buffer + c.seg * plan.pitch + Traits<In>::kCols * c.lane;
#pragma unroll 1
  for (int rr = 0; rr < rows; ++rr) column_step(c, plan, base + rr * plan.segs_per_block * plan.pitch, first + rr);
}

// After the last input row the running sums of the last (up to) 22 output rows are complete: rows below are zero.
template <typename In>
LGC_HD void column_flush(const Column<In>& c, const Plan& plan) {
#pragma unroll
  for (int j = 0; j < kRadius; ++j) {
    const int row = c.in_end - kRadius + j;
    if (c.active && row >= c.out_begin && row < c.out_end) store_row(c, plan, row, &c.run[0][j], kRunning);
  }
}

template <typename In>
__global__ void __launch_bounds__(kMaxThreads, Traits<In>::kMinBlocks)
    kernel_conv_rows(const In* __restrict__ x, In* __restrict__ y, Plan plan) {
  using Acc = typename Traits<In>::Acc;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  Acc* buffer = reinterpret_cast<Acc*>(shared_raw);
  for (int i = threadIdx.x; i < plan.buffer_elems(); i += blockDim.x) buffer[i] = Acc(0);

  Column<In> c;
  column_init(c, plan, x, y, blockIdx.x, static_cast<int>(threadIdx.x));
  const int batches = batch_count(c);  // the same for every thread of the block
  for (int b = 0; b < batches; ++b) {
    __syncthreads();  // the zero fill, or every read of the previous batch, is done
    column_load(c, plan, b, buffer);
    __syncthreads();
    column_consume(c, plan, b, buffer);
  }
  column_flush(c, plan);
}

template <typename Acc>
size_t shared_bytes(const Plan& plan) {
  return static_cast<size_t>(plan.buffer_elems()) * sizeof(Acc);
}

// Picks t and G for a (planes, height, width) volume: fewest idle lanes per output column, with a small charge for
// the halo columns every segment loads. The rows are not split yet (see split_rows).
template <typename In>
Plan make_plan(int64_t planes, int height, int width) {
  using Acc = typename Traits<In>::Acc;
  constexpr int P = Traits<In>::kCols;
  // A strip that is not the whole width loads P t + 44 columns per row, at most kLoadsPerRow * t.
  constexpr int kMinStripThreads = (2 * kRadius + kLoadsPerRow - P - 1) / (kLoadsPerRow - P);
  Plan best;
  double best_cost = 0;
  for (int t = 1; t <= kMaxThreads; ++t) {
    const int strips = (width - 1) / (P * t) + 1;
    if (strips > 1 && t < kMinStripThreads) continue;
    Plan plan;
    plan.height = height;
    plan.width = width;
    plan.seg_threads = t;
    plan.pitch = P * t + 2 * kRadius;
    plan.strips = strips;
    plan.segments = planes * strips;
    const size_t row_bytes = size_t{kBatchRows} * plan.pitch * sizeof(Acc);
    int64_t g = kMaxThreads / t;
    g = std::min<int64_t>(g, static_cast<int64_t>(kSharedBudget / row_bytes));
    g = std::min<int64_t>(g, plan.segments);
    plan.segs_per_block = static_cast<int>(std::max<int64_t>(g, 1));
    const int lanes = (plan.threads() + 31) / 32 * 32;
    const double loaded = static_cast<double>(std::min(width, plan.pitch)) / (P * t);
    const double cost = static_cast<double>(lanes) / plan.segs_per_block * strips * (1.0 + 0.03 * loaded);
    if (best.seg_threads == 0 || cost <= best_cost) {
      best = plan;
      best_cost = cost;
    }
  }
  best.chunk_rows = height;
  best.chunks = 1;
  best.blocks = (best.segments + best.segs_per_block - 1) / best.segs_per_block;
  return best;
}

// Splits the rows into chunks when there are too few blocks to keep every SM busy; each chunk re-reads 22 rows
// above and below. Model: `sms` SMs run up to `per_sm` blocks each; a block costs the rows it streams, one block
// alone gets kLoneBlockShare of an SM (two or more saturate it); the busiest SM decides.
constexpr double kLoneBlockShare = 0.5;

inline void split_rows(Plan& plan, int64_t sms, int64_t per_sm) {
  const int64_t groups = plan.blocks;
  sms = std::max<int64_t>(sms, 1);
  per_sm = std::max<int64_t>(per_sm, 1);
  const int64_t most = std::min<int64_t>(plan.height, (4 * sms * per_sm + groups - 1) / groups);
  double best_cost = 0;
  for (int64_t chunks = 1; chunks <= most; ++chunks) {
    const int64_t rows = (plan.height - 1) / chunks + 1;
    const int64_t used = (plan.height - 1) / rows + 1;  // the rounding may leave fewer non-empty chunks
    const int64_t busiest = (groups * used + sms - 1) / sms;
    const double share = std::min(1.0, kLoneBlockShare * static_cast<double>(std::min(busiest, per_sm)));
    const double streamed = static_cast<double>(rows + (used > 1 ? 2 * kRadius : 0));
    const double cost = static_cast<double>(busiest) * streamed / share;
    if (chunks == 1 || cost < best_cost) {
      best_cost = cost;
      plan.chunk_rows = static_cast<int>(rows);
      plan.chunks = static_cast<int>(used);
    }
  }
  plan.blocks = groups * plan.chunks;
}

template <typename In>
cudaError_t launch(const void* x, void* y, int64_t planes, int height, int width, double scale,
                   cudaStream_t stream) {
  using Acc = typename Traits<In>::Acc;
  Plan plan = make_plan<In>(planes, height, width);
  plan.weight = scale / kSigmas;
  const size_t shared = shared_bytes<Acc>(plan);
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_conv_rows<In>, plan.threads(), shared);
  }
  if (err != cudaSuccess) return err;
  split_rows(plan, sms, per_sm);
  if (plan.blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel_conv_rows<In><<<static_cast<unsigned>(plan.blocks), plan.threads(), shared, stream>>>(
      static_cast<const In*>(x), static_cast<In*>(y), plan);
  return cudaGetLastError();
}

}  // namespace kernel_conv_detail

cudaError_t kernel_conv_cuda(const void* x, void* y, ScalarKind kind, int64_t planes, int64_t height, int64_t width,
                             double scale, cudaStream_t stream) {
  namespace d = kernel_conv_detail;
  if (planes < 0 || height < 0 || width < 0) return cudaErrorInvalidValue;
  if (planes == 0 || height == 0 || width == 0) return cudaSuccess;
  if (height > d::kMaxSide || width > d::kMaxSide) return cudaErrorInvalidValue;
  const int h = static_cast<int>(height);
  const int w = static_cast<int>(width);
  switch (kind) {
    case ScalarKind::kFloat32:
      return d::launch<float>(x, y, planes, h, w, scale, stream);
    case ScalarKind::kFloat16:
      return d::launch<__half>(x, y, planes, h, w, scale, stream);
    case ScalarKind::kBFloat16:
      return d::launch<__nv_bfloat16>(x, y, planes, h, w, scale, stream);
    case ScalarKind::kFloat64:
      return d::launch<double>(x, y, planes, h, w, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lgc
