// ctest (where nvcc exists): host emulation of the CUDA epilogue kernels (csrc/cuda/bn_relu_dropout.cu) without a
// GPU. Every block's threads run phase by phase as the kernels' barriers order them (accumulate, each tree step,
// store), then the per-channel combine, and every pass is compared with a float64 oracle, for the four element types,
// both layouts and each dropout form, on shapes that exercise the plans: planar planes split into tiles, channels_last
// with spare threads (C = 68: three lanes), one lane (C = 256) and two channel blocks (C = 300). Seeded masks must
// equal philox_keep of the (N, C, H, W) index, which is what the CPU and Triton kernels draw. Built by CMakeLists.txt.
#include "cuda/bn_relu_dropout.cu"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

using namespace lgc::bn_epilogue_detail;
using lgc::EpilogueDropoutCuda;
using lgc::EpilogueShape;
using lgc::from_acc;

int failures = 0;

void expect(bool ok, const char* what, const char* type, int64_t index) {
  if (!ok && failures < 20) std::printf("FAIL %s (%s) [%lld]\n", what, type, static_cast<long long>(index));
  failures += !ok;
}

void expect_close(double got, double want, double tol, const char* what, const char* type, int64_t index) {
  const bool ok = std::abs(got - want) <= tol * (1.0 + std::abs(want));
  if (!ok && failures < 20) {
    std::printf("FAIL %s (%s) [%lld]: got %.17g, want %.17g\n", what, type, static_cast<long long>(index), got, want);
  }
  failures += !ok;
}

double to_double(float v) { return v; }
double to_double(double v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

// A reduction kernel and its per-channel combine, block by block: first(tile, thread) is a thread's share.
template <bool Moments, typename A, typename First>
void emulate_reduction(const Plan& plan, First&& first, A* out0, A* out1) {
  std::vector<double> partials(2 * plan.s.c * plan.per_channel(), NAN);  // NaN marks a slot never written
  std::vector<Stats> shared(kThreads);
  for (int64_t tile = 0; tile < plan.tiles(); ++tile) {
    for (int t = 0; t < kThreads; ++t) shared[t] = first(tile, t);
    for (int step = plan.tree_top; step > 0; step >>= 1) {
      for (int t = 0; t < kThreads; ++t) tree_step<Moments>(shared.data(), t, step, plan.cols, plan.lanes);
    }
    for (int t = 0; t < kThreads; ++t) store_partial(plan, shared.data(), tile, t, partials.data());
  }
  for (int64_t c = 0; c < plan.s.c; ++c) {
    for (int t = 0; t < kThreads; ++t) shared[t] = channel_thread<Moments>(plan, partials.data(), c, t);
    for (int step = kThreads / 2; step > 0; step >>= 1) {
      for (int t = 0; t < kThreads; ++t) tree_step<Moments>(shared.data(), t, step, 1, kThreads);
    }
    finish_channel<Moments>(shared[0], out0 + c, out1 + c);
  }
}

template <typename F>
void emulate_elementwise(const Plan& plan, F&& thread) {
  for (int64_t tile = 0; tile < plan.tiles(); ++tile) {
    for (int t = 0; t < kThreads; ++t) thread(tile, t);
  }
}

// The test's maps in (N, C, P) order (double), and where value (n, c, q) lives in the shape's layout.
struct Case {
  EpilogueShape s;
  std::vector<double> z, dy;
  std::vector<uint8_t> mask;  // (N, C, P) order
  std::vector<double> scale, shift, center, k1, k0;

  int64_t size() const { return s.n * s.c * s.p; }
  int64_t offset(int64_t n, int64_t c, int64_t q) const {
    return s.channels_last ? (n * s.p + q) * s.c + c : (n * s.c + c) * s.p + q;
  }
  template <typename T>
  std::vector<T> laid_out(const std::vector<double>& v) const {
    std::vector<T> out(v.size());
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t c = 0; c < s.c; ++c)
        for (int64_t q = 0; q < s.p; ++q) {
          out[offset(n, c, q)] = from_acc<T>(static_cast<Acc<T>>(v[(n * s.c + c) * s.p + q]));
        }
    return out;
  }
};

Case make_case(EpilogueShape s, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  Case cs{s, {}, {}, {}, {}, {}, {}, {}, {}};
  for (int64_t i = 0; i < cs.size(); ++i) {
    const int64_t channel = (i / s.p) % s.c;
    cs.z.push_back(3.0 * (channel % 7) + normal(rng));  // means of up to 18 against a spread of 1
    cs.dy.push_back(normal(rng));
    cs.mask.push_back(rng() % 4 != 0);
  }
  for (int64_t c = 0; c < s.c; ++c) {
    cs.scale.push_back(0.5 + 0.01 * (c % 50));
    cs.shift.push_back(-3.0 * (c % 7) * cs.scale.back() + 0.2);  // z * scale + shift about (z - mean) * scale
    cs.center.push_back(3.0 * (c % 7));
    cs.k1.push_back(0.01 * (c % 13 + 1));
    cs.k0.push_back(-0.03 * (c % 11));
  }
  return cs;
}

template <typename T>
std::vector<Acc<T>> vec(const std::vector<double>& v) {
  return std::vector<Acc<T>>(v.begin(), v.end());
}

template <typename T>
void check(const Case& cs, double tol, const char* type) {
  using A = Acc<T>;
  const EpilogueShape& s = cs.s;
  const Plan plan = make_plan(s);
  const std::vector<T> z = cs.laid_out<T>(cs.z), dy = cs.laid_out<T>(cs.dy);
  std::vector<uint8_t> mask(cs.mask.size());
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t q = 0; q < s.p; ++q) mask[cs.offset(n, c, q)] = cs.mask[(n * s.c + c) * s.p + q];
  const std::vector<A> scale = vec<T>(cs.scale), shift = vec<T>(cs.shift), center = vec<T>(cs.center);
  const std::vector<A> k1 = vec<T>(cs.k1), k0 = vec<T>(cs.k0);
  const int64_t seed = 0x5eed0123456789;
  const float p = 0.3f;
  const A out_scale = static_cast<A>(0.125);

  // Moments of the rounded maps, against a two-pass float64 oracle.
  std::vector<A> mean(s.c, A(NAN)), var(s.c, A(NAN));
  emulate_reduction<true>(plan, [&](int64_t tile, int t) { return moments_thread(plan, z.data(), tile, t); },
                          mean.data(), var.data());
  for (int64_t c = 0; c < s.c; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sum += to_double(z[cs.offset(n, c, q)]);
    const double m = sum / double(s.n * s.p);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sq += std::pow(to_double(z[cs.offset(n, c, q)]) - m, 2);
    expect_close(mean[c], m, tol, "mean", type, c);
    expect_close(var[c], sq / double(s.n * s.p), tol, "variance", type, c);
  }

  for (int form = 0; form < 3; ++form) {  // no dropout, a mask, a seed
    EpilogueDropoutCuda dropout{form == 1 ? mask.data() : nullptr, form == 2 ? &seed : nullptr, p};
    const T nan_value = from_acc<T>(A(NAN));  // marks outputs never written
    std::vector<T> y(z.size(), nan_value), dz(z.size(), nan_value), dz_plain(z.size(), nan_value);
    std::vector<A> sum_g(s.c, A(NAN)), sum_gc(s.c, A(NAN));
    const Args<T> a{plan, z.data(), dy.data(), nullptr, scale.data(), shift.data(), center.data(), k1.data(),
                    k0.data(), out_scale, dropout};
    Args<T> ay = a, adz = a, adz_plain = a;
    ay.out = y.data();
    adz.out = dz.data();
    adz_plain.out = dz_plain.data();
    auto run = [&](auto drop) {
      constexpr int kDrop = decltype(drop)::value;
      emulate_elementwise(plan, [&](int64_t tile, int t) { apply_thread<kDrop>(ay, tile, t); });
      emulate_elementwise(plan, [&](int64_t tile, int t) { grad_apply_thread<kDrop, true>(adz, tile, t); });
      emulate_elementwise(plan, [&](int64_t tile, int t) { grad_apply_thread<kDrop, false>(adz_plain, tile, t); });
      emulate_reduction<false>(plan, [&](int64_t tile, int t) { return grad_sums_thread<kDrop>(a, tile, t); },
                               sum_g.data(), sum_gc.data());
    };
    if (form == 0) run(std::integral_constant<int, kNoDrop>{});
    if (form == 1) run(std::integral_constant<int, kMaskDrop>{});
    if (form == 2) run(std::integral_constant<int, kSeededDrop>{});
    std::vector<double> want_g(s.c, 0.0), want_gc(s.c, 0.0);
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        for (int64_t q = 0; q < s.p; ++q) {
          const int64_t i = (n * s.c + c) * s.p + q, at = cs.offset(n, c, q);
          const double zv = to_double(z[at]);
          const double u = zv * double(scale[c]) + double(shift[c]);
          // Which side of the ReLU a value is on, decided in the kernels' precision: near 0 the rounding decides.
          const bool active = static_cast<A>(zv) * scale[c] + shift[c] > A(0);
          const bool keep = form == 0 || (form == 1 ? cs.mask[i] != 0 : lgc::philox_keep(seed, uint32_t(i), p));
          expect_close(to_double(y[at]), (u > 0 ? u : 0.0) * double(out_scale) * keep, tol, "apply", type, i);
          const double g = active && keep ? to_double(dy[at]) * double(out_scale) : 0.0;
          want_g[c] += g;
          want_gc[c] += g * (zv - double(center[c]));
          const double want_dz = g * double(scale[c]);
          expect_close(to_double(dz[at]), want_dz + zv * double(k1[c]) + double(k0[c]), tol, "grad apply", type, i);
          expect_close(to_double(dz_plain[at]), want_dz, tol, "grad apply, no statistics", type, i);
        }
      }
    }
    for (int64_t c = 0; c < s.c; ++c) {
      expect_close(sum_g[c], want_g[c], tol * 10, "sum g", type, c);
      expect_close(sum_gc[c], want_gc[c], tol * 10, "sum g (z - center)", type, c);
    }
  }

  std::vector<uint8_t> keep(z.size(), 2);  // 2: never written
  emulate_elementwise(plan, [&](int64_t tile, int t) { keep_mask_thread(plan, &seed, p, keep.data(), tile, t); });
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t q = 0; q < s.p; ++q) {
        const int64_t i = (n * s.c + c) * s.p + q;
        expect(keep[cs.offset(n, c, q)] == lgc::philox_keep(seed, uint32_t(i), p), "keep mask", type, i);
      }
}

void check_plan(EpilogueShape s, int cols, int lanes, int64_t channel_blocks, int64_t min_chunks) {
  const Plan plan = make_plan(s);
  const bool tree_ok =
      plan.lanes == 1 ? plan.tree_top == 0 : plan.tree_top < plan.lanes && 2 * plan.tree_top >= plan.lanes;
  const bool ok = plan.cols == cols && plan.lanes == lanes && plan.channel_blocks == channel_blocks &&
                  plan.chunks >= min_chunks && tree_ok;
  expect(ok, "plan", s.channels_last ? "channels_last" : "planar", s.c);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const EpilogueShape shapes[] = {
      {2, 3, 131 * 130, false},  // planar: each plane in two tiles of 8515 pixels
      {3, 5, 37, false},         // planar: short planes, most threads idle
      {2, 68, 45, true},         // channels_last: 3 lanes of 68 channels, 52 spare threads
      {2, 256, 19, true},        // channels_last: one lane
      {1, 300, 23, true},        // channels_last: two channel blocks, the second one 44 wide
  };
  check_plan(shapes[0], 1, 256, 1, 2);
  check_plan(shapes[2], 68, 3, 1, 1);
  check_plan(shapes[3], 256, 1, 1, 1);
  check_plan(shapes[4], 256, 1, 2, 1);
  check_plan({64, 128, 96 * 96, true}, 128, 2, 1, 2000);  // the release's widest blocks: ~2048 tiles
  for (const EpilogueShape& s : shapes) {
    const Case cs = make_case(s, rng);
    check<float>(cs, 2e-5, "float32");
    check<double>(cs, 1e-12, "float64");
    check<__half>(cs, 2e-3, "float16");
    check<__nv_bfloat16>(cs, 1.6e-2, "bfloat16");
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("CUDA epilogue kernels (host emulation): all passes match the float64 oracle\n");
  return 0;
}
