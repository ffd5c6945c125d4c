// ctest (where nvcc exists): host emulation of the CUDA batched transpose (csrc/cuda/layout.cu) without a GPU. Every
// tile's 32 x 8 threads run the load phase, then the store phase, as the kernel's barrier orders them, for each
// element size, on shapes with partial tiles on both sides, the glue's two directions (NHWC -> NCHW and back) and a
// channel slice of a channels_last map (row stride above the column count). Every destination element must be its
// source element, and nothing outside the destination matrix may be written. Built by CMakeLists.txt.
#include "cuda/layout.cu"

#include <cstdio>
#include <vector>

namespace {

using namespace lgc::layout_detail;
using lgc::TransposeShape;

int failures = 0;

void expect(bool ok, const char* what, int64_t a, int64_t b) {
  if (!ok && failures < 20) std::printf("FAIL %s [%lld, %lld]\n", what, static_cast<long long>(a),
                                        static_cast<long long>(b));
  failures += !ok;
}

// Runs the kernel's tiles on the host; the source holds distinct values, the destination starts as `fill`.
template <typename W>
void check(const TransposeShape& t, int64_t src_size, int64_t dst_size, const char* what) {
  constexpr W fill = static_cast<W>(~W{0});
  std::vector<W> src(src_size), dst(dst_size, fill);
  for (int64_t i = 0; i < src_size; ++i) src[i] = static_cast<W>(i % 251);  // never `fill`
  Tile<W> shared;  // at most 8.4 KB
  for (int64_t b = 0; b < t.batch; ++b) {
    for (int tile = 0; tile < tiles_per_matrix(t); ++tile) {
      const TileOrigin o = origin_of(t, b, tile);
      for (int ty = 0; ty < kRowsPerPass; ++ty)
        for (int tx = 0; tx < kTile; ++tx) load_tile(t, src.data(), o, tx, ty, shared);
      for (int ty = 0; ty < kRowsPerPass; ++ty)
        for (int tx = 0; tx < kTile; ++tx) store_tile(t, dst.data(), o, tx, ty, shared);
    }
  }
  std::vector<bool> target(dst_size, false);
  for (int64_t b = 0; b < t.batch; ++b)
    for (int64_t r = 0; r < t.rows; ++r)
      for (int64_t s = 0; s < t.cols; ++s) {
        const int64_t at = b * t.dst_batch + s * t.dst_col + r;
        target[at] = true;
        expect(dst[at] == src[b * t.src_batch + r * t.src_row + s], what, b * t.rows + r, s);
      }
  for (int64_t i = 0; i < dst_size; ++i) {
    if (!target[i]) expect(dst[i] == fill, "written outside the destination", i, 0);
  }
}

// The glue's two directions for an (n, c, p) map, and the channel slice [c0, c0 + c) of an NHWC map of `wide`
// channels.
template <typename W>
void check_maps(int64_t n, int64_t c, int64_t p, int64_t wide) {
  // NHWC -> NCHW: rows = pixels, cols = channels.
  check<W>({n, p, c, c * p, c, c * p, p}, n * c * p, n * c * p, "NHWC to NCHW");
  // NCHW -> NHWC.
  check<W>({n, c, p, c * p, p, c * p, c}, n * c * p, n * c * p, "NCHW to NHWC");
  // A channel slice of an NHWC map of `wide` channels -> NCHW, and back into the slice of a wider NHWC map.
  check<W>({n, p, c, wide * p, wide, c * p, p}, n * wide * p, n * c * p, "NHWC slice to NCHW");
  check<W>({n, c, p, c * p, p, wide * p, wide}, n * c * p, n * wide * p, "NCHW to NHWC slice");
}

}  // namespace

int main() {
  const int64_t maps[][4] = {
      {2, 68, 45, 136},   // partial tiles on both sides; the slice is the training step's local = both[:, :68]
      {1, 5, 33, 7},      // fewer channels than a tile, one pixel past a tile
      {3, 64, 64, 64},    // whole tiles only
      {2, 1, 40, 3},      // one channel
  };
  for (const auto& m : maps) {
    check_maps<uint8_t>(m[0], m[1], m[2], m[3]);
    check_maps<uint16_t>(m[0], m[1], m[2], m[3]);
    check_maps<uint32_t>(m[0], m[1], m[2], m[3]);
    check_maps<uint64_t>(m[0], m[1], m[2], m[3]);
  }
  expect(tiles_per_matrix({2, 45, 68, 0, 0, 0, 0}) == 2 * 3, "tile count", 45, 68);
  const TileOrigin o = origin_of({1, 45, 68, 0, 0, 0, 0}, 0, 4);  // tiles run along the 3 column tiles first
  expect(o.r0 == 32 && o.s0 == 32, "tile origin", o.r0, o.s0);
  expect(lgc::transpose_batched_cuda(nullptr, nullptr, 3, {1, 1, 1, 1, 1, 1, 1}, nullptr) == cudaErrorInvalidValue,
         "element size 3 refused", 3, 0);
  expect(lgc::transpose_batched_cuda(nullptr, nullptr, 2, {1, kMaxSide, 1, 1, 1, 1, 1}, nullptr) ==
             cudaErrorInvalidValue,
         "sides of 2^30 refused", kMaxSide, 1);
  expect(!lgc::transpose_batched_supported(2, {1, kMaxSide - 1, kMaxSide - 1, 1, 1, 1, 1}),
         "more than 2^31 - 1 tiles refused", kMaxSide - 1, kMaxSide - 1);
  expect(lgc::transpose_batched_supported(2, {100000, 3840 * 2160, 136, 1, 1, 1, 1}), "a 4K map of 136 channels",
         3840 * 2160, 136);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("CUDA batched transpose (host emulation): every element lands where it belongs\n");
  return 0;
}
