// Torch glue of conv_stack's BatchNorm finalize: op lgc_fast_C::bn_finalize on CPU and CUDA (the arithmetic is
// csrc/epilogue.h's bn_finalize_channel; lgc_fast/ops/bn_finalize.py is the public op and its torch reference).
//   bn_finalize(total, sq_total, gamma, beta, running_mean?, running_var?, count, batch_stats, update_running,
//               momentum, eps, factor) -> (mean, invstd, gamma_eff, s, b)
// Every vector (C,), contiguous, float32 or float64, all of one dtype and device; the running statistics are
// updated in place where update_running and read where not batch_stats.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/bn_finalize.h"

#ifdef LGC_WITH_CUDA
#include "cuda/bn_finalize.h"
#include "cuda_glue.h"
#endif

namespace lgc {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using Terms = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_vector(const at::Tensor& v, const at::Tensor& total, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == total.size(0), "bn_finalize: ", name, " must have shape (",
              total.size(0), ",), got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == total.scalar_type(), "bn_finalize: ", name, " must be ", total.scalar_type(),
              " as total is, got ", v.scalar_type());
  TORCH_CHECK(v.device() == total.device(), "bn_finalize: ", name, " is on ", v.device(), ", total on ",
              total.device());
  TORCH_CHECK(v.is_contiguous(), "bn_finalize: ", name, " must be contiguous");
}

void check_args(const at::Tensor& total, const at::Tensor& sq_total, const at::Tensor& gamma, const at::Tensor& beta,
                const OptTensor& running_mean, const OptTensor& running_var, double count, bool batch_stats,
                bool update_running, double momentum, double eps) {
  TORCH_CHECK(total.dim() == 1, "bn_finalize: total must have shape (C,), got ", total.sizes());
  TORCH_CHECK(total.scalar_type() == at::kFloat || total.scalar_type() == at::kDouble,
              "bn_finalize: total must be float32 or float64, got ", total.scalar_type());
  check_vector(total, total, "total");
  check_vector(sq_total, total, "sq_total");
  check_vector(gamma, total, "gamma");
  check_vector(beta, total, "beta");
  const bool running = running_mean.has_value() && running_var.has_value();
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "bn_finalize: running_mean and running_var must be given together");
  TORCH_CHECK(running || (batch_stats && !update_running),
              "bn_finalize: running statistics are needed to update them or to normalise without batch statistics");
  if (running) {
    check_vector(*running_mean, total, "running_mean");
    check_vector(*running_var, total, "running_var");
  }
  TORCH_CHECK(!batch_stats || (std::isfinite(count) && count > 0), "bn_finalize: count must be > 0, got ", count);
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "bn_finalize: momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(eps > 0, "bn_finalize: eps must be > 0, got ", eps);
}

template <typename A>
BnFinalizeArgs<A> make_args(const at::Tensor& total, const at::Tensor& sq_total, const at::Tensor& gamma,
                            const at::Tensor& beta, const OptTensor& running_mean, const OptTensor& running_var,
                            const Terms& out, double count, bool batch_stats, bool update_running, double momentum,
                            double eps, double factor) {
  const bool running = running_mean.has_value();
  return {total.const_data_ptr<A>(),
          sq_total.const_data_ptr<A>(),
          gamma.const_data_ptr<A>(),
          beta.const_data_ptr<A>(),
          running ? running_mean->mutable_data_ptr<A>() : nullptr,
          running ? running_var->mutable_data_ptr<A>() : nullptr,
          std::get<0>(out).mutable_data_ptr<A>(),
          std::get<1>(out).mutable_data_ptr<A>(),
          std::get<2>(out).mutable_data_ptr<A>(),
          std::get<3>(out).mutable_data_ptr<A>(),
          std::get<4>(out).mutable_data_ptr<A>(),
          count,
          momentum,
          eps,
          factor,
          batch_stats,
          update_running && running};
}

Terms empty_terms(const at::Tensor& total) {
  return {at::empty_like(total), at::empty_like(total), at::empty_like(total), at::empty_like(total),
          at::empty_like(total)};
}

// Launch(args, channels) runs bn_finalize_channel over the channels on the tensors' device.
template <typename Launch>
Terms finalize(const at::Tensor& total, const at::Tensor& sq_total, const at::Tensor& gamma, const at::Tensor& beta,
               const OptTensor& running_mean, const OptTensor& running_var, double count, bool batch_stats,
               bool update_running, double momentum, double eps, double factor, Launch launch) {
  check_args(total, sq_total, gamma, beta, running_mean, running_var, count, batch_stats, update_running, momentum,
             eps);
  Terms out = empty_terms(total);
  if (total.scalar_type() == at::kDouble) {
    launch(make_args<double>(total, sq_total, gamma, beta, running_mean, running_var, out, count, batch_stats,
                             update_running, momentum, eps, factor),
           total.size(0));
  } else {
    launch(make_args<float>(total, sq_total, gamma, beta, running_mean, running_var, out, count, batch_stats,
                            update_running, momentum, eps, factor),
           total.size(0));
  }
  return out;
}

Terms bn_finalize_cpu_op(const at::Tensor& total, const at::Tensor& sq_total, const at::Tensor& gamma,
                         const at::Tensor& beta, const OptTensor& running_mean, const OptTensor& running_var,
                         double count, bool batch_stats, bool update_running, double momentum, double eps,
                         double factor) {
  return finalize(total, sq_total, gamma, beta, running_mean, running_var, count, batch_stats, update_running,
                  momentum, eps, factor, [](const auto& args, int64_t channels) { bn_finalize_cpu(args, channels); });
}

Terms bn_finalize_meta(const at::Tensor& total, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const OptTensor&, const OptTensor&, double, bool, bool, double, double, double) {
  return empty_terms(total);
}

#ifdef LGC_WITH_CUDA
Terms bn_finalize_cuda_op(const at::Tensor& total, const at::Tensor& sq_total, const at::Tensor& gamma,
                          const at::Tensor& beta, const OptTensor& running_mean, const OptTensor& running_var,
                          double count, bool batch_stats, bool update_running, double momentum, double eps,
                          double factor) {
  const c10::cuda::CUDAGuard guard(total.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(total.device().index()).stream();
  return finalize(total, sq_total, gamma, beta, running_mean, running_var, count, batch_stats, update_running,
                  momentum, eps, factor, [stream](const auto& args, int64_t channels) {
                    check_launch(bn_finalize_cuda(args, channels, stream), "bn_finalize");
                  });
}
#endif

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def(
      "bn_finalize(Tensor total, Tensor sq_total, Tensor gamma, Tensor beta, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float count, bool batch_stats, bool update_running, float momentum, float eps, "
      "float factor) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("bn_finalize", &lgc::bn_finalize_cpu_op);
}

TORCH_LIBRARY_IMPL(lgc_fast_C, Meta, m) {
  m.impl("bn_finalize", &lgc::bn_finalize_meta);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("bn_finalize", &lgc::bn_finalize_cuda_op);
}
#endif
