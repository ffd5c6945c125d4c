// ctest (where nvcc exists): host emulation of the CUDA epilogue kernels (csrc/cuda/bn_relu_dropout.cu) without a
// GPU. Every block's threads run phase by phase as the kernels' barriers order them (accumulate, each tree step,
// store), then the per-channel combine, and every pass is compared with a float64 oracle, for the four element types,
// both layouts and each dropout form, on shapes that exercise the plans: every vector width of each type and the
// scalar one, planar planes split into tiles with vector tails, channels_last with spare threads, one lane, several
// tiles per channel and three channel blocks. Each type runs twice, with its maps aligned for vector accesses and one
// element off (scalar accesses, as the launchers choose), and both must give the same bits. Seeded masks must equal
// philox_keep of the (N, C, H, W) index, which is what the CPU and Triton kernels draw; the byte masks of
// bernoulli_keep_mask must be the CPU draw's flags, and bernoulli_keep_bits them packed; the apply pass that draws
// its own keep bits must write those bits and apply them. Built by CMakeLists.txt.
#include "cuda/bn_relu_dropout.cu"
#include "cuda/keep_masks.cu"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

namespace {

using namespace lgc::bn_epilogue_detail;
using lgc::BnGradTermsCuda;
using lgc::BnTrainTermsCuda;
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

// A reduction kernel and its per-channel combine, block by block: first(tile, thread) is a thread's shares.
template <bool Moments, int V, typename A, typename First>
void emulate_reduction(const Plan& plan, First&& first, A* out0, A* out1) {
  std::vector<double> partials(2 * plan.s.c * plan.per_channel(), NAN);  // NaN marks a slot never written
  auto shared = std::make_unique<BlockShares<V>>();
  for (int64_t tile = 0; tile < plan.tiles(); ++tile) {
    for (int t = 0; t < kThreads; ++t) put_shares(*shared, t, first(tile, t));
    for (int step = plan.tree_top; step > 0; step >>= 1) {
      for (int t = 0; t < kThreads; ++t) tree_step<Moments>(*shared, t, step, plan.cols, plan.lanes, plan.width());
    }
    for (int t = 0; t < kThreads; ++t) store_partial(plan, *shared, tile, t, partials.data());
  }
  auto channel = std::make_unique<BlockShares<1>>();
  for (int64_t c = 0; c < plan.s.c; ++c) {
    for (int t = 0; t < kThreads; ++t) put_shares(*channel, t, channel_thread<Moments>(plan, partials.data(), c, t));
    for (int step = kThreads / 2; step > 0; step >>= 1) {
      for (int t = 0; t < kThreads; ++t) tree_step<Moments>(*channel, t, step, 1, kThreads, 1);
    }
    finish_channel<Moments>(*channel, out0 + c, out1 + c);
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

// A map in the kernels' layout, at an address aligned for every Pack or (misaligned) one element past one.
template <typename T>
struct Buffer {
  std::vector<T> storage;
  T* data;
  Buffer(const std::vector<T>& values, bool misaligned) : storage(values.size() + 1) {
    data = storage.data() + (misaligned ? 1 : 0);  // std::vector's storage is 16-byte aligned (malloc)
    for (size_t i = 0; i < values.size(); ++i) data[i] = values[i];
  }
};

// Runs every pass for element type T on `cs` (maps at aligned or misaligned addresses), compares each with the
// float64 oracle and appends every output to `outputs` (bit for bit: the two alignments must agree exactly).
template <typename T, int V>
void check(const Case& cs, const Plan& plan, double tol, const char* type, bool misaligned,
           std::vector<double>& outputs) {
  using A = Acc<T>;
  const EpilogueShape& s = cs.s;
  const Buffer<T> z(cs.laid_out<T>(cs.z), misaligned), dy(cs.laid_out<T>(cs.dy), misaligned);
  std::vector<uint8_t> mask_values(cs.mask.size());
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t q = 0; q < s.p; ++q) mask_values[cs.offset(n, c, q)] = cs.mask[(n * s.c + c) * s.p + q];
  const Buffer<uint8_t> mask(mask_values, misaligned);
  std::vector<uint8_t> bit_values((mask_values.size() + 7) / 8, 0);  // the same flags packed (keep_bit)
  for (size_t e = 0; e < mask_values.size(); ++e) bit_values[e / 8] |= static_cast<uint8_t>(mask_values[e] << (e % 8));
  const Buffer<uint8_t> bits(bit_values, misaligned);
  const std::vector<A> scale = vec<T>(cs.scale), shift = vec<T>(cs.shift), center = vec<T>(cs.center);
  const std::vector<A> k1 = vec<T>(cs.k1), k0 = vec<T>(cs.k0);
  const int64_t seed = 0x5eed0123456789;
  const float p = 0.3f;
  const A out_scale = static_cast<A>(0.125);
  const bool vector_io = pack_aligned(z.data, sizeof(T), V);
  expect(vector_io == (V == 1 || !misaligned), "vector access decision", type, V);

  // Moments of the rounded maps, against a two-pass float64 oracle.
  std::vector<A> mean(s.c, A(NAN)), var(s.c, A(NAN));
  emulate_reduction<true, V>(
      plan, [&](int64_t tile, int t) { return moments_thread<V>(plan, z.data, vector_io, tile, t); }, mean.data(),
      var.data());
  for (int64_t c = 0; c < s.c; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sum += to_double(z.data[cs.offset(n, c, q)]);
    const double m = sum / double(s.n * s.p);
    for (int64_t n = 0; n < s.n; ++n)
      for (int64_t q = 0; q < s.p; ++q) sq += std::pow(to_double(z.data[cs.offset(n, c, q)]) - m, 2);
    expect_close(mean[c], m, tol, "mean", type, c);
    expect_close(var[c], sq / double(s.n * s.p), tol, "variance", type, c);
    outputs.push_back(mean[c]);
    outputs.push_back(var[c]);
  }

  for (int form = 0; form < 4; ++form) {  // no dropout, a mask, a seed, keep bits
    EpilogueDropoutCuda dropout{form == 1 ? mask.data : nullptr, form == 3 ? bits.data : nullptr,
                                form == 2 ? &seed : nullptr, p};
    const std::vector<T> unset(cs.size(), from_acc<T>(A(NAN)));  // NaN marks outputs never written
    Buffer<T> y(unset, misaligned), dz(unset, misaligned), dz_plain(unset, misaligned);
    std::vector<A> sum_g(s.c, A(NAN)), sum_gc(s.c, A(NAN));
    // As the launchers make them, so that their alignment check decides the accesses.
    auto args = [&](T* out) {
      return make_args<T>(plan, z.data, dy.data, out, scale.data(), shift.data(), center.data(), k1.data(),
                          k0.data(), out_scale, dropout);
    };
    const Args<T> a = args(nullptr), ay = args(y.data), adz = args(dz.data), adz_plain = args(dz_plain.data);
    expect(a.vector_io == vector_io && ay.vector_io == vector_io, "vector access decision", type, form);
    // The training backward's tiles compute scale and shift from the batch statistics (Args::var); their sums must
    // be those of the same values loaded, bit for bit.
    std::vector<A> train_var, train_weight, train_bias, train_scale, train_shift;
    for (int64_t c = 0; c < s.c; ++c) {
      train_var.push_back(A(0.5 + 0.25 * c));
      train_weight.push_back(A(1.0 - 0.1 * c));
      train_bias.push_back(A(0.2 - 0.05 * c));
      const lgc::BnAffine t = lgc::bn_train_affine(center[c], train_var[c], train_weight[c], train_bias[c], 1e-5);
      train_scale.push_back(static_cast<A>(t.scale));
      train_shift.push_back(static_cast<A>(t.shift));
    }
    Args<T> computed = make_args<T>(plan, z.data, dy.data, nullptr, nullptr, nullptr, center.data(), nullptr, nullptr,
                                    out_scale, dropout);
    computed.var = train_var.data();
    computed.weight = train_weight.data();
    computed.bias = train_bias.data();
    computed.eps = 1e-5;
    const Args<T> loaded = make_args<T>(plan, z.data, dy.data, nullptr, train_scale.data(), train_shift.data(),
                                        center.data(), nullptr, nullptr, out_scale, dropout);
    std::vector<A> computed_sums(2 * s.c, A(NAN)), loaded_sums(2 * s.c, A(NAN));
    auto run = [&](auto drop) {
      constexpr int kDrop = decltype(drop)::value;
      emulate_elementwise(plan, [&](int64_t tile, int t) { apply_thread<kDrop, V>(ay, tile, t); });
      emulate_elementwise(plan, [&](int64_t tile, int t) { grad_apply_thread<kDrop, true, V>(adz, tile, t); });
      emulate_elementwise(plan,
                          [&](int64_t tile, int t) { grad_apply_thread<kDrop, false, V>(adz_plain, tile, t); });
      emulate_reduction<false, V>(
          plan, [&](int64_t tile, int t) { return grad_sums_thread<kDrop, V>(a, tile, t); }, sum_g.data(),
          sum_gc.data());
      emulate_reduction<false, V>(
          plan, [&](int64_t tile, int t) { return grad_sums_thread<kDrop, V>(computed, tile, t); },
          computed_sums.data(), computed_sums.data() + s.c);
      emulate_reduction<false, V>(
          plan, [&](int64_t tile, int t) { return grad_sums_thread<kDrop, V>(loaded, tile, t); }, loaded_sums.data(),
          loaded_sums.data() + s.c);
    };
    if (form == 0) run(std::integral_constant<int, kNoDrop>{});
    if (form == 1) run(std::integral_constant<int, kMaskDrop>{});
    if (form == 2) run(std::integral_constant<int, kSeededDrop>{});
    if (form == 3) run(std::integral_constant<int, kBitsDrop>{});
    expect(std::memcmp(computed_sums.data(), loaded_sums.data(), computed_sums.size() * sizeof(A)) == 0,
           "gradient sums with scale and shift computed from the statistics", type, form);
    std::vector<double> want_g(s.c, 0.0), want_gc(s.c, 0.0);
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t c = 0; c < s.c; ++c) {
        for (int64_t q = 0; q < s.p; ++q) {
          const int64_t i = (n * s.c + c) * s.p + q, at = cs.offset(n, c, q);
          const double zv = to_double(z.data[at]);
          const double u = zv * double(scale[c]) + double(shift[c]);
          // Which side of the ReLU a value is on, decided in the kernels' precision: near 0 the rounding decides.
          const bool active = static_cast<A>(zv) * scale[c] + shift[c] > A(0);
          const bool keep = form == 0 || (form == 2 ? lgc::philox_keep(seed, uint32_t(i), p) : cs.mask[i] != 0);
          expect_close(to_double(y.data[at]), (u > 0 ? u : 0.0) * double(out_scale) * keep, tol, "apply", type, i);
          const double g = active && keep ? to_double(dy.data[at]) * double(out_scale) : 0.0;
          want_g[c] += g;
          want_gc[c] += g * (zv - double(center[c]));
          const double want_dz = g * double(scale[c]);
          expect_close(to_double(dz.data[at]), want_dz + zv * double(k1[c]) + double(k0[c]), tol, "grad apply", type,
                       i);
          expect_close(to_double(dz_plain.data[at]), want_dz, tol, "grad apply, no statistics", type, i);
          outputs.push_back(to_double(y.data[at]));
          outputs.push_back(to_double(dz.data[at]));
          outputs.push_back(to_double(dz_plain.data[at]));
        }
      }
    }
    for (int64_t c = 0; c < s.c; ++c) {
      expect_close(sum_g[c], want_g[c], tol * 10, "sum g", type, c);
      expect_close(sum_gc[c], want_gc[c], tol * 10, "sum g (z - center)", type, c);
      outputs.push_back(sum_g[c]);
      outputs.push_back(sum_gc[c]);
    }
  }

  // The apply pass that draws its keep bits (bn_apply_drawn_cuda: float16/bfloat16 maps of vec 8): every byte must be
  // bernoulli_keep_bits' and y the keep-bits pass's output with those bits, bit for bit.
  if constexpr (V == 8 && sizeof(T) == 2) {
    Buffer<uint8_t> drawn(std::vector<uint8_t>((cs.size() + 7) / 8, 0xa5), misaligned);  // 0xa5: never written
    EpilogueDropoutCuda draw{nullptr, nullptr, &seed, p};
    draw.drawn = drawn.data;
    draw.threshold = lgc::bernoulli_threshold(p);
    const std::vector<T> unset(cs.size(), from_acc<T>(A(NAN)));
    Buffer<T> y_drawn(unset, misaligned), y_bits(unset, misaligned);
    const EpilogueDropoutCuda with_bits{nullptr, drawn.data, nullptr, p};
    const Args<T> ad = make_args<T>(plan, z.data, nullptr, y_drawn.data, scale.data(), shift.data(), nullptr, nullptr,
                                    nullptr, out_scale, draw);
    const Args<T> ab = make_args<T>(plan, z.data, nullptr, y_bits.data, scale.data(), shift.data(), nullptr, nullptr,
                                    nullptr, out_scale, with_bits);
    emulate_elementwise(plan, [&](int64_t tile, int t) { apply_thread<kDrawnBits, V>(ad, tile, t); });
    for (int64_t b = 0; b < (cs.size() + 7) / 8; ++b) {
      expect(drawn.data[b] == lgc::bernoulli_bits_byte(seed, draw.threshold, b), "drawn keep bits", type, b);
    }
    emulate_elementwise(plan, [&](int64_t tile, int t) { apply_thread<kBitsDrop, V>(ab, tile, t); });
    expect(std::memcmp(y_drawn.data, y_bits.data, cs.size() * sizeof(T)) == 0, "apply with drawn bits", type, V);
  }
}

// The seeded keep mask, drawn with its own (byte-sized) plan.
template <int V>
void check_keep_mask(const Case& cs, const Plan& plan, bool misaligned) {
  const EpilogueShape& s = cs.s;
  const int64_t seed = 0x5eed0123456789;
  const float p = 0.3f;
  Buffer<uint8_t> keep(std::vector<uint8_t>(cs.size(), 2), misaligned);  // 2: never written
  const bool vector_io = pack_aligned(keep.data, 1, V);
  expect(vector_io == (V == 1 || !misaligned), "vector access decision", "uint8", V);
  emulate_elementwise(plan,
                      [&](int64_t tile, int t) { keep_mask_thread<V>(plan, &seed, p, keep.data, vector_io, tile, t); });
  for (int64_t n = 0; n < s.n; ++n)
    for (int64_t c = 0; c < s.c; ++c)
      for (int64_t q = 0; q < s.p; ++q) {
        const int64_t i = (n * s.c + c) * s.p + q;
        expect(keep.data[cs.offset(n, c, q)] == lgc::philox_keep(seed, uint32_t(i), p), "keep mask", "uint8", i);
      }
}

// bernoulli_keep_mask's thread steps: flag i is word i % 4 of Philox counter i / 4 at least bernoulli_threshold(p)
// (what the CPU's bernoulli_keep_cpu writes), whole groups as one 16-byte store where aligned, a partial last group
// flag by flag, and nothing past `count`.
void check_bernoulli(int64_t count, bool misaligned) {
  const uint64_t seed = 0x0123456789abcdefull;
  const float p = 0.3f;
  Buffer<uint8_t> keep(std::vector<uint8_t>(count + kBernoulliFlags, 2), misaligned);  // 2: never written
  const bool vector_io = pack_aligned(keep.data, 1, kBernoulliFlags);
  expect(vector_io == !misaligned, "vector access decision", "bernoulli", count);
  const uint32_t threshold = lgc::bernoulli_threshold(p);
  for (int64_t g = 0; g * kBernoulliFlags < count; ++g) bernoulli_group(seed, threshold, count, g, keep.data, vector_io);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t words[4];
    lgc::philox4(seed, static_cast<uint32_t>(i / 4), words);
    expect(keep.data[i] == (words[i % 4] >= threshold), "bernoulli flag", "uint8", i);
  }
  for (int64_t i = count; i < count + kBernoulliFlags; ++i) expect(keep.data[i] == 2, "written past count", "uint8", i);
}

// bernoulli_keep_bits' thread steps: bit i (keep_bit) is bernoulli flag i, whole groups as one 4-byte store where
// aligned, the last byte's spare bits 0, and nothing past the (count + 7) / 8 bytes.
void check_bernoulli_bits(int64_t count, bool misaligned) {
  const uint64_t seed = 0x0123456789abcdefull;
  const float p = 0.3f;
  const int64_t bytes = (count + 7) / 8;
  Buffer<uint8_t> bits(std::vector<uint8_t>(bytes + kBitsBytes, 0xa5), misaligned);  // 0xa5: never written
  const bool vector_io = pack_aligned(bits.data, 1, kBitsBytes);
  expect(vector_io == !misaligned, "vector access decision", "bernoulli bits", count);
  const uint32_t threshold = lgc::bernoulli_threshold(p);
  const uint32_t tail = count % 8 == 0 ? 0xffu : (1u << (count % 8)) - 1u;
  for (int64_t g = 0; g * kBitsBytes < bytes; ++g) bernoulli_bits_group(seed, threshold, bytes, tail, g, bits.data, vector_io);
  for (int64_t i = 0; i < 8 * bytes; ++i) {
    uint32_t words[4];
    lgc::philox4(seed, static_cast<uint32_t>(i / 4), words);
    const bool want = i < count && words[i % 4] >= threshold;
    expect(lgc::keep_bit(bits.data, i) == want, "bernoulli bit", "uint8", i);
  }
  for (int64_t b = bytes; b < bytes + kBitsBytes; ++b) expect(bits.data[b] == 0xa5, "written past the bits", "uint8", b);
}

// The channel kernels' last step (thread 0, once a channel's results are final): BatchNorm's terms and the running
// update in the accumulation type, against the formulas in double; without running statistics they stay untouched.
template <typename A>
void check_channel_terms(double tol, const char* type, double momentum, bool running) {
  const int64_t channels = 5;
  std::vector<A> mean, var, weight, bias, sum_g, sum_gc, running_mean, running_var;
  for (int64_t c = 0; c < channels; ++c) {
    mean.push_back(A(0.3 * c - 0.5));
    var.push_back(A(0.2 + 0.7 * c));
    weight.push_back(A(1.0 - 0.15 * c));
    bias.push_back(A(0.05 * c));
    sum_g.push_back(A(2.0 - c));
    sum_gc.push_back(A(0.4 * c - 1.1));
    running_mean.push_back(A(0.1 * c));
    running_var.push_back(A(1.0 + 0.25 * c));
  }
  const std::vector<A> old_mean = running_mean, old_var = running_var;
  const double eps = 1e-5, count = 37.0;
  std::vector<A> invstd(channels), scale(channels), shift(channels), k1(channels), k0(channels), dw(channels),
      db(channels), backward_scale(channels), backward_shift(channels);
  const BnTrainTermsCuda forward{weight.data(), bias.data(), eps, invstd.data(), scale.data(), shift.data(),
                                 running ? running_mean.data() : nullptr, running ? running_var.data() : nullptr,
                                 momentum, count};
  const BnGradTermsCuda backward{mean.data(), var.data(), weight.data(), bias.data(), eps, count,
                                 backward_scale.data(), backward_shift.data(), k1.data(), k0.data(), dw.data(),
                                 db.data()};
  for (int64_t c = 0; c < channels; ++c) {
    train_terms_channel(c, mean.data(), var.data(), forward);
    backward_terms_channel(c, sum_g.data(), sum_gc.data(), backward);
    const double unbiased = double(var[c]) * count / (count - 1.0);
    const double want_mean = running ? double(old_mean[c]) + momentum * (double(mean[c]) - double(old_mean[c]))
                                     : double(old_mean[c]);
    const double want_var = running ? double(old_var[c]) + momentum * (unbiased - double(old_var[c]))
                                    : double(old_var[c]);
    expect_close(running_mean[c], want_mean, tol, "running_mean", type, c);
    expect_close(running_var[c], want_var, tol, "running_var", type, c);
    const double inv = 1.0 / std::sqrt(double(var[c]) + eps), sc = double(weight[c]) * inv;
    expect_close(invstd[c], inv, tol, "invstd", type, c);
    expect_close(scale[c], sc, tol, "scale", type, c);
    expect_close(shift[c], double(bias[c]) - double(mean[c]) * sc, tol, "shift", type, c);
    // the backward computes them again, and must get the forward's values exactly
    expect(backward_scale[c] == scale[c] && backward_shift[c] == shift[c], "backward's scale and shift", type, c);
    const double want_k1 = -sc * inv * inv * double(sum_gc[c]) / count;
    expect_close(k1[c], want_k1, tol, "k1", type, c);
    expect_close(k0[c], -sc * double(sum_g[c]) / count - want_k1 * double(mean[c]), tol, "k0", type, c);
    expect_close(dw[c], double(sum_gc[c]) * inv, tol, "dweight", type, c);
    expect_close(db[c], double(sum_g[c]), tol, "dbias", type, c);
  }
}

// Both alignments for element type T; they must agree bit for bit. Returns the plan's vec.
template <typename T>
int check_type(const Case& cs, double tol, const char* type) {
  const Plan plan = make_plan(cs.s, sizeof(T));
  std::vector<double> aligned, misaligned;
  const cudaError_t err = on_vec<T>(plan.vec, [&](auto vec) {
    check<T, decltype(vec)::value>(cs, plan, tol, type, false, aligned);
    check<T, decltype(vec)::value>(cs, plan, tol, type, true, misaligned);
    return cudaSuccess;
  });
  expect(err == cudaSuccess, "vec dispatch", type, plan.vec);
  const bool same = aligned.size() == misaligned.size() &&
                    std::memcmp(aligned.data(), misaligned.data(), aligned.size() * sizeof(double)) == 0;
  expect(same, "aligned and misaligned maps give the same bits", type, cs.s.c);
  return plan.vec;
}

void check_plan(EpilogueShape s, int elem_bytes, int vec, int cols, int lanes, int64_t channel_blocks,
                int64_t min_chunks) {
  const Plan plan = make_plan(s, elem_bytes);
  const bool tree_ok =
      plan.lanes == 1 ? plan.tree_top == 0 : plan.tree_top < plan.lanes && 2 * plan.tree_top >= plan.lanes;
  const bool ok = plan.vec == vec && plan.cols == cols && plan.lanes == lanes &&
                  plan.channel_blocks == channel_blocks && plan.chunks >= min_chunks && tree_ok;
  expect(ok, "plan", s.channels_last ? "channels_last" : "planar", s.c);
  for (int bytes : {1, 2, 4, 8}) {  // bn_epilogue_partials knows the shape alone
    expect(make_plan(s, bytes).per_channel() == plan.per_channel(), "partial slots", "plan", bytes);
  }
}

struct Shape {
  EpilogueShape s;
  int vec[4];  // the plan's vec for bfloat16 (and float16), float32, float64, and the keep mask's bytes
};

}  // namespace

int main() {
  std::mt19937 rng(7);
  const Shape shapes[] = {
      {{2, 3, 131 * 130, false}, {2, 2, 2, 2}},  // planar: planes of 2 * 8515 pixels, two tiles, vector tails
      {{3, 5, 37, false}, {1, 1, 1, 1}},         // planar, scalar: short planes, most threads idle
      {{2, 3, 136 * 136, false}, {8, 4, 2, 16}},  // planar, full vectors: two tiles of 9248 pixels
      {{2, 68, 45, true}, {4, 4, 2, 4}},  // channels_last: bfloat16 17 groups of 4 channels in 15 lanes, 1 spare thread
      {{2, 256, 19, true}, {8, 4, 2, 16}},    // channels_last: bfloat16 32 groups in 8 lanes
      {{1, 300, 23, true}, {4, 4, 2, 4}},     // channels_last: float64 150 groups, one lane
      {{1, 1030, 5, true}, {2, 2, 2, 2}},     // channels_last: three channel blocks, the last one 3 groups wide
      {{3, 75, 29, true}, {1, 1, 1, 1}},      // channels_last, scalar: 75 channels in 3 lanes
      {{3, 128, 50, true}, {8, 4, 2, 16}},    // channels_last: three tiles per channel (64, 64, 22 rows), images
                                              // change within a tile
  };
  check_plan(shapes[0].s, 2, 2, 1, 256, 1, 2);
  check_plan(shapes[3].s, 2, 4, 17, 15, 1, 1);
  check_plan(shapes[4].s, 2, 8, 32, 8, 1, 1);
  check_plan(shapes[5].s, 8, 2, 150, 1, 1, 1);
  check_plan(shapes[6].s, 4, 2, 256, 1, 3, 1);
  check_plan(shapes[8].s, 4, 4, 32, 8, 1, 3);
  check_plan({128, 128, 96 * 96, true}, 2, 8, 16, 16, 1, 2000);  // the training step's maps: ~2048 tiles
  for (const Shape& shape : shapes) {
    const Case cs = make_case(shape.s, rng);
    expect(check_type<__nv_bfloat16>(cs, 1.6e-2, "bfloat16") == shape.vec[0], "vec", "bfloat16", shape.s.c);
    expect(check_type<__half>(cs, 2e-3, "float16") == shape.vec[0], "vec", "float16", shape.s.c);
    expect(check_type<float>(cs, 2e-5, "float32") == shape.vec[1], "vec", "float32", shape.s.c);
    expect(check_type<double>(cs, 1e-12, "float64") == shape.vec[2], "vec", "float64", shape.s.c);
    const Plan mask_plan = make_plan(shape.s, 1);
    expect(mask_plan.vec == shape.vec[3], "vec", "uint8", shape.s.c);
    on_vec<uint8_t>(mask_plan.vec, [&](auto vec) {
      check_keep_mask<decltype(vec)::value>(cs, mask_plan, false);
      check_keep_mask<decltype(vec)::value>(cs, mask_plan, true);
      return cudaSuccess;
    });
  }
  for (int64_t count : {1, 15, 16, 17, 4096 + 13}) {
    check_bernoulli(count, false);
    check_bernoulli(count, true);
  }
  for (int64_t count : {1, 7, 8, 9, 31, 32, 33, 4096 + 13}) {
    check_bernoulli_bits(count, false);
    check_bernoulli_bits(count, true);
  }
  for (const double momentum : {0.1, 0.75, 1.0}) {  // both of bn_lerp's forms
    check_channel_terms<float>(1e-6, "float32", momentum, true);
    check_channel_terms<double>(1e-14, "float64", momentum, true);
  }
  check_channel_terms<float>(1e-6, "float32", 0.1, false);
  expect(lgc::bernoulli_threshold(0.0f) == 0u && lgc::bernoulli_threshold(0.5f) == 2147483648u, "threshold",
         "bernoulli", 0);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("CUDA epilogue kernels (host emulation): all passes match the float64 oracle\n");
  return 0;
}
