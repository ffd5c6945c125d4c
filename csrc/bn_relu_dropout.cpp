// Torch glue of the conv-block epilogue's kernels (BatchNorm + ReLU + scale + dropout), one op per pass, on the CPU
// and CUDA: lgc_fast_C::bn_relu_dropout_apply, _grad_sums, _grad_apply, and the mask draws
// lgc_fast_C::dropout_keep_mask, bernoulli_keep_mask and bernoulli_keep_bits; the training op built on the same
// passes is csrc/bn_relu_dropout_train.cpp. lgc_fast/ops/bn_relu_dropout.py builds the public op and its autograd
// from them (the "cpu" and "cuda" backends), as it does from the Triton kernels. A keep mask and the gradient are
// brought to z's layout (csrc/bn_relu_dropout_glue.h), so outputs have the strides the Python op's fake
// implementations promise. A 1-D uint8 keep_mask holds keep bits, which number the values in that layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "bn_relu_dropout_glue.h"

namespace lgc {
namespace bn_glue {

Drop drop_of(const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed, double p,
             const at::Tensor& z, const Maps& maps) {
  Drop drop;
  drop.p = static_cast<float>(p);
  if (keep_mask.has_value() && keep_mask->dim() == 1) {
    // Keep bits: bit e of the (N, C, P) maps in z's layout (keep_bit), ceil(numel / 8) bytes.
    TORCH_CHECK(keep_mask->scalar_type() == at::kByte, "bn_relu_dropout: keep bits must be uint8, got ",
                keep_mask->scalar_type());
    TORCH_CHECK(keep_mask->device() == z.device(), "bn_relu_dropout: keep bits must be on z's device ", z.device(),
                ", got ", keep_mask->device());
    TORCH_CHECK(keep_mask->numel() == (z.numel() + 7) / 8, "bn_relu_dropout: keep bits must hold (N*C*H*W + 7) / 8 = ",
                (z.numel() + 7) / 8, " bytes, got ", keep_mask->numel());
    drop.bits = keep_mask->contiguous();
  } else if (keep_mask.has_value()) {
    const auto t = keep_mask->scalar_type();
    TORCH_CHECK(t == at::kBool || t == at::kByte, "bn_relu_dropout: keep_mask must be bool or uint8, got ", t);
    TORCH_CHECK(keep_mask->device() == z.device(), "bn_relu_dropout: keep_mask must be on z's device ", z.device(),
                ", got ", keep_mask->device());
    drop.mask = same_map(*keep_mask, z, maps, "keep_mask");
  } else if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
                "bn_relu_dropout: seed must be an int64 tensor of one value, got ", seed->scalar_type(), " ",
                seed->sizes());
    TORCH_CHECK(seed->device() == z.device(), "bn_relu_dropout: seed must be on z's device ", z.device(), ", got ",
                seed->device());
    TORCH_CHECK(z.numel() < (int64_t{1} << 31), "bn_relu_dropout: a seed draws for fewer than 2^31 values, z has ",
                z.numel());
    drop.seed = seed->contiguous();
  }
  return drop;
}

Inputs inputs_of(const at::Tensor& z_in, const at::Tensor* grad, const at::Tensor& scale, const at::Tensor& shift,
                 const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed, double dropout_p) {
  Inputs in;
  in.maps = maps_of(z_in);
  in.z = dense(z_in, in.maps);
  if (grad != nullptr) in.dy = same_map(grad->to(in.z.scalar_type()), in.z, in.maps, "grad");
  in.scale = channel_vector(scale, in.z, in.maps, "scale");
  in.shift = channel_vector(shift, in.z, in.maps, "shift");
  in.drop = drop_of(keep_mask, seed, dropout_p, in.z, in.maps);
  return in;
}

// The moments pass's z, which must hold at least one value.
Inputs moments_inputs(const at::Tensor& z_in) {
  Inputs in;
  in.maps = maps_of(z_in);
  in.z = dense(z_in, in.maps);
  TORCH_CHECK(in.z.numel() > 0, "bn_relu_dropout_moments: z must not be empty, got shape ", in.z.sizes());
  return in;
}

Inputs grad_sums_inputs(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                        const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                        const c10::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& center) {
  Inputs in = inputs_of(z_in, &grad, scale, shift, keep_mask, seed, dropout_p);
  in.center = channel_vector(center, in.z, in.maps, "center");
  return in;
}

Inputs grad_apply_inputs(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                         const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                         const c10::optional<at::Tensor>& seed, double dropout_p, const c10::optional<at::Tensor>& k1,
                         const c10::optional<at::Tensor>& k0) {
  TORCH_CHECK(k1.has_value() == k0.has_value(), "bn_relu_dropout: k1 and k0 must both be given or both be None");
  Inputs in = inputs_of(z_in, &grad, scale, shift, keep_mask, seed, dropout_p);
  if (k1.has_value()) {
    in.k1 = channel_vector(*k1, in.z, in.maps, "k1");
    in.k0 = channel_vector(*k0, in.z, in.maps, "k0");
  }
  return in;
}

// ---- CPU

EpilogueDropout cpu_dropout(const Drop& drop) {
  EpilogueDropout args;
  args.p = drop.p;
  args.mask = ptr<uint8_t>(drop.mask);
  args.bits = ptr<uint8_t>(drop.bits);
  if (drop.seed.defined()) {
    args.seeded = true;
    args.seed = static_cast<uint64_t>(drop.seed.item<int64_t>());
  }
  return args;
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

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& z_in) {
  const Inputs in = moments_inputs(z_in);
  auto [mean, var] = new_channel_pair(in.z, in.maps);
  on_dtype(in.z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    bn_moments_cpu(ptr<T>(in.z), in.maps.shape, out<Acc<T>>(mean), out<Acc<T>>(var), at::get_num_threads());
  });
  return {mean, var};
}

at::Tensor apply_cpu(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                     const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed,
                     double dropout_p, double out_scale) {
  const Inputs in = inputs_of(z_in, nullptr, scale, shift, keep_mask, seed, dropout_p);
  at::Tensor y = new_map(in.z, in.maps);
  if (in.z.numel() == 0) return y;
  on_dtype(in.z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_apply_cpu(ptr<T>(in.z), ptr<A>(in.scale), ptr<A>(in.shift), cpu_dropout(in.drop), static_cast<A>(out_scale),
                 out<T>(y), in.maps.shape, at::get_num_threads());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_sums_cpu(const at::Tensor& grad, const at::Tensor& z_in,
                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                 const c10::optional<at::Tensor>& keep_mask,
                                                 const c10::optional<at::Tensor>& seed, double dropout_p,
                                                 const at::Tensor& center, double out_scale) {
  const Inputs in = grad_sums_inputs(grad, z_in, scale, shift, keep_mask, seed, dropout_p, center);
  auto [sum_g, sum_g_centered] = new_channel_pair(in.z, in.maps);
  if (in.z.numel() == 0) return {sum_g.zero_(), sum_g_centered.zero_()};
  on_dtype(in.z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_grad_sums_cpu(ptr<T>(in.dy), ptr<T>(in.z), ptr<A>(in.scale), ptr<A>(in.shift), cpu_dropout(in.drop),
                     ptr<A>(in.center), static_cast<A>(out_scale), in.maps.shape, out<A>(sum_g),
                     out<A>(sum_g_centered), at::get_num_threads());
  });
  return {sum_g, sum_g_centered};
}

at::Tensor grad_apply_cpu(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                          const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                          const c10::optional<at::Tensor>& seed, double dropout_p, const c10::optional<at::Tensor>& k1,
                          const c10::optional<at::Tensor>& k0, double out_scale) {
  const Inputs in = grad_apply_inputs(grad, z_in, scale, shift, keep_mask, seed, dropout_p, k1, k0);
  at::Tensor dz = new_map(in.z, in.maps);
  if (in.z.numel() == 0) return dz;
  on_dtype(in.z.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    bn_grad_apply_cpu(ptr<T>(in.dy), ptr<T>(in.z), ptr<A>(in.scale), ptr<A>(in.shift), cpu_dropout(in.drop),
                      ptr<A>(in.k1), ptr<A>(in.k0), static_cast<A>(out_scale), out<T>(dz), in.maps.shape,
                      at::get_num_threads());
  });
  return dz;
}

// The (empty) keep mask a seed fills for `shape`, in the layout asked for, and the shape as the kernels see it. `op`
// names the op in errors; a seed draws for fewer than 2^limit_bits values.
std::tuple<at::Tensor, EpilogueShape> new_keep_mask(const at::Tensor& seed, at::IntArrayRef shape, bool channels_last,
                                                    const char* op = "dropout_keep_mask", int limit_bits = 31) {
  TORCH_CHECK(shape.size() == 4, op, ": shape must be (N, C, H, W), got ", shape);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be an int64 tensor of one value, got ", seed.scalar_type(), " ", seed.sizes());
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool).memory_format(format));
  TORCH_CHECK(keep.numel() < (int64_t{1} << limit_bits), op, ": a seed draws for fewer than 2^", limit_bits,
              " values, got ", keep.numel());
  return {keep, EpilogueShape{shape[0], shape[1], shape[2] * shape[3], channels_last}};
}

// The (empty) byte mask of bernoulli_keep_mask: its four flags per Philox counter number up to 2^34 values.
at::Tensor new_bernoulli_mask(const at::Tensor& seed, at::IntArrayRef shape, bool channels_last) {
  return std::get<0>(new_keep_mask(seed, shape, channels_last, "bernoulli_keep_mask", 34));
}

// The (empty) keep bits of bernoulli_keep_bits for `count` values: (count + 7) / 8 bytes, up to 2^34 values.
at::Tensor new_bernoulli_bits(const at::Tensor& seed, int64_t count) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "bernoulli_keep_bits: seed must be an int64 tensor of one value, got ", seed.scalar_type(), " ",
              seed.sizes());
  TORCH_CHECK(count >= 0 && count < (int64_t{1} << 34), "bernoulli_keep_bits: count must be in [0, 2^34), got ",
              count);
  return at::empty({(count + 7) / 8}, seed.options().dtype(at::kByte));
}

at::Tensor keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p, bool channels_last) {
  auto [keep, s] = new_keep_mask(seed, shape, channels_last);
  if (keep.numel() == 0) return keep;
  dropout_keep_mask_cpu(static_cast<uint64_t>(seed.item<int64_t>()), static_cast<float>(dropout_p), s,
                        out<uint8_t>(keep), at::get_num_threads());
  return keep;
}

// A byte mask of i.i.d. flags (bernoulli_keep_cpu), filled in memory order, so its layout does not matter.
at::Tensor bernoulli_keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p,
                                   bool channels_last) {
  at::Tensor keep = new_bernoulli_mask(seed, shape, channels_last);
  if (keep.numel() == 0) return keep;
  bernoulli_keep_cpu(static_cast<uint64_t>(seed.item<int64_t>()), static_cast<float>(dropout_p), keep.numel(),
                     out<uint8_t>(keep), at::get_num_threads());
  return keep;
}

at::Tensor bernoulli_keep_bits_cpu_op(const at::Tensor& seed, int64_t count, double dropout_p) {
  at::Tensor bits = new_bernoulli_bits(seed, count);
  if (count == 0) return bits;
  bernoulli_keep_bits_cpu(static_cast<uint64_t>(seed.item<int64_t>()), static_cast<float>(dropout_p), count,
                          out<uint8_t>(bits), at::get_num_threads());
  return bits;
}

// The apply pass with fresh keep bits from the seed: bernoulli_keep_bits' draw, then the pass with them (on the CPU
// the draw is the work, not the traffic, so the two stay apart) -> (y, bits).
std::tuple<at::Tensor, at::Tensor> apply_drawn_cpu(const at::Tensor& z_in, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& seed, double dropout_p,
                                                   double out_scale) {
  TORCH_CHECK(seed.device() == z_in.device(), "bn_relu_dropout: seed must be on z's device ", z_in.device(), ", got ",
              seed.device());
  at::Tensor bits = bernoulli_keep_bits_cpu_op(seed, z_in.numel(), dropout_p);
  return {apply_cpu(z_in, scale, shift, bits, c10::nullopt, dropout_p, out_scale), bits};
}

// Meta: the masks' shape, dtype and layout without a draw. torch.compile runs these on fake tensors to trace the
// mask draws of ConvBlock's fused epilogue into its graph.
at::Tensor keep_mask_meta(const at::Tensor& seed, at::IntArrayRef shape, double, bool channels_last) {
  return std::get<0>(new_keep_mask(seed, shape, channels_last));
}

at::Tensor bernoulli_keep_mask_meta(const at::Tensor& seed, at::IntArrayRef shape, double, bool channels_last) {
  return new_bernoulli_mask(seed, shape, channels_last);
}

at::Tensor bernoulli_keep_bits_meta(const at::Tensor& seed, int64_t count, double) {
  return new_bernoulli_bits(seed, count);
}

// ---- CUDA: the seed stays on the device (the kernels read it), so no pass synchronises with the host.

#ifdef LGC_WITH_CUDA
EpilogueDropoutCuda cuda_dropout(const Drop& drop) {
  return EpilogueDropoutCuda{ptr<uint8_t>(drop.mask), ptr<uint8_t>(drop.bits), ptr<int64_t>(drop.seed), drop.p};
}

at::Tensor new_partials(const at::Tensor& z, const Maps& maps) {
  return at::empty({bn_epilogue_partials(maps.shape)}, z.options().dtype(at::kDouble));
}

at::Tensor apply_cuda(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed,
                      double dropout_p, double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = inputs_of(z_in, nullptr, scale, shift, keep_mask, seed, dropout_p);
  at::Tensor y = new_map(in.z, in.maps);
  check_launch(bn_apply_cuda(in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()), in.scale.const_data_ptr(),
                             in.shift.const_data_ptr(), cuda_dropout(in.drop), out_scale, y.mutable_data_ptr(),
                             in.maps.shape, c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_apply");
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_sums_cuda(const at::Tensor& grad, const at::Tensor& z_in,
                                                  const at::Tensor& scale, const at::Tensor& shift,
                                                  const c10::optional<at::Tensor>& keep_mask,
                                                  const c10::optional<at::Tensor>& seed, double dropout_p,
                                                  const at::Tensor& center, double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = grad_sums_inputs(grad, z_in, scale, shift, keep_mask, seed, dropout_p, center);
  auto [sum_g, sum_g_centered] = new_channel_pair(in.z, in.maps);
  if (in.z.numel() == 0) return {sum_g.zero_(), sum_g_centered.zero_()};
  at::Tensor partials = new_partials(in.z, in.maps);
  check_launch(bn_grad_sums_cuda(in.dy.const_data_ptr(), in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()),
                                 in.scale.const_data_ptr(), in.shift.const_data_ptr(), cuda_dropout(in.drop),
                                 in.center.const_data_ptr(), out_scale, in.maps.shape, out<double>(partials),
                                 sum_g.mutable_data_ptr(), sum_g_centered.mutable_data_ptr(),
                                 c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_grad_sums");
  return {sum_g, sum_g_centered};
}

at::Tensor grad_apply_cuda(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                           const c10::optional<at::Tensor>& seed, double dropout_p,
                           const c10::optional<at::Tensor>& k1, const c10::optional<at::Tensor>& k0,
                           double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = grad_apply_inputs(grad, z_in, scale, shift, keep_mask, seed, dropout_p, k1, k0);
  at::Tensor dz = new_map(in.z, in.maps);
  check_launch(bn_grad_apply_cuda(in.dy.const_data_ptr(), in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()),
                                  in.scale.const_data_ptr(), in.shift.const_data_ptr(), cuda_dropout(in.drop),
                                  ptr<void>(in.k1), ptr<void>(in.k0), out_scale, dz.mutable_data_ptr(), in.maps.shape,
                                  c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_grad_apply");
  return dz;
}

// The apply pass drawing its keep bits (bn_apply_drawn_cuda: in the kernel for float16/bfloat16 maps of vec 8)
// -> (y, bits).
std::tuple<at::Tensor, at::Tensor> apply_drawn_cuda(const at::Tensor& z_in, const at::Tensor& scale,
                                                    const at::Tensor& shift, const at::Tensor& seed, double dropout_p,
                                                    double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = inputs_of(z_in, nullptr, scale, shift, c10::nullopt, c10::nullopt, dropout_p);
  at::Tensor bits = new_bernoulli_bits(seed, in.z.numel());
  TORCH_CHECK(seed.device() == in.z.device(), "bn_relu_dropout: seed must be on z's device ", in.z.device(),
              ", got ", seed.device());
  at::Tensor y = new_map(in.z, in.maps);
  check_launch(bn_apply_drawn_cuda(in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()), in.scale.const_data_ptr(),
                                   in.shift.const_data_ptr(), ptr<int64_t>(seed), static_cast<float>(dropout_p),
                                   out_scale, y.mutable_data_ptr(), out<uint8_t>(bits), in.maps.shape,
                                   c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_apply_drawn");
  return {y, bits};
}

at::Tensor keep_mask_cuda(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p, bool channels_last) {
  const c10::cuda::CUDAGuard guard(seed.device());
  auto [keep, s] = new_keep_mask(seed, shape, channels_last);
  check_launch(dropout_keep_mask_cuda(ptr<int64_t>(seed), static_cast<float>(dropout_p), s, out<uint8_t>(keep),
                                      c10::cuda::getCurrentCUDAStream()),
               "dropout_keep_mask");
  return keep;
}

at::Tensor bernoulli_keep_mask_cuda_op(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p,
                                       bool channels_last) {
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor keep = new_bernoulli_mask(seed, shape, channels_last);
  check_launch(bernoulli_keep_mask_cuda(ptr<int64_t>(seed), static_cast<float>(dropout_p), keep.numel(),
                                        out<uint8_t>(keep), c10::cuda::getCurrentCUDAStream()),
               "bernoulli_keep_mask");
  return keep;
}

at::Tensor bernoulli_keep_bits_cuda_op(const at::Tensor& seed, int64_t count, double dropout_p) {
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor bits = new_bernoulli_bits(seed, count);
  check_launch(bernoulli_keep_bits_cuda(ptr<int64_t>(seed), static_cast<float>(dropout_p), count, out<uint8_t>(bits),
                                        c10::cuda::getCurrentCUDAStream()),
               "bernoulli_keep_bits");
  return bits;
}
#endif

}  // namespace bn_glue
}  // namespace lgc

TORCH_LIBRARY_FRAGMENT(lgc_fast_C, m) {
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
  m.def("bernoulli_keep_mask(Tensor seed, int[] shape, float dropout_p, bool channels_last) -> Tensor");
  m.def("bernoulli_keep_bits(Tensor seed, int count, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgc_fast_C, CPU, m) {
  m.impl("bn_relu_dropout_apply", &lgc::bn_glue::apply_cpu);
  m.impl("bn_relu_dropout_grad_sums", &lgc::bn_glue::grad_sums_cpu);
  m.impl("bn_relu_dropout_grad_apply", &lgc::bn_glue::grad_apply_cpu);
  m.impl("dropout_keep_mask", &lgc::bn_glue::keep_mask_cpu);
  m.impl("bernoulli_keep_mask", &lgc::bn_glue::bernoulli_keep_mask_cpu);
  m.impl("bernoulli_keep_bits", &lgc::bn_glue::bernoulli_keep_bits_cpu_op);
}

TORCH_LIBRARY_IMPL(lgc_fast_C, Meta, m) {
  m.impl("dropout_keep_mask", &lgc::bn_glue::keep_mask_meta);
  m.impl("bernoulli_keep_mask", &lgc::bn_glue::bernoulli_keep_mask_meta);
  m.impl("bernoulli_keep_bits", &lgc::bn_glue::bernoulli_keep_bits_meta);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("bn_relu_dropout_apply", &lgc::bn_glue::apply_cuda);
  m.impl("bn_relu_dropout_grad_sums", &lgc::bn_glue::grad_sums_cuda);
  m.impl("bn_relu_dropout_grad_apply", &lgc::bn_glue::grad_apply_cuda);
  m.impl("dropout_keep_mask", &lgc::bn_glue::keep_mask_cuda);
  m.impl("bernoulli_keep_mask", &lgc::bn_glue::bernoulli_keep_mask_cuda_op);
  m.impl("bernoulli_keep_bits", &lgc::bn_glue::bernoulli_keep_bits_cuda_op);
}
#endif
