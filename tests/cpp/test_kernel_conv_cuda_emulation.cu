// ctest (where nvcc exists): host emulation of lgc::kernel_conv_detail::kernel_conv_rows (csrc/cuda/kernel_conv.cu)
// without a GPU: every block's threads run phase by phase (the kernel's __syncthreads points), with plans forced
// through strips, plane packing and row chunks, with output scales of 1 and -0.01; the result is compared with a
// dense 45x45 convolution in double. Built by CMakeLists.txt.
#include "cuda/kernel_conv.cu"

#include <cstdio>
#include <random>
#include <vector>

namespace {

using namespace lgc::kernel_conv_detail;
using lgc::from_acc;

template <typename In>
void emulate(const Plan& plan, const In* x, In* y) {
  using Acc = typename Traits<In>::Acc;
  const int threads = plan.threads();
  for (int64_t block = 0; block < plan.blocks; ++block) {
    std::vector<Acc> buffer(plan.buffer_elems(), Acc(0));
    std::vector<Column<In>> cols(threads);
    for (int t = 0; t < threads; ++t) column_init(cols[t], plan, x, y, block, t);
    const int batches = batch_count(cols[0]);
    for (int b = 0; b < batches; ++b) {
      for (int t = 0; t < threads; ++t) column_load(cols[t], plan, b, buffer.data());
      for (int t = 0; t < threads; ++t) column_consume(cols[t], plan, b, buffer.data());
    }
    for (int t = 0; t < threads; ++t) column_flush(cols[t], plan);
  }
}

double to_double(float v) { return v; }
double to_double(double v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

int failures = 0;

template <typename In>
void check(const char* type, int64_t planes, int height, int width, int sms, int per_sm, double scale, double tol,
           std::mt19937& rng) {
  using Acc = typename Traits<In>::Acc;
  std::normal_distribution<double> normal;
  const int64_t n = planes * height * width;
  std::vector<In> x(n), y(n, from_acc<In>(static_cast<Acc>(NAN)));  // NaN marks an output never written
  for (auto& v : x) v = from_acc<In>(static_cast<Acc>(normal(rng)));
  Plan plan = make_plan<In>(planes, height, width);
  split_rows(plan, sms, per_sm);
  plan.weight = scale / kSigmas;  // as launch() sets it
  emulate(plan, x.data(), y.data());
  double kernel[45][45];
  for (int a = 0; a < 45; ++a) {
    for (int b = 0; b < 45; ++b) {
      double sum = 0;
      for (int s = 0; s < 5; ++s) {
        const double var = 2.0 * (2 * s + 1) * (2 * s + 1);
        sum += std::exp(-(a - 22.0) * (a - 22.0) / var) * std::exp(-(b - 22.0) * (b - 22.0) / var);
      }
      kernel[a][b] = scale * sum / 5;
    }
  }
  double max_err = 0, max_ref = 0;
  bool unwritten = false;
  for (int64_t p = 0; p < planes; ++p) {
    for (int r = 0; r < height; ++r) {
      for (int c = 0; c < width; ++c) {
        double ref = 0;
        for (int a = -22; a <= 22; ++a) {
          for (int b = -22; b <= 22; ++b) {
            const int rr = r + a, cc = c + b;
            if (rr >= 0 && rr < height && cc >= 0 && cc < width) {
              ref += kernel[a + 22][b + 22] * to_double(x[(p * height + rr) * width + cc]);
            }
          }
        }
        const double got = to_double(y[(p * height + r) * width + c]);
        unwritten |= std::isnan(got);
        max_err = std::max(max_err, std::abs(got - ref));
        max_ref = std::max(max_ref, std::abs(ref));
      }
    }
  }
  const bool ok = !unwritten && max_err <= tol * max_ref;
  failures += !ok;
  std::printf("%s %-5s %lldx%dx%d sms=%d per_sm=%d scale=%g: t=%d G=%d strips=%d rows=%d chunks=%d blocks=%lld rel=%.2g%s\n",
              ok ? "ok  " : "FAIL", type, static_cast<long long>(planes), height, width, sms, per_sm, scale,
              plan.seg_threads,
              plan.segs_per_block, plan.strips, plan.chunk_rows, plan.chunks, static_cast<long long>(plan.blocks),
              max_err / max_ref, unwritten ? " (unwritten outputs)" : "");
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const int shapes[][3] = {{1, 1, 1},   {2, 1, 1},   {1, 5, 7},    {3, 40, 40},  {2, 96, 96},  {1, 45, 45},
                           {1, 23, 300}, {1, 300, 23}, {2, 1, 200}, {1, 200, 1},  {1, 130, 257}, {5, 17, 64},
                           {1, 250, 130}, {3, 33, 129}, {1, 2, 2},  {7, 9, 3},    {1, 60, 600}};
  for (const auto& s : shapes) {
    check<float>("f32", s[0], s[1], s[2], 132, 4, 1.0, 1e-5, rng);
    check<float>("f32", s[0], s[1], s[2], 4096, 8, -0.01, 1e-5, rng);  // a huge GPU: forces row chunks
  }
  check<double>("f64", 2, 50, 61, 132, 2, 1.0, 1e-12, rng);
  check<double>("f64", 1, 150, 150, 4096, 2, -0.01, 1e-12, rng);
  check<__half>("f16", 2, 40, 41, 132, 4, 1.0, 2e-3, rng);
  check<__half>("f16", 1, 70, 301, 4096, 4, 0.01, 2e-3, rng);
  check<__nv_bfloat16>("bf16", 2, 40, 41, 132, 4, 0.01, 1e-2, rng);
  std::printf("%d failures\n", failures);
  return failures != 0;
}
