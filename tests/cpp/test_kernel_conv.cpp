// lgc::kernel_conv_cpu against a direct 2025-tap loop over the dense 45x45 kernel, in float and double.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernel_conv.h"

namespace {

constexpr int kR = lgc::kKernelConvRadius;
constexpr int kSize = 2 * kR + 1;

int failures = 0;
double worst_seen[2] = {0.0, 0.0};  // largest scaled error of any float / double shape

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
  }
}

double gauss(int s, int k) {
  const double sigma = lgc::kKernelConvSigmas[s];
  return std::exp(-double(k) * k / (2.0 * sigma * sigma));
}

// K(u, v) for u, v in -22..22, dense, in double.
std::vector<double> dense_kernel() {
  std::vector<double> k(kSize * kSize, 0.0);
  for (int u = -kR; u <= kR; ++u)
    for (int v = -kR; v <= kR; ++v) {
      double sum = 0.0;
      for (int s = 0; s < lgc::kKernelConvGaussians; ++s) sum += gauss(s, u) * gauss(s, v);
      k[(u + kR) * kSize + v + kR] = sum / lgc::kKernelConvGaussians;
    }
  return k;
}

// Direct convolution (all 2025 taps, zero padding) of x and of |x| (the scale of the rounding error).
template <class T>
void direct(const std::vector<T>& x, int64_t planes, int64_t h, int64_t w, std::vector<double>& y,
            std::vector<double>& scale) {
  static const std::vector<double> k = dense_kernel();
  y.assign(x.size(), 0.0);
  scale.assign(x.size(), 0.0);
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        double sum = 0.0, abs_sum = 0.0;
        for (int u = -kR; u <= kR; ++u) {
          if (i + u < 0 || i + u >= h) continue;
          for (int v = -kR; v <= kR; ++v) {
            if (j + v < 0 || j + v >= w) continue;
            const double term = k[(u + kR) * kSize + v + kR] * double(x[(p * h + i + u) * w + j + v]);
            sum += term;
            abs_sum += std::fabs(term);
          }
        }
        y[(p * h + i) * w + j] = sum;
        scale[(p * h + i) * w + j] = abs_sum;
      }
}

// Random input with a wide dynamic range, so that small outputs next to large ones are checked too.
template <class T>
std::vector<T> random_input(int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> exponent(-6, 3);
  std::vector<T> x(n);
  for (auto& v : x) v = T(normal(gen) * std::ldexp(1.0, exponent(gen)));
  return x;
}

template <class T>
void check_shape(int64_t planes, int64_t h, int64_t w, int threads, double out_scale, double tol, const char* type) {
  const int64_t n = planes * h * w;
  const std::vector<T> x = random_input<T>(n, unsigned(planes * 1000003 + h * 1009 + w));
  const std::vector<T> x_copy = x;
  // Canaries on both sides of y catch writes out of bounds.
  const int64_t guard = 64;
  const T canary = T(-12345.5);
  std::vector<T> y_mem(n + 2 * guard, canary);
  lgc::kernel_conv_cpu(x.data(), y_mem.data() + guard, planes, h, w, out_scale, threads);
  std::vector<double> want, scale;
  direct(x, planes, h, w, want, scale);
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double bound = std::fabs(out_scale) * scale[i];
    const double err = std::fabs(double(y_mem[guard + i]) - out_scale * want[i]) / (bound > 0 ? bound : 1.0);
    if (!(err <= worst)) worst = err;  // NaN propagates into worst
  }
  double& seen = worst_seen[sizeof(T) == sizeof(double)];
  seen = std::fmax(seen, worst);
  char what[160];
  std::snprintf(what, sizeof(what), "%s planes=%lld h=%lld w=%lld threads=%d scale=%g max error / (|scale| K*|x|)",
                type, (long long)planes, (long long)h, (long long)w, threads, out_scale);
  expect(worst <= tol, what, worst, tol);
  bool guards_ok = true, input_ok = x == x_copy;
  for (int64_t i = 0; i < guard; ++i) guards_ok = guards_ok && y_mem[i] == canary && y_mem[guard + n + i] == canary;
  std::snprintf(what, sizeof(what), "%s planes=%lld h=%lld w=%lld: canaries and input untouched", type,
                (long long)planes, (long long)h, (long long)w);
  expect(guards_ok && input_ok, what, guards_ok + 2 * input_ok, 3);
}

template <class T>
void check_shapes(double tol, const char* type) {
  // Smaller than the kernel, odd, several column strips (128 wide), row chunks (128 high) with their carried halo,
  // row bands (few planes), ragged last panels, and thread counts that split all of these.
  const int64_t shapes[][3] = {
      {1, 1, 1},     {2, 5, 7},    {1, 13, 50},   {3, 45, 45},  {2, 50, 61},   {1, 96, 96},    {1, 23, 137},
      {1, 300, 17},  {1, 130, 260}, {5, 9, 300},  {1, 2, 1000}, {5, 270, 20},  {3, 150, 130}, {2, 300, 400},
  };
  // The output scale (the network's 0.01, and a negative one) rides on the taps: every shape runs with one.
  for (const auto& s : shapes)
    for (int threads : {1, 3}) check_shape<T>(s[0], s[1], s[2], threads, threads == 1 ? 1.0 : -0.01, tol, type);
}

// Golden values of K itself: a unit impulse returns K, and a constant map returns sum(K) in its centre.
void check_golden() {
  const int64_t n = 2 * kR + 1;
  std::vector<float> delta(n * n, 0.f), y(n * n);
  delta[kR * n + kR] = 1.f;
  lgc::kernel_conv_cpu(delta.data(), y.data(), 1, n, n, 1.0);
  // Values of the dense kernel printed by numpy: K[22,22], K[0,0], K[22,0], K[10,30].
  const double golden[][3] = {{22, 22, 1.0},
                              {0, 0, 0.0005184070986130666},
                              {22, 0, 0.01152628386790962},
                              {10, 30, 0.08245924441651013}};
  for (const auto& g : golden) {
    const double got = y[int(g[0]) * n + int(g[1])];
    expect(std::fabs(got - g[2]) <= 1e-6 * g[2], "impulse response equals K", got, g[2]);
  }
  const int64_t m = 2 * n;
  std::vector<double> ones(m * m, 1.0), z(m * m);
  lgc::kernel_conv_cpu(ones.data(), z.data(), 1, m, m, 1.0);
  const double sum_k = 204.681774823069;  // sum of all 2025 entries of K (numpy, float64)
  const double got = z[(m / 2) * m + m / 2];
  expect(std::fabs(got - sum_k) <= 1e-12 * sum_k, "constant map gives sum(K) (double)", got, sum_k);
}

// The dropped taps stay below the claimed relative bound (see KernelConvRadii).
template <class T>
void check_truncation_bound(const char* type) {
  const int last = lgc::kKernelConvGaussians - 1;  // the widest Gaussian, never truncated
  double delta = 0.0;
  for (int s = 0; s < lgc::kKernelConvGaussians; ++s) {
    double worst = 0.0;
    for (int u = lgc::KernelConvRadii<T>::value[s] + 1; u <= kR; ++u)
      worst = std::fmax(worst, gauss(s, u) / gauss(last, u));
    delta += worst;
  }
  expect(lgc::KernelConvRadii<T>::value[last] == kR, type, lgc::KernelConvRadii<T>::value[last], kR);
  expect(delta < lgc::KernelConvRadii<T>::max_relative_error, type, delta, lgc::KernelConvRadii<T>::max_relative_error);
}

}  // namespace

int main() {
  check_truncation_bound<float>("float truncation bound");
  check_truncation_bound<double>("double truncation bound");
  check_golden();
  check_shapes<float>(1e-6, "float");
  check_shapes<double>(1e-14, "double");
  lgc::kernel_conv_cpu(static_cast<const float*>(nullptr), nullptr, 0, 7, 7, 1.0);  // empty: no access
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel_conv checks passed; largest error / (K*|x|): float %.3g, double %.3g\n", worst_seen[0],
              worst_seen[1]);
  return 0;
}
