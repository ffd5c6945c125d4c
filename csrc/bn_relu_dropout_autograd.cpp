// Autograd of the conv-block epilogue's training ops (csrc/bn_relu_dropout_train.cpp), in C++: lgc_fast_C::
// bn_relu_dropout_train and bn_relu_dropout_train_drawn save what their backward needs, and that backward is one call
// of lgc_fast_C::bn_relu_dropout_train_backward (with the keep mask, the seed or the drawn keep bits). Both go through
// the dispatcher, so every device's kernels (and the Meta ones under torch.compile) serve them.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace lgc {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// bn_relu_dropout_train_backward for the saved (z, weight, bias, mean, var, ...) of a training op's forward.
Triple train_backward_call(const at::Tensor& grad, const torch::autograd::variable_list& saved,
                           const OptTensor& keep_mask, const OptTensor& seed, torch::autograd::AutogradContext* ctx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lgc_fast_C::bn_relu_dropout_train_backward", "")
                       .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double,
                                     double, double)>();
  return op.call(grad, saved[0], saved[1], saved[2], saved[3], saved[4], keep_mask, seed,
                 ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["eps"].toDouble(),
                 ctx->saved_data["out_scale"].toDouble());
}

// The forward updated the running statistics in place below the autograd keys: count it as the in-place ops of
// torch would (autograd's checks of saved tensors read the version).
void bump_versions(const OptTensor& running_mean, const OptTensor& running_var) {
  for (const auto* v : {&running_mean, &running_var}) {
    if (v->has_value()) (*v)->unsafeGetTensorImpl()->bump_version();
  }
}

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& z,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const OptTensor& keep_mask, const OptTensor& seed,
                                                const OptTensor& running_mean, const OptTensor& running_var,
                                                double momentum, double dropout_p, double eps, double out_scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lgc_fast_C::bn_relu_dropout_train", "")
                         .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                       const OptTensor&, const OptTensor&, const OptTensor&, double, double, double,
                                       double)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, var] =
        op.call(z, weight, bias, keep_mask, seed, running_mean, running_var, momentum, dropout_p, eps, out_scale);
    bump_versions(running_mean, running_var);
    ctx->save_for_backward({z, weight, bias, mean, var, keep_mask.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["out_scale"] = out_scale;
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    auto [dz, dweight, dbias] = train_backward_call(grad, saved, optional(saved[5]), optional(saved[6]), ctx);
    return {dz,          dweight,     dbias,       at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The training op drawing its keep bits: the backward is bn_relu_dropout_train_backward with them.
class TrainDrawnFunction : public torch::autograd::Function<TrainDrawnFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& z,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& seed, const OptTensor& running_mean,
                                                const OptTensor& running_var, double momentum, double dropout_p,
                                                double eps, double out_scale) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lgc_fast_C::bn_relu_dropout_train_drawn", "")
                         .typed<Quad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const OptTensor&, const OptTensor&, double, double, double, double)>();
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, var, bits] =
        op.call(z, weight, bias, seed, running_mean, running_var, momentum, dropout_p, eps, out_scale);
    bump_versions(running_mean, running_var);
    ctx->save_for_backward({z, weight, bias, mean, var, bits});
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["out_scale"] = out_scale;
    ctx->mark_non_differentiable({mean, var, bits});
    return {y, mean, var, bits};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    auto [dz, dweight, dbias] = train_backward_call(grad, saved, OptTensor(saved[5]), OptTensor(), ctx);
    return {dz,          dweight,     dbias,       at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Quad train_drawn_autograd(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& seed,
                          const OptTensor& running_mean, const OptTensor& running_var, double momentum,
                          double dropout_p, double eps, double out_scale) {
  const auto out = TrainDrawnFunction::apply(z, weight, bias, seed, running_mean, running_var, momentum, dropout_p, eps,
                                             out_scale);
  return {out[0], out[1], out[2], out[3]};
}

Triple train_autograd(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias, const OptTensor& keep_mask,
                      const OptTensor& seed, const OptTensor& running_mean, const OptTensor& running_var,
                      double momentum, double dropout_p, double eps, double out_scale) {
  const auto out = TrainFunction::apply(z, weight, bias, keep_mask, seed, running_mean, running_var, momentum,
                                        dropout_p, eps, out_scale);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_IMPL(lgc_fast_C, Autograd, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_autograd);
  m.impl("bn_relu_dropout_train_drawn", &lgc::train_drawn_autograd);
}
