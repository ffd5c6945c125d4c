// ctest of the CPU loss kernels against a naive float64 oracle: a dense bilinear splat convolved with the 45x45
// kernel pixel by pixel, the weights of eq. 3, and the loss and gradients written out from their definitions.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "cpu/lgc_loss.h"

namespace {

int failures = 0;

void expect_close(double got, double want, double rtol, double atol, const char* what, int64_t index) {
  if (!(std::abs(got - want) <= atol + rtol * std::abs(want))) {
    std::printf("FAIL %s[%lld]: got %.17g, want %.17g\n", what, static_cast<long long>(index), got, want);
    ++failures;
  }
}

double kernel_value(int64_t u, int64_t v) {
  if (std::abs(u) > 22 || std::abs(v) > 22) return 0.0;
  double k = 0;
  for (int s = 0; s < 5; ++s) {
    const double sigma = 2.0 * s + 1.0;
    k += std::exp(-double(u * u) / (2 * sigma * sigma)) * std::exp(-double(v * v) / (2 * sigma * sigma));
  }
  return k / 5.0;
}

struct Case {
  int64_t n, c, h, w;
  std::vector<double> local, omega, points;
  std::unique_ptr<bool[]> labelled;
};

// T of one plane: splat the point densely, then convolve with K directly.
std::vector<double> naive_target(const Case& cs, const std::vector<double>& pts, int64_t plane) {
  std::vector<double> g(cs.h * cs.w, 0.0), t(cs.h * cs.w, 0.0);
  if (cs.labelled[plane]) {
    const double x = pts[2 * plane], y = pts[2 * plane + 1];
    const double x0 = std::floor(x), y0 = std::floor(y);
    const double fx = x - x0, fy = y - y0;
    const double wts[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
    for (int q = 0; q < 4; ++q) {
      const double xi = x0 + (q & 1), yi = y0 + (q >> 1);
      if (xi >= 0 && xi < cs.w && yi >= 0 && yi < cs.h) g[int64_t(yi) * cs.w + int64_t(xi)] += wts[q];
    }
  }
  for (int64_t py = 0; py < cs.h; ++py)
    for (int64_t px = 0; px < cs.w; ++px)
      for (int64_t qy = 0; qy < cs.h; ++qy)
        for (int64_t qx = 0; qx < cs.w; ++qx)
          if (g[qy * cs.w + qx] != 0) t[py * cs.w + px] += g[qy * cs.w + qx] * kernel_value(px - qx, py - qy);
  return t;
}

std::vector<double> naive_weights(const Case& cs, const std::vector<double>& pts) {
  std::vector<double> w(cs.n * cs.c);
  auto visible = [&](int64_t p) {
    return cs.labelled[p] && pts[2 * p] >= 0 && pts[2 * p] <= cs.w - 1 && pts[2 * p + 1] >= 0 &&
           pts[2 * p + 1] <= cs.h - 1;
  };
  for (int64_t i = 0; i < cs.n; ++i) {
    int64_t count = 0;
    for (int64_t k = 0; k < cs.c; ++k) count += visible(i * cs.c + k);
    for (int64_t k = 0; k < cs.c; ++k) {
      const int64_t p = i * cs.c + k;
      const double lab = cs.labelled[p] ? 1.0 : 0.0;
      w[p] = (visible(p) ? 1.0 : 0.0) + lab / 10 + lab / (2.0 * cs.c) * count;
    }
  }
  return w;
}

Case make_case() {
  Case cs{2, 6, 31, 37, {}, {}, {}, nullptr};
  const int64_t planes = cs.n * cs.c, size = planes * cs.h * cs.w;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 0.3);
  for (int64_t j = 0; j < size; ++j) cs.local.push_back(normal(rng));
  for (int64_t j = 0; j < size; ++j) cs.omega.push_back(normal(rng));
  // Inside, partly outside (-0.5), exact integer, far outside, on the last pixel, unlabelled NaN; face 1 likewise
  // plus one labelled NaN point, which has no target and no visibility.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double xy[12][2] = {{10.3, 7.8}, {-0.5, 15.2}, {3.0, 4.0}, {-12.0, 5.0}, {36.0, 30.0}, {nan, nan},
                            {20.7, -0.9}, {36.5, 29.5}, {0.0, 0.0}, {50.0, 50.0}, {nan, 2.0}, {nan, nan}};
  const bool lab[12] = {true, true, true, true, true, false, true, true, true, true, true, false};
  cs.labelled.reset(new bool[planes]);
  for (int64_t p = 0; p < planes; ++p) {
    cs.points.push_back(xy[p][0]);
    cs.points.push_back(xy[p][1]);
    cs.labelled[p] = lab[p];
  }
  return cs;
}

template <typename T>
void check_precision(const Case& cs, double rtol, const char* name) {
  const int64_t planes = cs.n * cs.c, plane_size = cs.h * cs.w, size = planes * plane_size;
  const std::vector<T> local(cs.local.begin(), cs.local.end()), omega(cs.omega.begin(), cs.omega.end());
  const std::vector<T> points(cs.points.begin(), cs.points.end());
  const std::vector<T> grad = {T(1.5), T(-0.5)};
  std::vector<T> loss(cs.n), w(planes), gl(size), go(size);
  lgc::lgc_loss_weights_cpu(points.data(), cs.labelled.get(), cs.n, cs.c, cs.h, cs.w, w.data());
  lgc::lgc_loss_forward_cpu(local.data(), omega.data(), points.data(), cs.labelled.get(), cs.n, cs.c, cs.h, cs.w,
                            loss.data());
  lgc::lgc_loss_backward_cpu(grad.data(), local.data(), omega.data(), points.data(), cs.labelled.get(), cs.n, cs.c,
                             cs.h, cs.w, gl.data(), go.data());
  // The oracle sees the points as the kernel does: rounded to T.
  const std::vector<double> pts(points.begin(), points.end());
  const std::vector<double> w_ref = naive_weights(cs, pts);
  std::vector<double> loss_ref(cs.n, 0.0);
  for (int64_t p = 0; p < planes; ++p) {
    expect_close(w[p], w_ref[p], rtol, 0, name, p);
    const std::vector<double> t = naive_target(cs, pts, p);
    double sum = 0;
    for (int64_t j = 0; j < plane_size; ++j) {
      const int64_t e = p * plane_size + j;
      const double dl = double(local[e]) - t[j], dor = double(omega[e]) - t[j];
      sum += dl * dl + dor * dor;
      const double scale = 2 * w_ref[p] * double(grad[p / cs.c]);
      expect_close(gl[e], scale * dl, rtol, rtol, name, e);
      expect_close(go[e], scale * dor, rtol, rtol, name, e);
    }
    loss_ref[p / cs.c] += w_ref[p] * sum;
  }
  for (int64_t i = 0; i < cs.n; ++i) expect_close(loss[i], loss_ref[i], rtol, 0, name, i);
}

}  // namespace

int main() {
  const Case cs = make_case();
  check_precision<double>(cs, 1e-12, "float64");
  check_precision<float>(cs, 2e-6, "float32");
  if (failures == 0) std::printf("test_lgc_loss: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
