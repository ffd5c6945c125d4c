// What the two files of the conv-block epilogue's torch glue share (glue only: this header includes torch's):
// csrc/bn_relu_dropout.cpp defines the per-pass ops and the mask draws, csrc/bn_relu_dropout_train.cpp the training op
// on top of the same passes. Maps run in z's layout: channels_last when z is channels_last (and not also contiguous),
// else contiguous (a strided z is copied); per-channel vectors are float32 (float64 for float64 maps).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cpu/bn_relu_dropout.h"

#ifdef LGC_WITH_CUDA
#include "cuda/bn_relu_dropout.h"
#include "cuda_glue.h"
#endif

namespace lgc {
namespace bn_glue {

struct Maps {
  at::MemoryFormat format;
  EpilogueShape shape;
  at::ScalarType acc;
};

inline Maps maps_of(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, "bn_relu_dropout: z must have shape (N, C, H, W), got ", z.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble,
              "bn_relu_dropout: z must be float32, float16, bfloat16 or float64, got ", t);
  const bool channels_last = z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous();
  return {channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous,
          EpilogueShape{z.size(0), z.size(1), z.size(2) * z.size(3), channels_last},
          t == at::kDouble ? at::kDouble : at::kFloat};
}

inline at::Tensor dense(const at::Tensor& t, const Maps& maps) { return t.contiguous(maps.format); }

inline at::Tensor new_map(const at::Tensor& z, const Maps& maps) {
  return at::empty(z.sizes(), z.options().memory_format(maps.format));
}

inline at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& z, const Maps& maps, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == z.size(1), "bn_relu_dropout: ", name, " must have shape (C=", z.size(1),
              ",), got ", v.sizes());
  return v.to(maps.acc).contiguous();
}

inline at::Tensor same_map(const at::Tensor& t, const at::Tensor& z, const Maps& maps, const char* name) {
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

// A call's maps in z's layout, its per-channel vectors in the accumulation type and its dropout; tensors a pass does
// not take stay undefined.
struct Inputs {
  Maps maps;
  at::Tensor z, dy, scale, shift, center, k1, k0;
  Drop drop;
};

template <typename T>
inline const T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
inline T* out(at::Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

inline std::tuple<at::Tensor, at::Tensor> new_channel_pair(const at::Tensor& z, const Maps& maps) {
  at::Tensor a = at::empty({z.size(1)}, z.options().dtype(maps.acc));
  return {a, at::empty_like(a)};
}

Inputs moments_inputs(const at::Tensor& z_in);
Inputs grad_sums_inputs(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                        const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                        const c10::optional<at::Tensor>& seed, double dropout_p, const at::Tensor& center);

// The passes (each the implementation of its lgc_fast_C op).
std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& z_in);
at::Tensor apply_cpu(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                     const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed,
                     double dropout_p, double out_scale);
std::tuple<at::Tensor, at::Tensor> grad_sums_cpu(const at::Tensor& grad, const at::Tensor& z_in,
                                                 const at::Tensor& scale, const at::Tensor& shift,
                                                 const c10::optional<at::Tensor>& keep_mask,
                                                 const c10::optional<at::Tensor>& seed, double dropout_p,
                                                 const at::Tensor& center, double out_scale);
at::Tensor grad_apply_cpu(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                          const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                          const c10::optional<at::Tensor>& seed, double dropout_p, const c10::optional<at::Tensor>& k1,
                          const c10::optional<at::Tensor>& k0, double out_scale);
// The apply pass with fresh keep bits from the seed -> (y, bits).
std::tuple<at::Tensor, at::Tensor> apply_drawn_cpu(const at::Tensor& z_in, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& seed, double dropout_p,
                                                   double out_scale);

#ifdef LGC_WITH_CUDA
EpilogueDropoutCuda cuda_dropout(const Drop& drop);
// Scratch of the reductions' per-tile partials.
at::Tensor new_partials(const at::Tensor& z, const Maps& maps);
at::Tensor apply_cuda(const at::Tensor& z_in, const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& keep_mask, const c10::optional<at::Tensor>& seed,
                      double dropout_p, double out_scale);
at::Tensor grad_apply_cuda(const at::Tensor& grad, const at::Tensor& z_in, const at::Tensor& scale,
                           const at::Tensor& shift, const c10::optional<at::Tensor>& keep_mask,
                           const c10::optional<at::Tensor>& seed, double dropout_p,
                           const c10::optional<at::Tensor>& k1, const c10::optional<at::Tensor>& k0,
                           double out_scale);
std::tuple<at::Tensor, at::Tensor> apply_drawn_cuda(const at::Tensor& z_in, const at::Tensor& scale,
                                                    const at::Tensor& shift, const at::Tensor& seed, double dropout_p,
                                                    double out_scale);
#endif

}  // namespace bn_glue
}  // namespace lgc
