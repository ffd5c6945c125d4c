// Torch glue of the shape fit's statistics pass: op lgc_fast_C::fit_shape_stats on CPU and CUDA.
// Statistics are float64 for float64 maps and float32 otherwise; peak and centers are converted to that type. The CPU
// kernel reads float32 or float64 maps (half and bfloat16 are converted first); the CUDA kernel reads all four.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/fit_shape.h"

#ifdef LGC_WITH_CUDA
#include "cuda/fit_shape.h"
#include "cuda_glue.h"
#endif

namespace lgc {
namespace {

at::ScalarType stats_type(const at::Tensor& heatmaps) {
  return heatmaps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& heatmaps, const at::Tensor& peak, const std::optional<at::Tensor>& centers,
                  double radius, at::ArrayRef<double> thresholds) {
  TORCH_CHECK(heatmaps.dim() == 4, "fit_shape_stats: heatmaps must have shape (N, C, H, W), got ", heatmaps.sizes());
  TORCH_CHECK(at::isFloatingType(heatmaps.scalar_type()), "fit_shape_stats: heatmaps must be floating point, got ",
              heatmaps.scalar_type());
  const int64_t n = heatmaps.size(0), c = heatmaps.size(1);
  TORCH_CHECK(peak.dim() == 2 && peak.size(0) == n && peak.size(1) == c,
              "fit_shape_stats: peak must have shape (N, C) = (", n, ", ", c, "), got ", peak.sizes());
  TORCH_CHECK(at::isFloatingType(peak.scalar_type()), "fit_shape_stats: peak must be floating point, got ",
              peak.scalar_type());
  TORCH_CHECK(peak.device() == heatmaps.device(), "fit_shape_stats: peak must be on ", heatmaps.device(), ", got ",
              peak.device());
  if (centers.has_value()) {
    const at::Tensor& ct = *centers;
    TORCH_CHECK(ct.dim() == 3 && ct.size(0) == n && ct.size(1) == c && ct.size(2) == 2,
                "fit_shape_stats: centers must have shape (N, C, 2) = (", n, ", ", c, ", 2), got ", ct.sizes());
    TORCH_CHECK(at::isFloatingType(ct.scalar_type()), "fit_shape_stats: centers must be floating point, got ",
                ct.scalar_type());
    TORCH_CHECK(ct.device() == heatmaps.device(), "fit_shape_stats: centers must be on ", heatmaps.device(),
                ", got ", ct.device());
    TORCH_CHECK(radius >= 0, "fit_shape_stats: radius must be >= 0, got ", radius);
  }
  TORCH_CHECK(!thresholds.empty() && thresholds.size() <= size_t(kFitShapeMaxThresholds),
              "fit_shape_stats: thresholds must hold 1 to ", kFitShapeMaxThresholds, " values, got ", thresholds.size());
}

at::Tensor stats_cpu_op(const at::Tensor& heatmaps, const at::Tensor& peak, const std::optional<at::Tensor>& centers,
                        double radius, at::ArrayRef<double> thresholds) {
  check_inputs(heatmaps, peak, centers, radius, thresholds);
  const auto dt = stats_type(heatmaps);
  const at::Tensor maps = heatmaps.to(dt).contiguous();
  const at::Tensor pk = peak.to(dt).contiguous();
  const at::Tensor ct = centers.has_value() ? centers->to(dt).contiguous() : at::Tensor();
  const int64_t n = maps.size(0), c = maps.size(1), h = maps.size(2), w = maps.size(3);
  const int nt = int(thresholds.size());
  at::Tensor out = at::empty({n, c, nt, 3}, heatmaps.options().dtype(dt));
  if (dt == at::kDouble) {
    fit_shape_stats_cpu(maps.data_ptr<double>(), pk.data_ptr<double>(), ct.defined() ? ct.data_ptr<double>() : nullptr,
                        radius, thresholds.data(), nt, n * c, h, w, out.data_ptr<double>());
  } else {
    fit_shape_stats_cpu(maps.data_ptr<float>(), pk.data_ptr<float>(), ct.defined() ? ct.data_ptr<float>() : nullptr,
                        float(radius), thresholds.data(), nt, n * c, h, w, out.data_ptr<float>());
  }
  return out;
}

#ifdef LGC_WITH_CUDA
at::Tensor stats_cuda_op(const at::Tensor& heatmaps, const at::Tensor& peak, const std::optional<at::Tensor>& centers,
                         double radius, at::ArrayRef<double> thresholds) {
  check_inputs(heatmaps, peak, centers, radius, thresholds);
  const c10::cuda::CUDAGuard guard(heatmaps.device());
  const auto dt = stats_type(heatmaps);
  const auto st = heatmaps.scalar_type();
  const bool native = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble;
  const at::Tensor maps = (native ? heatmaps : heatmaps.to(dt)).contiguous();
  const at::Tensor pk = peak.to(dt).contiguous();
  const at::Tensor ct = centers.has_value() ? centers->to(dt).contiguous() : at::Tensor();
  const int64_t n = maps.size(0), c = maps.size(1), h = maps.size(2), w = maps.size(3);
  const int nt = int(thresholds.size());
  at::Tensor out = at::empty({n, c, nt, 3}, heatmaps.options().dtype(dt));
  if (out.numel() == 0) return out;
  const cudaError_t err = fit_shape_stats_cuda(maps.data_ptr(), scalar_kind(maps.scalar_type()), pk.data_ptr(),
                                               ct.defined() ? ct.data_ptr() : nullptr, radius, thresholds.data(), nt,
                                               n * c, h, w, out.data_ptr(), c10::cuda::getCurrentCUDAStream());
  check_launch(err, "fit_shape_stats");
  return out;
}
#endif

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def("fit_shape_stats(Tensor heatmaps, Tensor peak, Tensor? centers, float radius, float[] thresholds) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) { m.impl("fit_shape_stats", &lgc::stats_cpu_op); }

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) { m.impl("fit_shape_stats", &lgc::stats_cuda_op); }
#endif
