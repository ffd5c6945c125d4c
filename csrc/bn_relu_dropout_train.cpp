// The training op of the conv-block epilogue, lgc_fast_C::bn_relu_dropout_train (and _drawn, _backward): the whole
// epilogue with batch statistics, forward and backward, each one call into C++ (autograd in C++ too,
// csrc/bn_relu_dropout_autograd.cpp), so a conv block pays one dispatch each way instead of a Python custom op's
// autograd and some twenty small torch calls. It runs the per-pass glue's passes (csrc/bn_relu_dropout.cpp) with the
// same formulas as the Python op's Triton path, the per-channel ones (csrc/epilogue.h) in double, in a loop on the CPU
// and inside the reductions' kernels on CUDA (forward: moments, apply; backward: gradient sums, apply). The forward
// also updates nn.BatchNorm2d's running statistics in place when given, which saves the caller's torch calls for it
// (launches, on CUDA).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "bn_relu_dropout_glue.h"

namespace lgc {
namespace {

using namespace bn_glue;

using OptTensor = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The running statistics a training forward updates in place, or none (undefined tensors).
struct Running {
  at::Tensor mean, var;
  double momentum = 0.0;
  double count = 0.0;      // values per channel
  bool in_kernel = false;  // in the accumulation dtype and dense: the per-channel step updates them itself
};

Running running_of(const at::Tensor& z, const OptTensor& running_mean, const OptTensor& running_var,
                   double momentum) {
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "bn_relu_dropout_train: running_mean and running_var must both be tensors or both be None");
  Running r;
  if (!running_mean.has_value()) return r;
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "bn_relu_dropout_train: momentum must be in [0, 1], got ",
              momentum);
  const int64_t count = z.size(1) > 0 ? z.numel() / z.size(1) : 0;
  TORCH_CHECK(count >= 2, "bn_relu_dropout_train: the running update needs N*H*W >= 2, got shape ", z.sizes());
  const at::ScalarType acc = maps_of(z).acc;
  bool in_kernel = true;
  for (const auto* v : {&*running_mean, &*running_var}) {
    const char* name = v == &*running_mean ? "running_mean" : "running_var";
    TORCH_CHECK(v->dim() == 1 && v->size(0) == z.size(1) && at::isFloatingType(v->scalar_type()),
                "bn_relu_dropout_train: ", name, " must be a floating-point tensor of shape (C=", z.size(1),
                ",), got ", v->scalar_type(), " ", v->sizes());
    TORCH_CHECK(v->device() == z.device(), "bn_relu_dropout_train: ", name, " must be on z's device ", z.device(),
                ", got ", v->device());
    in_kernel = in_kernel && v->scalar_type() == acc && v->is_contiguous();
  }
  return {*running_mean, *running_var, momentum, static_cast<double>(count), in_kernel};
}

// The update in torch ops where the per-channel step could not do it (another dtype, strided buffers).
void update_running_outside(const Running& r, const at::Tensor& mean, const at::Tensor& var) {
  if (!r.mean.defined() || r.in_kernel) return;
  r.mean.lerp_(mean.to(r.mean.scalar_type()), r.momentum);
  r.var.lerp_((var * (r.count / (r.count - 1.0))).to(r.var.scalar_type()), r.momentum);
}

// The CPU's update: a loop over the channels (bn_running_update) where the buffers allow it, else torch ops.
void update_running_cpu(const Running& r, const at::Tensor& mean, const at::Tensor& var) {
  if (!r.in_kernel) return update_running_outside(r, mean, var);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_relu_dropout_train", [&] {
    scalar_t* running_mean = r.mean.mutable_data_ptr<scalar_t>();
    scalar_t* running_var = r.var.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.size(0); ++c) {
      const BnRunning u = bn_running_update(running_mean[c], running_var[c], ptr<scalar_t>(mean)[c],
                                            ptr<scalar_t>(var)[c], r.count, r.momentum);
      running_mean[c] = static_cast<scalar_t>(u.mean);
      running_var[c] = static_cast<scalar_t>(u.var);
    }
  });
}

void check_affine_vectors(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean) {
  for (const auto* v : {&weight, &bias}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == mean.size(0), "bn_relu_dropout_train: ",
                v == &weight ? "weight" : "bias", " must have shape (C=", mean.size(0), ",), got ", v->sizes());
  }
}

// BatchNorm's per-channel terms (csrc/epilogue.h) as (C,) tensors in mean's dtype, the accumulation type: the
// forward's (invstd, scale, shift). On the CPU a loop.
Triple affine_cpu(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var,
                  double eps) {
  check_affine_vectors(weight, bias, mean);
  const at::Tensor w = weight.to(mean.scalar_type()).contiguous(), b = bias.to(mean.scalar_type()).contiguous();
  at::Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_relu_dropout_train", [&] {
    for (int64_t c = 0; c < mean.size(0); ++c) {
      const BnAffineAs<scalar_t> t = bn_train_affine_as(ptr<scalar_t>(mean)[c], ptr<scalar_t>(var)[c],
                                                        ptr<scalar_t>(w)[c], ptr<scalar_t>(b)[c], eps);
      out<scalar_t>(invstd)[c] = t.invstd;
      out<scalar_t>(scale)[c] = t.scale;
      out<scalar_t>(shift)[c] = t.shift;
    }
  });
  return {invstd, scale, shift};
}

// The training forward's statistics and terms -> (mean, biased var, scale, shift), the running update done.
Quad train_stats_cpu(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     const Running& running) {
  auto [mean, var] = moments_cpu(z);
  auto [invstd, scale, shift] = affine_cpu(weight, bias, mean, var, eps);
  update_running_cpu(running, mean, var);
  return {mean, var, scale, shift};
}

// What the backward's reduction gives per channel: BatchNorm's scale and shift again (for the gradient apply) and the
// terms of bn_train_grad_terms.
struct BackwardTerms {
  at::Tensor scale, shift, k1, k0, dweight, dbias;
};

// The backward's per-channel results from the forward's batch statistics and the gradient's sums.
BackwardTerms grad_terms_cpu(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& weight,
                             const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                             const OptTensor& keep_mask, const OptTensor& seed, double dropout_p, double out_scale) {
  auto [invstd, scale, shift] = affine_cpu(weight, bias, mean, var, eps);
  auto [sum_g, sum_g_centered] = grad_sums_cpu(grad, z, scale, shift, keep_mask, seed, dropout_p, mean, out_scale);
  const double count = static_cast<double>(z.numel() / z.size(1));
  at::Tensor k1 = at::empty_like(mean), k0 = at::empty_like(mean);
  at::Tensor dweight = at::empty_like(mean), dbias = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_relu_dropout_train_backward", [&] {
    for (int64_t c = 0; c < mean.size(0); ++c) {
      const BnGradTerms t = bn_train_grad_terms(ptr<scalar_t>(invstd)[c], ptr<scalar_t>(scale)[c],
                                                ptr<scalar_t>(mean)[c], ptr<scalar_t>(sum_g)[c],
                                                ptr<scalar_t>(sum_g_centered)[c], count);
      out<scalar_t>(k1)[c] = static_cast<scalar_t>(t.k1);
      out<scalar_t>(k0)[c] = static_cast<scalar_t>(t.k0);
      out<scalar_t>(dweight)[c] = static_cast<scalar_t>(t.dweight);
      out<scalar_t>(dbias)[c] = static_cast<scalar_t>(t.dbias);
    }
  });
  return {scale, shift, k1, k0, dweight, dbias};
}

#ifdef LGC_WITH_CUDA
// train_stats_cpu in two launches: the moments' tiles, then one block a channel that also writes the terms and
// updates the running statistics.
Quad train_stats_cuda(const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      const Running& running) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = moments_inputs(z_in);
  auto [mean, var] = new_channel_pair(in.z, in.maps);
  const at::Tensor w = channel_vector(weight, in.z, in.maps, "weight"), b = channel_vector(bias, in.z, in.maps, "bias");
  at::Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  at::Tensor partials = new_partials(in.z, in.maps);
  BnTrainTermsCuda terms;
  terms.weight = w.const_data_ptr();
  terms.bias = b.const_data_ptr();
  terms.eps = eps;
  terms.invstd = invstd.mutable_data_ptr();
  terms.scale = scale.mutable_data_ptr();
  terms.shift = shift.mutable_data_ptr();
  if (running.in_kernel) {
    terms.running_mean = running.mean.mutable_data_ptr();
    terms.running_var = running.var.mutable_data_ptr();
    terms.momentum = running.momentum;
    terms.count = running.count;
  }
  check_launch(bn_moments_cuda(in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()), in.maps.shape,
                               out<double>(partials), mean.mutable_data_ptr(), var.mutable_data_ptr(), terms,
                               c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_train");
  update_running_outside(running, mean, var);
  return {mean, var, scale, shift};
}

// grad_terms_cpu in two launches: the gradient sums' tiles, which compute BatchNorm's scale and shift themselves, then
// one block a channel that also writes them and the terms.
BackwardTerms grad_terms_cuda(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& weight,
                              const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                              const OptTensor& keep_mask, const OptTensor& seed, double dropout_p, double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  check_affine_vectors(weight, bias, mean);
  // weight and bias take the scale and shift slots, in the accumulation type: the kernels compute those from them
  const Inputs in = grad_sums_inputs(grad, z_in, weight, bias, keep_mask, seed, dropout_p, mean);
  const at::Tensor batch_var = channel_vector(var, in.z, in.maps, "var");
  auto [sum_g, sum_g_centered] = new_channel_pair(in.z, in.maps);
  BackwardTerms t;
  for (at::Tensor* v : {&t.scale, &t.shift, &t.k1, &t.k0, &t.dweight, &t.dbias}) *v = at::empty_like(sum_g);
  at::Tensor partials = new_partials(in.z, in.maps);
  BnGradTermsCuda terms;
  terms.mean = in.center.const_data_ptr();
  terms.var = batch_var.const_data_ptr();
  terms.weight = in.scale.const_data_ptr();
  terms.bias = in.shift.const_data_ptr();
  terms.eps = eps;
  terms.count = static_cast<double>(in.z.numel() / in.z.size(1));
  terms.scale = t.scale.mutable_data_ptr();
  terms.shift = t.shift.mutable_data_ptr();
  terms.k1 = t.k1.mutable_data_ptr();
  terms.k0 = t.k0.mutable_data_ptr();
  terms.dweight = t.dweight.mutable_data_ptr();
  terms.dbias = t.dbias.mutable_data_ptr();
  check_launch(bn_train_grad_sums_cuda(in.dy.const_data_ptr(), in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()),
                                       cuda_dropout(in.drop), out_scale, in.maps.shape, out<double>(partials),
                                       sum_g.mutable_data_ptr(), sum_g_centered.mutable_data_ptr(), terms,
                                       c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_train_backward");
  return t;
}
#endif

// z, weight, bias -> (y, mean, biased var), running_mean and running_var (when given) updated in place.
template <auto Stats, auto Apply>
Triple train_forward(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, const OptTensor& keep_mask,
                     const OptTensor& seed, const OptTensor& running_mean, const OptTensor& running_var,
                     double momentum, double dropout_p, double eps, double out_scale) {
  auto [mean, var, scale, shift] = Stats(z, weight, bias, eps, running_of(z, running_mean, running_var, momentum));
  return {Apply(z, scale, shift, keep_mask, seed, dropout_p, out_scale), mean, var};
}

// z, weight, bias, seed -> (y, mean, biased var, keep bits): the dropout's keep bits drawn in the forward pass
// (bernoulli_keep_bits' for the seed) and returned, for the backward (train_backward with them) and the caller.
template <auto Stats, auto ApplyDrawn>
Quad train_forward_drawn(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& seed,
                         const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                         double dropout_p, double eps, double out_scale) {
  auto [mean, var, scale, shift] = Stats(z, weight, bias, eps, running_of(z, running_mean, running_var, momentum));
  auto [y, bits] = ApplyDrawn(z, scale, shift, seed, dropout_p, out_scale);
  return {y, mean, var, bits};
}

// -> (dz, dweight, dbias), dz = scale * g + k1 * z + k0 (bn_train_grad_terms).
template <auto GradTerms, auto GradApply>
Triple train_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& mean, const at::Tensor& var, const OptTensor& keep_mask, const OptTensor& seed,
                      double dropout_p, double eps, double out_scale) {
  const BackwardTerms t = GradTerms(grad, z, weight, bias, mean, var, eps, keep_mask, seed, dropout_p, out_scale);
  at::Tensor dz = GradApply(grad, z, t.scale, t.shift, keep_mask, seed, dropout_p, t.k1, t.k0, out_scale);
  return {dz, t.dweight.to(weight.scalar_type()), t.dbias.to(bias.scalar_type())};
}

Triple train_meta(const at::Tensor& z, const at::Tensor& weight, const at::Tensor&, const OptTensor&, const OptTensor&,
                  const OptTensor&, const OptTensor&, double, double, double, double) {
  const Maps maps = maps_of(z);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == z.size(1), "bn_relu_dropout_train: weight must have shape (C=",
              z.size(1), ",), got ", weight.sizes());
  auto [mean, var] = new_channel_pair(z, maps);
  return {new_map(z, maps), mean, var};
}

Quad train_drawn_meta(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& seed,
                      const OptTensor&, const OptTensor&, double, double dropout_p, double eps, double out_scale) {
  auto [y, mean, var] = train_meta(z, weight, bias, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, 0.0,
                                   dropout_p, eps, out_scale);
  // sym_numel: under torch.compile's dynamic shapes the sizes are symbols
  return {y, mean, var, at::empty_symint({(z.sym_numel() + 7) / 8}, seed.options().dtype(at::kByte))};
}

Triple train_backward_meta(const at::Tensor&, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double, double,
                           double) {
  return {new_map(z, maps_of(z)), at::empty({weight.size(0)}, weight.options()),
          at::empty({bias.size(0)}, bias.options())};
}

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def(
      "bn_relu_dropout_train(Tensor z, Tensor weight, Tensor bias, Tensor? keep_mask, Tensor? seed, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float dropout_p, float eps, "
      "float out_scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_dropout_train_drawn(Tensor z, Tensor weight, Tensor bias, Tensor seed, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float dropout_p, float eps, float out_scale) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_relu_dropout_train_backward(Tensor grad, Tensor z, Tensor weight, Tensor bias, Tensor mean, Tensor var, "
      "Tensor? keep_mask, Tensor? seed, float dropout_p, float eps, float out_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_forward<lgc::train_stats_cpu, lgc::bn_glue::apply_cpu>);
  m.impl("bn_relu_dropout_train_drawn",
         &lgc::train_forward_drawn<lgc::train_stats_cpu, lgc::bn_glue::apply_drawn_cpu>);
  m.impl("bn_relu_dropout_train_backward",
         &lgc::train_backward<lgc::grad_terms_cpu, lgc::bn_glue::grad_apply_cpu>);
}

TORCH_LIBRARY_IMPL(lgc_fast_C, Meta, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_meta);
  m.impl("bn_relu_dropout_train_drawn", &lgc::train_drawn_meta);
  m.impl("bn_relu_dropout_train_backward", &lgc::train_backward_meta);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_forward<lgc::train_stats_cuda, lgc::bn_glue::apply_cuda>);
  m.impl("bn_relu_dropout_train_drawn",
         &lgc::train_forward_drawn<lgc::train_stats_cuda, lgc::bn_glue::apply_drawn_cuda>);
  m.impl("bn_relu_dropout_train_backward",
         &lgc::train_backward<lgc::grad_terms_cuda, lgc::bn_glue::grad_apply_cuda>);
}
#endif
