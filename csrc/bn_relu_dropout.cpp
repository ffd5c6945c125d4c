// Torch glue of the conv-block epilogue's kernels (BatchNorm + ReLU + scale + dropout), one op per pass, on the CPU:
//   lgc_fast_C::bn_relu_dropout_moments, _apply, _grad_sums, _grad_apply and lgc_fast_C::dropout_keep_mask.
// lgc_fast/ops/bn_relu_dropout.py builds the public op and its autograd from them (the "cpu" backend), as it does
// from the Triton kernels. Maps run in z's layout: channels_last when z is channels_last (and not also contiguous),
// else contiguous (a strided z is copied); the mask and the gradient are brought to that layout, so outputs have the
// strides the Python op's fake implementations promise. Per-channel vectors are float32 (float64 for float64 maps).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/bn_relu_dropout.h"

namespace lgc {
namespace {

struct Maps {
  at::MemoryFormat format;
  EpilogueShape shape;
  at::ScalarType acc;
};

Maps maps_of(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, "bn_relu_dropout: z must have shape (N, C, H, W), got ", z.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
              "bn_relu_dropout: z must be float32, float16, bfloat16 or float64, got ", t);
  const bool channels_last = z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous();
  return {channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous,
          EpilogueShape{z.size(0), z.size(1), z.size(2) * z.size(3), channels_last},
          t == at::kDouble ? at::kDouble : at::kFloat};
}

at::Tensor dense(const at::Tensor& t, const Maps& maps) { return t.contiguous(maps.format); }

at::Tensor new_map(const at::Tensor& z, const Maps& maps) {
  return at::empty(z.sizes(), z.options().memory_format(maps.format));
}

at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& z, const Maps& maps, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == z.size(1), "bn_relu_dropout: ", name, " must have shape (C=", z.size(1),
              ",), got ", v.sizes());
  return v.to(maps.acc).contiguous();
}

at::Tensor same_map(const at::Tensor& t, const at::Tensor& z, const Maps& maps, const char* name) {
  TORCH_CHECK(t.sizes() == z.sizes(), "bn_relu_dropout: ", name, " must have z's shape ", z.sizes(), ", got ",
              t.sizes());
  return dense(t, maps);
}

// The dropout of a call; `mask` keeps the densified keep mask alive while the kernel reads it.
struct Drop {
  at::Tensor mask;
  EpilogueDropout args;
};

Drop drop_of(const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed, double p,
             const at::Tensor& z, const Maps& maps) {
  Drop drop;
  drop.args.p = static_cast<float>(p);
  if (keep_mask.has_value()) {
    const auto t = keep_mask->scalar_type();
    TORCH_CHECK(t == at::kBool || t == at::kByte, "bn_relu_dropout: keep_mask must be bool or uint8, got ", t);
    drop.mask = same_map(*keep_mask, z, maps, "keep_mask");
    drop.args.mask = static_cast<const uint8_t*>(drop.mask.const_data_ptr());
  } else if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
                "bn_relu_dropout: seed must be an int64 tensor of one value, got ", seed->scalar_type(), " ",
                seed->sizes());
    drop.args.seeded = true;
    drop.args.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return drop;
}

// Calls f(element pointer type tag) for z's dtype: float, Float16, BFloat16 or double.
template <typename F>
void on_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf:
      return f(Float16{});
    case at::kBFloat16:
      return f(BFloat16{});
    case at::kDouble:
      return f(double{});
    default:
      return f(float{});
  }
}

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
const T* in(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* out(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& z_in) {
  const Maps maps = maps_of(z_in);
  const at::Tensor z = dense(z_in, maps);
  TORCH_CHECK(z.numel() > 0, "bn_relu_dropout_moments: z must not be empty, got shape ", z.sizes());
  at::Tensor mean = at::empty({z.size(1)}, z.options().dtype(maps.acc));
  at::Tensor var = at::empty_like(mean);
  on_dtype(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bn_moments_cpu(in<T>(z), maps.shape, out<Acc<T>>(mean), out<Acc<T>>(var), at::get_num_threads());
  });
  return {mean, var};
}

at::Tensor apply_cpu(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                     const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed,
                     double dropout_p, double out_scale) {
  const Maps maps = maps_of(z_in);
  const at::Tensor z = dense(z_in, maps);
  const at::Tensor sc = channel_vector(scale, z, maps, "scale"), sh = channel_vector(shift, z, maps, "shift");
  const Drop drop = drop_of(keep_mask, seed, dropout_p, z, maps);
  at::Tensor y = new_map(z, maps);
  if (z.numel() == 0) return y;
  on_dtype(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_apply_cpu(in<T>(z), in<A>(sc), in<A>(sh), drop.args, static_cast<A>(out_scale), out<T>(y), maps.shape,
                 at::get_num_threads());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_sums_cpu(const at::Tensor& grad, const at::Tensor& z_in,
                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                 const c10::optional<at::Tensor>& keep_mask,
                                                 const c10::optional<at::Tensor>& seed, double dropout_p,
                                                 const at::Tensor& center, double out_scale) {
  const Maps maps = maps_of(z_in);
  const at::Tensor z = dense(z_in, maps);
  const at::Tensor dy = same_map(grad.to(z.scalar_type()), z, maps, "grad");
  const at::Tensor sc = channel_vector(scale, z, maps, "scale"), sh = channel_vector(shift, z, maps, "shift");
  const at::Tensor ce = channel_vector(center, z, maps, "center");
  const Drop drop = drop_of(keep_mask, seed, dropout_p, z, maps);
  at::Tensor sum_g = at::zeros({z.size(1)}, z.options().dtype(maps.acc));
  at::Tensor sum_g_centered = at::zeros_like(sum_g);
  if (z.numel() == 0) return {sum_g, sum_g_centered};
  on_dtype(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_grad_sums_cpu(in<T>(dy), in<T>(z), in<A>(sc), in<A>(sh), drop.args, in<A>(ce), static_cast<A>(out_scale),
                     maps.shape, out<A>(sum_g), out<A>(sum_g_centered), at::get_num_threads());
  });
  return {sum_g, sum_g_centered};
}

at::Tensor grad_apply_cpu(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                          const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                          const c10::optional<at::Tensor>& seed, double dropout_p, const c10::optional<at::Tensor>& k1,
                          const c10::optional<at::Tensor>& k0, double out_scale) {
  const Maps maps = maps_of(z_in);
  const at::Tensor z = dense(z_in, maps);
  const at::Tensor dy = same_map(grad.to(z.scalar_type()), z, maps, "grad");
  const at::Tensor sc = channel_vector(scale, z, maps, "scale"), sh = channel_vector(shift, z, maps, "shift");
  TORCH_CHECK(k1.has_value() == k0.has_value(), "bn_relu_dropout: k1 and k0 must both be given or both be None");
  const at::Tensor c1 = k1.has_value() ? channel_vector(*k1, z, maps, "k1") : at::Tensor();
  const at::Tensor c0 = k0.has_value() ? channel_vector(*k0, z, maps, "k0") : at::Tensor();
  const Drop drop = drop_of(keep_mask, seed, dropout_p, z, maps);
  at::Tensor dz = new_map(z, maps);
  if (z.numel() == 0) return dz;
  on_dtype(z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_grad_apply_cpu(in<T>(dy), in<T>(z), in<A>(sc), in<A>(sh), drop.args, c1.defined() ? in<A>(c1) : nullptr,
                      c0.defined() ? in<A>(c0) : nullptr, static_cast<A>(out_scale), out<T>(dz), maps.shape,
                      at::get_num_threads());
  });
  return dz;
}

at::Tensor keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p, bool channels_last) {
  TORCH_CHECK(shape.size() == 4, "dropout_keep_mask: shape must be (N, C, H, W), got ", shape);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "dropout_keep_mask: seed must be an int64 tensor of one value, got ", seed.scalar_type(), " ",
              seed.sizes());
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool).memory_format(format));
  if (keep.numel() == 0) return keep;
  const EpilogueShape s{shape[0], shape[1], shape[2] * shape[3], channels_last};
  dropout_keep_mask_cpu(static_cast<uint64_t>(seed.item<int64_t>()), static_cast<float>(dropout_p), s,
                        static_cast<uint8_t*>(keep.mutable_data_ptr()), at::get_num_threads());
  return keep;
}

}  // namespace
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
  m.def("bn_relu_dropout_moments(Tensor z) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_dropout_apply(Tensor z, Tensor scale, Tensor shift, Tensor? keep_mask, Tensor? seed, float dropout_p, "
      "float out_scale) -> Tensor");
  m.def(
      "bn_relu_dropout_grad_sums(Tensor grad, Tensor z, Tensor scale, Tensor shift, Tensor? keep_mask, Tensor? seed, "
      "float dropout_p, Tensor center, float out_scale) -> (Tensor, Tensor)");
  m.def(
      "bn_relu_dropout_grad_apply(Tensor grad, Tensor z, Tensor scale, Tensor shift, Tensor? keep_mask, Tensor? "
      "seed, float dropout_p, Tensor? k1, Tensor? k0, float out_scale) -> Tensor");
  m.def("dropout_keep_mask(Tensor seed, int[] shape, float dropout_p, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("bn_relu_dropout_moments", &lgc::moments_cpu);
  m.impl("bn_relu_dropout_apply", &lgc::apply_cpu);
  m.impl("bn_relu_dropout_grad_sums", &lgc::grad_sums_cpu);
  m.impl("bn_relu_dropout_grad_apply", &lgc::grad_apply_cpu);
  m.impl("dropout_keep_mask", &lgc::keep_mask_cpu);
}
