// Torch glue of the training loss: ops lgc_fast_C::lgc_loss and lgc_fast_C::lgc_loss_backward on CPU and CUDA.
// Maps are computed in float64 when local is float64 and in float32 otherwise (omega and points are converted to
// that type when they differ); gradients come back in local's and omega's dtype and memory layout. The kernels read
// planar maps (the network's are): on CUDA, channels_last ones change layout with csrc/cuda/layout.cu's transpose.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/lgc_loss.h"

#ifdef LGC_WITH_CUDA
#include "cuda/lgc_loss.h"
#include "cuda_glue.h"
#endif

namespace lgc {
namespace {

void check_inputs(const at::Tensor& local, const at::Tensor& omega, const at::Tensor& points,
                  const at::Tensor& labelled) {
  TORCH_CHECK(local.dim() == 4, "lgc_loss: local must have shape (N, C, H, W), got ", local.sizes());
  TORCH_CHECK(omega.sizes() == local.sizes(), "lgc_loss: omega must have the shape of local ", local.sizes(),
              ", got ", omega.sizes());
  const int64_t n = local.size(0);
  const int64_t c = local.size(1);
  TORCH_CHECK(points.dim() == 3 && points.size(0) == n && points.size(1) == c && points.size(2) == 2,
              "lgc_loss: points must have shape (N, C, 2) = (", n, ", ", c, ", 2), got ", points.sizes());
  TORCH_CHECK(labelled.dim() == 2 && labelled.size(0) == n && labelled.size(1) == c,
              "lgc_loss: labelled must have shape (N, C) = (", n, ", ", c, "), got ", labelled.sizes());
  TORCH_CHECK(at::isFloatingType(local.scalar_type()), "lgc_loss: local must be floating point, got ",
              local.scalar_type());
  TORCH_CHECK(at::isFloatingType(omega.scalar_type()), "lgc_loss: omega must be floating point, got ",
              omega.scalar_type());
  TORCH_CHECK(at::isFloatingType(points.scalar_type()), "lgc_loss: points must be floating point, got ",
              points.scalar_type());
  TORCH_CHECK(labelled.scalar_type() == at::kBool, "lgc_loss: labelled must be bool, got ", labelled.scalar_type());
  TORCH_CHECK(omega.device() == local.device() && points.device() == local.device() &&
                  labelled.device() == local.device(),
              "lgc_loss: local, omega, points and labelled must be on one device, got ", local.device(), ", ",
              omega.device(), ", ", points.device(), ", ", labelled.device());
}

void check_grad(const at::Tensor& grad, const at::Tensor& local) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == local.size(0), "lgc_loss_backward: grad must have shape (N,) = (",
              local.size(0), ",), got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "lgc_loss_backward: grad must be floating point, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.device() == local.device(), "lgc_loss_backward: grad must be on ", local.device(), ", got ",
              grad.device());
}

at::ScalarType loss_type(const at::Tensor& local) {
  return local.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Where the kernel writes a gradient: straight into the tensor the op returns when that is a contiguous tensor of
// type `computed`, else into a contiguous scratch that `finish_grad` copies (and converts) into it.
struct GradOut {
  at::Tensor result;
  at::Tensor target;
};

GradOut grad_out(const at::Tensor& like, at::ScalarType computed) {
  at::Tensor result = at::empty_like(like);
  if (result.scalar_type() == computed && result.is_contiguous()) return {result, result};
  return {result, at::empty(like.sizes(), like.options().dtype(computed))};
}

at::Tensor finish_grad(const GradOut& out) {
  if (!out.target.is_same(out.result)) out.result.copy_(out.target);
  return out.result;
}

at::Tensor forward_cpu_op(const at::Tensor& local, const at::Tensor& omega, const at::Tensor& points,
                          const at::Tensor& labelled) {
  check_inputs(local, omega, points, labelled);
  const auto dt = loss_type(local);
  const at::Tensor l = local.to(dt).contiguous();
  const at::Tensor o = omega.to(dt).contiguous();
  const at::Tensor p = points.to(dt).contiguous();
  const at::Tensor lab = labelled.contiguous();
  at::Tensor loss = at::empty({local.size(0)}, local.options().dtype(dt));
  const int64_t n = l.size(0), c = l.size(1), h = l.size(2), w = l.size(3);
  if (dt == at::kDouble) {
    lgc_loss_forward_cpu(l.data_ptr<double>(), o.data_ptr<double>(), p.data_ptr<double>(), lab.data_ptr<bool>(), n,
                         c, h, w, loss.data_ptr<double>());
  } else {
    lgc_loss_forward_cpu(l.data_ptr<float>(), o.data_ptr<float>(), p.data_ptr<float>(), lab.data_ptr<bool>(), n, c,
                         h, w, loss.data_ptr<float>());
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu_op(const at::Tensor& grad, const at::Tensor& local,
                                                   const at::Tensor& omega, const at::Tensor& points,
                                                   const at::Tensor& labelled) {
  check_inputs(local, omega, points, labelled);
  check_grad(grad, local);
  const auto dt = loss_type(local);
  const at::Tensor g = grad.to(dt).contiguous();
  const at::Tensor l = local.to(dt).contiguous();
  const at::Tensor o = omega.to(dt).contiguous();
  const at::Tensor p = points.to(dt).contiguous();
  const at::Tensor lab = labelled.contiguous();
  const GradOut gl = grad_out(local, dt);
  const GradOut go = grad_out(omega, dt);
  const int64_t n = l.size(0), c = l.size(1), h = l.size(2), w = l.size(3);
  if (dt == at::kDouble) {
    lgc_loss_backward_cpu(g.data_ptr<double>(), l.data_ptr<double>(), o.data_ptr<double>(), p.data_ptr<double>(),
                          lab.data_ptr<bool>(), n, c, h, w, gl.target.data_ptr<double>(),
                          go.target.data_ptr<double>());
  } else {
    lgc_loss_backward_cpu(g.data_ptr<float>(), l.data_ptr<float>(), o.data_ptr<float>(), p.data_ptr<float>(),
                          lab.data_ptr<bool>(), n, c, h, w, gl.target.data_ptr<float>(), go.target.data_ptr<float>());
  }
  return {finish_grad(gl), finish_grad(go)};
}

#ifdef LGC_WITH_CUDA
bool native_map_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The kernels read both maps with one element type: the maps' own when they agree and the kernels have it, the
// loss type otherwise.
at::ScalarType map_type(const at::Tensor& local, const at::Tensor& omega) {
  const auto t = local.scalar_type();
  return t == omega.scalar_type() && native_map_type(t) ? t : loss_type(local);
}

// finish_grad with the batched transpose for channels_last gradients.
at::Tensor finish_planar_grad(const GradOut& out) {
  if (!out.target.is_same(out.result)) copy_planar_into(out.result, out.target);
  return out.result;
}

at::Tensor forward_cuda_op(const at::Tensor& local, const at::Tensor& omega, const at::Tensor& points,
                           const at::Tensor& labelled) {
  check_inputs(local, omega, points, labelled);
  const c10::cuda::CUDAGuard guard(local.device());
  const auto dt = loss_type(local);
  const auto mt = map_type(local, omega);
  const at::Tensor l = planar_of(local.to(mt));
  const at::Tensor o = planar_of(omega.to(mt));
  const at::Tensor p = points.to(dt).contiguous();
  const at::Tensor lab = labelled.contiguous();
  const int64_t n = l.size(0), c = l.size(1), h = l.size(2), w = l.size(3);
  at::Tensor loss = at::empty({n}, local.options().dtype(dt));
  at::Tensor plane_loss = at::empty({n * c}, local.options().dtype(dt));
  const cudaError_t err =
      lgc_loss_forward_cuda(l.data_ptr(), o.data_ptr(), p.data_ptr(), lab.data_ptr<bool>(), scalar_kind(mt), n, c, h,
                            w, plane_loss.data_ptr(), loss.data_ptr(), c10::cuda::getCurrentCUDAStream());
  check_launch(err, "lgc_loss");
  return loss;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda_op(const at::Tensor& grad, const at::Tensor& local,
                                                    const at::Tensor& omega, const at::Tensor& points,
                                                    const at::Tensor& labelled) {
  check_inputs(local, omega, points, labelled);
  check_grad(grad, local);
  const c10::cuda::CUDAGuard guard(local.device());
  const auto dt = loss_type(local);
  const auto mt = map_type(local, omega);
  const at::Tensor g = grad.to(dt).contiguous();
  const at::Tensor l = planar_of(local.to(mt));
  const at::Tensor o = planar_of(omega.to(mt));
  const at::Tensor p = points.to(dt).contiguous();
  const at::Tensor lab = labelled.contiguous();
  const GradOut gl = grad_out(local, mt);
  const GradOut go = grad_out(omega, mt);
  const int64_t n = l.size(0), c = l.size(1), h = l.size(2), w = l.size(3);
  const cudaError_t err = lgc_loss_backward_cuda(g.data_ptr(), l.data_ptr(), o.data_ptr(), p.data_ptr(),
                                                 lab.data_ptr<bool>(), scalar_kind(mt), n, c, h, w,
                                                 gl.target.data_ptr(), go.target.data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream());
  check_launch(err, "lgc_loss_backward");
  return {finish_planar_grad(gl), finish_planar_grad(go)};
}
#endif

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def("lgc_loss(Tensor local, Tensor omega, Tensor points, Tensor labelled) -> Tensor");
  m.def(
      "lgc_loss_backward(Tensor grad, Tensor local, Tensor omega, Tensor points, Tensor labelled) -> (Tensor, "
      "Tensor)");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("lgc_loss", &lgc::forward_cpu_op);
  m.impl("lgc_loss_backward", &lgc::backward_cpu_op);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("lgc_loss", &lgc::forward_cuda_op);
  m.impl("lgc_loss_backward", &lgc::backward_cuda_op);
}
#endif
