// ctest of the CPU epilogue kernels (csrc/cpu/bn_relu_dropout.h): Philox against the published answer, the half and
// bfloat16 conversions, and every pass against a naive float64 oracle in both layouts, on shapes whose last tile is
// partial, with each dropout form; results must not depend on the thread count.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/bn_relu_dropout.h"

namespace {

using lgc::EpilogueDropout;
using lgc::EpilogueShape;

int failures = 0;

void expect(bool ok, const char* what, int64_t index) {
  if (!ok) {
    std::printf("FAIL %s [%lld]\n", what, static_cast<long long>(index));
    ++failures;
  }
}

void expect_close(double got, double want, double tol, const char* what, int64_t index) {
  if (!(std::abs(got - want) <= tol * (1.0 + std::abs(want)))) {
    std::printf("FAIL %s [%lld]: got %.17g, want %.17g\n", what, static_cast<long long>(index), got, want);
    ++failures;
  }
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

void test_philox() {
  // Random123's known answer for Philox-4x32-10, counter and key all zero: first word 0x6627e8d5.
  expect(lgc::philox_word(0, 0) == 0x6627e8d5u, "philox known answer", 0);
  // Triton's tl.rand folds the word onto [0, 2^31) and scales it below 1.
  int64_t kept = 0;
  for (uint32_t i = 0; i < 20000; ++i) {
    const float u = lgc::philox_uniform(0x123456789abcdefULL, i);
    expect(u >= 0.0f && u < 1.0f, "uniform in [0, 1)", i);
    kept += lgc::philox_keep(0x123456789abcdefULL, i, 0.25f);
  }
  expect(std::abs(double(kept) / 20000 - 0.75) < 0.015, "keep rate 1 - p (5 standard deviations)", kept);
}

void test_bernoulli_keep() {
  // Flag 4j + k is word k of Philox counter j against round(p * 2^32), tail included, for any thread count.
  const uint64_t seed = 0xabcdef0123ULL;
  const float p = 0.3f;
  const uint32_t threshold = static_cast<uint32_t>(std::llround(double(p) * 4294967296.0));
  const int64_t count = 4 * 50000 + 3;
  std::vector<uint8_t> keep(count, 2), keep1(count, 2);
  lgc::bernoulli_keep_cpu(seed, p, count, keep.data(), 3);
  lgc::bernoulli_keep_cpu(seed, p, count, keep1.data(), 1);
  int64_t kept = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t words[4];
    lgc::philox4(seed, static_cast<uint32_t>(i / 4), words);
    expect(keep[i] == (words[i % 4] >= threshold), "bernoulli keep flag", i);
    expect(keep1[i] == keep[i], "bernoulli keep independent of the thread count", i);
    kept += keep[i];
  }
  expect(std::abs(double(kept) / count - 0.7) < 0.005, "bernoulli keep rate 1 - p (5 standard deviations)", kept);
  std::vector<uint8_t> all(7, 0);
  lgc::bernoulli_keep_cpu(seed, 0.0f, 7, all.data(), 1);
  for (int64_t i = 0; i < 7; ++i) expect(all[i] == 1, "p = 0 keeps everything", i);
  // The bits are the same flags packed, the last byte's spare bits 0, nothing written past it.
  for (int64_t n : {count, int64_t{8 * 4096 * 3}, int64_t{8 * 4096 + 5}, int64_t{1}}) {
    std::vector<uint8_t> bits((n + 7) / 8 + 1, 0xa5), bits1((n + 7) / 8 + 1, 0xa5);
    lgc::bernoulli_keep_bits_cpu(seed, p, n, bits.data(), 3);
    lgc::bernoulli_keep_bits_cpu(seed, p, n, bits1.data(), 1);
    for (int64_t i = 0; i < 8 * ((n + 7) / 8); ++i) {
      uint32_t words[4];
      lgc::philox4(seed, static_cast<uint32_t>(i / 4), words);
      expect(lgc::keep_bit(bits.data(), i) == (i < n && words[i % 4] >= threshold), "bernoulli keep bit", i);
    }
    expect(bits == bits1, "bernoulli keep bits independent of the thread count", n);
    expect(bits.back() == 0xa5, "bernoulli keep bits: nothing written past the last byte", n);
  }
}

void test_conversions() {
  for (uint32_t bits = 0; bits < 65536; ++bits) {  // every half and bfloat16 value comes back unchanged
    const float h = lgc::to_float(lgc::Float16{static_cast<uint16_t>(bits)});
    const float b = lgc::to_float(lgc::BFloat16{static_cast<uint16_t>(bits)});
    expect(std::isnan(h) ? std::isnan(lgc::to_float(lgc::to_float16(h))) : lgc::to_float16(h).bits == bits,
           "half round trip", bits);
    expect(std::isnan(b) ? std::isnan(lgc::to_float(lgc::to_bfloat16(b))) : lgc::to_bfloat16(b).bits == bits,
           "bfloat16 round trip", bits);
  }
  // Ties round to even; overflow goes to infinity; subnormal halves round too.
  const struct {
    float in;
    uint16_t half;
  } halves[] = {{1.0f + 0x1p-11f, 0x3c00}, {1.0f + 3 * 0x1p-11f, 0x3c02}, {65519.0f, 0x7bff}, {65520.0f, 0x7c00},
                {-1e9f, 0xfc00},           {0x1p-25f, 0x0000},          {3 * 0x1p-25f, 0x0002}, {0x1p-24f, 0x0001},
                {-0.0f, 0x8000}};
  for (const auto& c : halves) expect(lgc::to_float16(c.in).bits == c.half, "half rounding", c.half);
  expect(lgc::to_bfloat16(1.0f + 0x1p-8f).bits == 0x3f80, "bfloat16 tie to even", 0);
  expect(lgc::to_bfloat16(1.0f + 3 * 0x1p-8f).bits == 0x3f82, "bfloat16 tie to even, up", 0);
  expect(lgc::to_bfloat16(float_of(0x7f7fffffu)).bits == 0x7f80, "bfloat16 overflow", 0);
}

// A case: maps in (N, C, P) logical order, laid out per shape.channels_last.
struct Case {
  EpilogueShape shape;
  std::vector<double> z, dy;  // logical (n, c, p) order
  std::vector<uint8_t> mask;  // logical order
  std::vector<double> scale, shift, center, k1, k0;

  int64_t size() const { return shape.n * shape.c * shape.p; }
  int64_t offset(int64_t n, int64_t c, int64_t p) const {
    return shape.channels_last ? (n * shape.p + p) * shape.c + c : (n * shape.c + c) * shape.p + p;
  }
  template <typename T>
  std::vector<T> laid_out(const std::vector<double>& logical) const {
    std::vector<T> out(logical.size());
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t p = 0; p < shape.p; ++p) out[offset(n, c, p)] = static_cast<T>(logical[(n * shape.c + c) * shape.p + p]);
    return out;
  }
};

// Channel j of z is centred on offset * j (large offsets: the moments must not lose the spread of about 1).
Case make_case(int64_t n, int64_t c, int64_t p, bool channels_last, uint32_t seed, double offset) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  Case cs{{n, c, p, channels_last}, {}, {}, {}, {}, {}, {}, {}, {}};
  for (int64_t i = 0; i < cs.size(); ++i) {
    const int64_t channel = (i / p) % c;
    cs.z.push_back(offset * channel + normal(rng));
    cs.dy.push_back(normal(rng));
    cs.mask.push_back(rng() % 4 != 0);
  }
  for (int64_t j = 0; j < c; ++j) {
    cs.scale.push_back(0.5 + 0.1 * j);
    cs.shift.push_back(-offset * j * (0.5 + 0.1 * j) + 0.2);  // about z * scale + shift = (z - mean) * scale
    cs.center.push_back(offset * j);
    cs.k1.push_back(0.01 * (j + 1));
    cs.k0.push_back(-0.3 * j);
  }
  return cs;
}

// keep of the value at logical index i for a dropout form: 0 none, 1 mask, 2 seeded, 3 keep bits (the mask packed).
bool keep_of(const Case& cs, int form, int64_t i, uint64_t seed, float p) {
  if (form == 1 || form == 3) return cs.mask[i] != 0;
  if (form == 2) return lgc::philox_keep(seed, static_cast<uint32_t>(i), p);
  return true;
}

template <typename T>
void check_passes(const Case& cs, double tol, const char* name) {
  const EpilogueShape& s = cs.shape;
  const std::vector<T> z = cs.laid_out<T>(cs.z), dy = cs.laid_out<T>(cs.dy);
  std::vector<uint8_t> mask(cs.mask.size());
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t p = 0; p < s.p; ++p) mask[cs.offset(n, c, p)] = cs.mask[(n * s.c + c) * s.p + p];
  std::vector<uint8_t> bits((mask.size() + 7) / 8, 0);
  for (size_t e = 0; e < mask.size(); ++e) bits[e / 8] |= static_cast<uint8_t>(mask[e] << (e % 8));
  const std::vector<T> scale(cs.scale.begin(), cs.scale.end()), shift(cs.shift.begin(), cs.shift.end());
  const std::vector<T> center(cs.center.begin(), cs.center.end()), k1(cs.k1.begin(), cs.k1.end()),
      k0(cs.k0.begin(), cs.k0.end());
  const T out_scale = static_cast<T>(0.125);
  const uint64_t seed = 0xfeedbeef12345ULL;
  const float p = 0.3f;

  std::vector<T> mean(s.c), var(s.c);
  lgc::bn_moments_cpu(z.data(), s, mean.data(), var.data(), 3);
  for (int64_t c = 0; c < s.c; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sum += cs.z[(n * s.c + c) * s.p + q];
    const double m = sum / double(s.n * s.p);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sq += (cs.z[(n * s.c + c) * s.p + q] - m) * (cs.z[(n * s.c + c) * s.p + q] - m);
    expect_close(mean[c], m, tol, name, c);
    expect_close(var[c], sq / double(s.n * s.p), tol, name, c);
  }

  for (int form = 0; form < 4; ++form) {
    const EpilogueDropout dropout{form == 1 ? mask.data() : nullptr, form == 3 ? bits.data() : nullptr, form == 2,
                                  seed, p};
    std::vector<T> y(z.size()), dz(z.size()), dz1(z.size()), sum_g(s.c), sum_gc(s.c), sum_g1(s.c), sum_gc1(s.c);
    lgc::bn_apply_cpu(z.data(), scale.data(), shift.data(), dropout, out_scale, y.data(), s, 3);
    lgc::bn_grad_sums_cpu(dy.data(), z.data(), scale.data(), shift.data(), dropout, center.data(), out_scale, s,
                          sum_g.data(), sum_gc.data(), 3);
    lgc::bn_grad_apply_cpu(dy.data(), z.data(), scale.data(), shift.data(), dropout, k1.data(), k0.data(), out_scale,
                           dz.data(), s, 3);
    // One thread gives the same bits: the tiling and the order of the sums do not depend on the thread count.
    lgc::bn_grad_sums_cpu(dy.data(), z.data(), scale.data(), shift.data(), dropout, center.data(), out_scale, s,
                          sum_g1.data(), sum_gc1.data(), 1);
    lgc::bn_grad_apply_cpu(dy.data(), z.data(), scale.data(), shift.data(), dropout, nullptr, nullptr, out_scale,
                           dz1.data(), s, 1);
    std::vector<double> want_g(s.c, 0.0), want_gc(s.c, 0.0);
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        for (int64_t q = 0; q < s.p; ++q) {
          const int64_t i = (n * s.c + c) * s.p + q, at = cs.offset(n, c, q);
          const double u = double(z[at]) * double(scale[c]) + double(shift[c]);
          const bool keep = keep_of(cs, form, i, seed, p);
          expect_close(y[at], (u > 0 ? u : 0.0) * double(out_scale) * keep, tol, name, i);
          const double g = (u > 0 && keep) ? double(dy[at]) * double(out_scale) : 0.0;
          want_g[c] += g;
          want_gc[c] += g * (double(z[at]) - double(center[c]));
          expect_close(dz[at], g * double(scale[c]) + double(z[at]) * double(k1[c]) + double(k0[c]), tol, name, i);
          expect_close(dz1[at], g * double(scale[c]), tol, name, i);
        }
      }
    }
    for (int64_t c = 0; c < s.c; ++c) {
      expect_close(sum_g[c], want_g[c], tol * 10, name, c);
      expect_close(sum_gc[c], want_gc[c], tol * 10, name, c);
      expect(sum_g[c] == sum_g1[c] && sum_gc[c] == sum_gc1[c], "sums independent of the thread count", c);
    }
  }
  std::vector<uint8_t> keep(z.size());
  lgc::dropout_keep_mask_cpu(seed, p, s, keep.data(), 2);
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t q = 0; q < s.p; ++q) {
        const int64_t i = (n * s.c + c) * s.p + q;
        expect(keep[cs.offset(n, c, q)] == keep_of(cs, 2, i, seed, p), "keep mask", i);
      }
}

}  // namespace

int main() {
  test_philox();
  test_bernoulli_keep();
  test_conversions();
  // Planar tiles hold 4096 pixels (P = 4101: one full tile and one of 5); channels_last tiles 4096 / C pixels.
  for (bool channels_last : {false, true}) {
    check_passes<double>(make_case(2, 3, 4101, channels_last, 1, 1e4), 1e-11,
                         channels_last ? "float64 channels_last" : "float64 planar");
    check_passes<float>(make_case(2, 3, 4101, channels_last, 1, 10.0), 2e-5,
                        channels_last ? "float32 channels_last" : "float32 planar");
    check_passes<double>(make_case(3, 130, 7, channels_last, 2, 1.0), 1e-12,
                         channels_last ? "float64 wide channels_last" : "float64 wide planar");
  }
  if (failures == 0) std::printf("test_bn_relu_dropout: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
