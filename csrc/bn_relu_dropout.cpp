// Torch glue of the conv-block epilogue's kernels (BatchNorm + ReLU + scale + dropout), one op per pass, on the CPU
// and CUDA: lgc_fast_C::bn_relu_dropout_apply, _grad_sums, _grad_apply, the training op bn_relu_dropout_train
// (moments + apply, with its backward; its autograd in C++ is csrc/bn_relu_dropout_autograd.cpp), and the mask draws
// lgc_fast_C::dropout_keep_mask, bernoulli_keep_mask and bernoulli_keep_bits.
// lgc_fast/ops/bn_relu_dropout.py builds the public op and its autograd from them (the "cpu" and "cuda" backends),
// as it does from the Triton kernels. Maps run in z's layout: channels_last when z is channels_last (and not also
// contiguous), else contiguous (a strided z is copied); a keep mask and the gradient are brought to that layout, so
// outputs have the strides the Python op's fake implementations promise. A 1-D uint8 keep_mask holds keep bits, which
// number the values in that layout. Per-channel vectors are float32 (float64 for float64 maps).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/bn_relu_dropout.h"

#ifdef LGC_WITH_CUDA
#include "cuda/bn_relu_dropout.h"
#include "cuda_glue.h"
#endif

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

// The dropout of a call: the densified keep mask, or its keep bits, or the seed (an int64 tensor of one value), or
// neither.
struct Drop {
  at::Tensor mask;
  at::Tensor bits;
  at::Tensor seed;
  float p = 0.0f;
};

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

// A call's maps in z's layout, its per-channel vectors in the accumulation type and its dropout; tensors a pass does
// not take stay undefined.
struct Inputs {
  Maps maps;
  at::Tensor z, dy, scale, shift, center, k1, k0;
  Drop drop;
};

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

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T* out(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

std::tuple<at::Tensor, at::Tensor> new_channel_pair(const at::Tensor& z, const Maps& maps) {
  at::Tensor a = at::empty({z.size(1)}, z.options().dtype(maps.acc));
  return {a, at::empty_like(a)};
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
                                 sum_g.mutable_data_ptr(), sum_g_centered.mutable_data_ptr(), nullptr,
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

// ---- The training op, lgc_fast_C::bn_relu_dropout_train: the whole epilogue with batch statistics, forward and
// backward, each one call into C++ (autograd in C++ too), so a conv block pays one dispatch each way instead of a
// Python custom op's autograd and some twenty small torch calls; the same formulas as the Python op's Triton path,
// the per-channel ones (csrc/epilogue.h) in double, in a loop on the CPU and inside the reductions' channel kernels
// on CUDA (forward: moments, apply; backward: affine, gradient sums, apply). The forward also updates nn.BatchNorm2d's
// running statistics in place when given, which saves the caller's torch calls for it (launches, on CUDA).
// Its autograd is in csrc/bn_relu_dropout_autograd.cpp.

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
      const BnAffine t = bn_train_affine(ptr<scalar_t>(mean)[c], ptr<scalar_t>(var)[c], ptr<scalar_t>(w)[c],
                                         ptr<scalar_t>(b)[c], eps);
      out<scalar_t>(invstd)[c] = static_cast<scalar_t>(t.invstd);
      out<scalar_t>(scale)[c] = static_cast<scalar_t>(t.scale);
      out<scalar_t>(shift)[c] = static_cast<scalar_t>(t.shift);
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

// The backward's sums of the gradient g and its terms -> (k1, k0, dweight, dbias) (bn_train_grad_terms).
Quad grad_terms_cpu(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                    const OptTensor& keep_mask, const OptTensor& seed, double dropout_p, const at::Tensor& mean,
                    const at::Tensor& invstd, double out_scale) {
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
  return {k1, k0, dweight, dbias};
}

#ifdef LGC_WITH_CUDA
// The backward's (invstd, scale, shift); the forward's come out of its moments pass (train_stats_cuda).
Triple affine_cuda(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& var,
                   double eps) {
  const c10::cuda::CUDAGuard guard(mean.device());
  check_affine_vectors(weight, bias, mean);
  const at::Tensor w = weight.to(mean.scalar_type()).contiguous(), b = bias.to(mean.scalar_type()).contiguous();
  at::Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  check_launch(bn_train_affine_cuda(mean.scalar_type() == at::kDouble, mean.size(0), mean.const_data_ptr(),
                                    var.const_data_ptr(), w.const_data_ptr(), b.const_data_ptr(), eps,
                                    invstd.mutable_data_ptr(), scale.mutable_data_ptr(), shift.mutable_data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_train");
  return {invstd, scale, shift};
}

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

// grad_terms_cpu in two launches: the gradient sums' tiles, then one block a channel that also writes the terms.
Quad grad_terms_cuda(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                     const OptTensor& keep_mask, const OptTensor& seed, double dropout_p, const at::Tensor& mean,
                     const at::Tensor& invstd, double out_scale) {
  const c10::cuda::CUDAGuard guard(z_in.device());
  const Inputs in = grad_sums_inputs(grad, z_in, scale, shift, keep_mask, seed, dropout_p, mean);
  auto [sum_g, sum_g_centered] = new_channel_pair(in.z, in.maps);
  at::Tensor k1 = at::empty_like(sum_g), k0 = at::empty_like(sum_g);
  at::Tensor dweight = at::empty_like(sum_g), dbias = at::empty_like(sum_g);
  at::Tensor partials = new_partials(in.z, in.maps);
  const BnGradTermsCuda terms{in.center.const_data_ptr(), invstd.const_data_ptr(),  in.scale.const_data_ptr(),
                              static_cast<double>(in.z.numel() / in.z.size(1)), k1.mutable_data_ptr(),
                              k0.mutable_data_ptr(), dweight.mutable_data_ptr(), dbias.mutable_data_ptr()};
  check_launch(bn_grad_sums_cuda(in.dy.const_data_ptr(), in.z.const_data_ptr(), scalar_kind(in.z.scalar_type()),
                                 in.scale.const_data_ptr(), in.shift.const_data_ptr(), cuda_dropout(in.drop),
                                 in.center.const_data_ptr(), out_scale, in.maps.shape, out<double>(partials),
                                 sum_g.mutable_data_ptr(), sum_g_centered.mutable_data_ptr(), &terms,
                                 c10::cuda::getCurrentCUDAStream()),
               "bn_relu_dropout_train_backward");
  return {k1, k0, dweight, dbias};
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
template <auto Affine, auto GradTerms, auto GradApply>
Triple train_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& mean, const at::Tensor& var, const OptTensor& keep_mask, const OptTensor& seed,
                      double dropout_p, double eps, double out_scale) {
  auto [invstd, scale, shift] = Affine(weight, bias, mean, var, eps);
  auto [k1, k0, dweight, dbias] = GradTerms(grad, z, scale, shift, keep_mask, seed, dropout_p, mean, invstd, out_scale);
  at::Tensor dz = GradApply(grad, z, scale, shift, keep_mask, seed, dropout_p, k1, k0, out_scale);
  return {dz, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type())};
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
  m.impl("bn_relu_dropout_train", &lgc::train_forward<lgc::train_stats_cpu, lgc::apply_cpu>);
  m.impl("bn_relu_dropout_train_drawn",
         &lgc::train_forward_drawn<lgc::train_stats_cpu, lgc::apply_drawn_cpu>);
  m.impl("bn_relu_dropout_train_backward",
         &lgc::train_backward<lgc::affine_cpu, lgc::grad_terms_cpu, lgc::grad_apply_cpu>);
  m.impl("bn_relu_dropout_apply", &lgc::apply_cpu);
  m.impl("bn_relu_dropout_grad_sums", &lgc::grad_sums_cpu);
  m.impl("bn_relu_dropout_grad_apply", &lgc::grad_apply_cpu);
  m.impl("dropout_keep_mask", &lgc::keep_mask_cpu);
  m.impl("bernoulli_keep_mask", &lgc::bernoulli_keep_mask_cpu);
  m.impl("bernoulli_keep_bits", &lgc::bernoulli_keep_bits_cpu_op);
}

TORCH_LIBRARY_IMPL(lgc_fast_C, Meta, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_meta);
  m.impl("bn_relu_dropout_train_drawn", &lgc::train_drawn_meta);
  m.impl("bn_relu_dropout_train_backward", &lgc::train_backward_meta);
  m.impl("dropout_keep_mask", &lgc::keep_mask_meta);
  m.impl("bernoulli_keep_mask", &lgc::bernoulli_keep_mask_meta);
  m.impl("bernoulli_keep_bits", &lgc::bernoulli_keep_bits_meta);
}

#ifdef LGC_WITH_CUDA
TORCH_LIBRARY_IMPL(lgc_fast_C, CUDA, m) {
  m.impl("bn_relu_dropout_train", &lgc::train_forward<lgc::train_stats_cuda, lgc::apply_cuda>);
  m.impl("bn_relu_dropout_train_drawn",
         &lgc::train_forward_drawn<lgc::train_stats_cuda, lgc::apply_drawn_cuda>);
  m.impl("bn_relu_dropout_train_backward",
         &lgc::train_backward<lgc::affine_cuda, lgc::grad_terms_cuda, lgc::grad_apply_cuda>);
  m.impl("bn_relu_dropout_apply", &lgc::apply_cuda);
  m.impl("bn_relu_dropout_grad_sums", &lgc::grad_sums_cuda);
  m.impl("bn_relu_dropout_grad_apply", &lgc::grad_apply_cuda);
  m.impl("dropout_keep_mask", &lgc::keep_mask_cuda);
  m.impl("bernoulli_keep_mask", &lgc::bernoulli_keep_mask_cuda_op);
  m.impl("bernoulli_keep_bits", &lgc::bernoulli_keep_bits_cuda_op);
}
#endif
