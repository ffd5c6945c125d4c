// The cuDNN graphs of a conv block's fused forms (see lgc_fast/ops/conv_stack.py for how a stack of blocks uses them;
// bench/cudnn_fusion_probe.cpp checks each against float64 and times it on a GPU), and their executor with a plan
// cache (cudnn_conv_graphs.cpp). Tensors are NHWC (dims given in NCHW order), filters KRSC; the io type is bfloat16
// or float16, per-channel terms float32, the RNG's seed and offset one int64 each on the device. No torch here.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "cudnn_graph.h"

namespace lgc {
namespace cudnn_graph {

enum class Conv { fprop, wgrad, dgrad };
// The dropout keep mask: none; a tensor in the io type (0 or 1/(1-p)); uint8 0 / 1; or drawn in the graph by cuDNN's
// RNG op (Bernoulli, 0 / 1) from a device seed and offset, the same mask in every graph that draws it from them.
enum class Mask { none, io, byte, rng };

// What a graph holds besides its convolution:
//   sbr        relu(x * s + b) (times the mask) on x (fprop, wgrad): the previous block's BN-apply + ReLU + dropout
//   mask       the keep mask, on that activation (fprop, wgrad) or on dgrad's output (with dbn)
//   stats      fprop: y's per-channel sum and sum of squares (genstats) as the epilogue
//   dbn        dgrad: (mask,) ReLU backward against z * s + b, then BN backward weights: g, dgamma, dbeta and the
//              coefficients of dz = eq_dy * g + eq_x * z + eq_b
//   dbn_apply  wgrad, dgrad: dy = eq_dy * g + eq_x * z + eq_b made in the prologue from the next block's g and z
struct GraphSpec {
  Conv conv;
  bool sbr;
  Mask mask;
  bool stats, dbn, dbn_apply;
};

enum class Storage { f32, io16, u8, i64 };  // float32, the io type, uint8, int64

// A tensor of the graph the caller binds: its name, uid in the graph, element count, storage, and whether the graph
// writes it.
struct RoleInfo {
  std::string name;
  int64_t uid;
  size_t count;
  Storage storage;
  bool output;
};

// Builds the graph of `spec` for `s` on `graph`; returns its tensors. keep_probability: the RNG mask's 1 - p.
// io_params: the prologue's s and b in the io type instead of float32.
inline std::vector<RoleInfo> build_conv_graph(Graph& graph, const GraphSpec& spec, const Shape& s,
                                              double keep_probability, bool io_params = false) {
  std::vector<RoleInfo> roles;
  auto add = [&](const std::string& name, Tensor t, size_t count, Storage storage, bool output) {
    roles.push_back({name, t.uid, count, storage, output});
  };
  const size_t in_count = s.n * s.c * s.h * s.w, out_count = s.n * s.k * s.h * s.w, w_count = s.k * s.c * s.r * s.r;
  // the keep mask over an n x c x h x w tensor: a device tensor, or drawn in the graph from a device seed and offset
  auto keep_mask = [&]() {
    if (spec.mask == Mask::rng) {
      Tensor seed = graph.device_scalar(), offset = graph.device_scalar();
      add("seed", seed, 1, Storage::i64, false);
      add("offset", offset, 1, Storage::i64, false);
      Tensor m = graph.nhwc(s.n, s.c, s.h, s.w, true);
      graph.bernoulli(seed, offset, keep_probability, m);
      return m;
    }
    Tensor m = spec.mask == Mask::byte
                   ? graph.tensor({s.n, s.c, s.h, s.w}, {s.c * s.h * s.w, 1, s.w * s.c, s.c}, CUDNN_DATA_UINT8, false)
                   : graph.nhwc(s.n, s.c, s.h, s.w);
    add("m", m, in_count, spec.mask == Mask::byte ? Storage::u8 : Storage::io16, false);
    return m;
  };
  // wgrad's and dgrad's dy: a tensor, or (dbn_apply) made in the prologue from the next block's g, z and terms
  auto grad_operand = [&]() {
    if (!spec.dbn_apply) {
      Tensor dy = graph.nhwc(s.n, s.k, s.h, s.w);
      add("dy", dy, out_count, Storage::io16, false);
      return dy;
    }
    Tensor g = graph.nhwc(s.n, s.k, s.h, s.w), z = graph.nhwc(s.n, s.k, s.h, s.w);
    add("dy_g", g, out_count, Storage::io16, false);
    add("dy_z", z, out_count, Storage::io16, false);
    Tensor eq_dy = graph.per_channel(s.k), eq_x = graph.per_channel(s.k), eq_b = graph.per_channel(s.k);
    add("dy_eq_dy", eq_dy, s.k, Storage::f32, false);
    add("dy_eq_x", eq_x, s.k, Storage::f32, false);
    add("dy_eq_b", eq_b, s.k, Storage::f32, false);
    Tensor t1 = graph.nhwc(s.n, s.k, s.h, s.w, true), t2 = graph.nhwc(s.n, s.k, s.h, s.w, true);
    Tensor t3 = graph.nhwc(s.n, s.k, s.h, s.w, true), dy = graph.nhwc(s.n, s.k, s.h, s.w, true);
    graph.pointwise(CUDNN_POINTWISE_MUL, g, &eq_dy, t1);
    graph.pointwise(CUDNN_POINTWISE_MUL, z, &eq_x, t2);
    graph.pointwise(CUDNN_POINTWISE_ADD, t1, &t2, t3);
    graph.pointwise(CUDNN_POINTWISE_ADD, t3, &eq_b, dy);
    return dy;
  };
  Tensor w = graph.tensor({s.k, s.c, s.r, s.r}, {s.r * s.r * s.c, 1, s.r * s.c, s.c}, graph.io_type(), false);
  add("w", w, w_count, Storage::io16, spec.conv == Conv::wgrad);
  if (spec.conv != Conv::dgrad) {  // fprop and wgrad forms: x (through a prologue) is an input
    Tensor x = graph.nhwc(s.n, s.c, s.h, s.w);
    add("x", x, in_count, Storage::io16, false);
    Tensor a = x;
    if (spec.sbr) {
      Tensor scale = graph.per_channel(s.c, io_params), bias = graph.per_channel(s.c, io_params);
      add("s", scale, s.c, io_params ? Storage::io16 : Storage::f32, false);
      add("b", bias, s.c, io_params ? Storage::io16 : Storage::f32, false);
      Tensor t1 = graph.nhwc(s.n, s.c, s.h, s.w, true), t2 = graph.nhwc(s.n, s.c, s.h, s.w, true);
      Tensor t3 = graph.nhwc(s.n, s.c, s.h, s.w, true);
      graph.pointwise(CUDNN_POINTWISE_MUL, x, &scale, t1);
      graph.pointwise(CUDNN_POINTWISE_ADD, t1, &bias, t2);
      graph.pointwise(CUDNN_POINTWISE_RELU_FWD, t2, nullptr, t3);
      a = t3;
      if (spec.mask != Mask::none) {
        Tensor m = keep_mask(), t4 = graph.nhwc(s.n, s.c, s.h, s.w, true);
        graph.pointwise(CUDNN_POINTWISE_MUL, t3, &m, t4);
        a = t4;
      }
    }
    if (spec.conv == Conv::fprop) {
      Tensor y = graph.nhwc(s.n, s.k, s.h, s.w);
      graph.conv_fprop(s, a, w, y);
      add("y", y, out_count, Storage::io16, true);
      if (spec.stats) {
        Tensor sum = graph.per_channel(s.k), sq_sum = graph.per_channel(s.k);
        graph.genstats(y, sum, sq_sum);
        add("sum", sum, s.k, Storage::f32, true);
        add("sq_sum", sq_sum, s.k, Storage::f32, true);
      }
    } else {
      graph.conv_wgrad(s, a, grad_operand(), w);
    }
    return roles;
  }
  Tensor dy = grad_operand();
  if (!spec.dbn) {
    Tensor dx = graph.nhwc(s.n, s.c, s.h, s.w);
    graph.conv_dgrad(s, dy, w, dx);
    add("dx", dx, in_count, Storage::io16, true);
    return roles;
  }
  // dgrad -> (mask) -> ReLU backward against z * s + b -> BN backward weights
  Tensor da = graph.nhwc(s.n, s.c, s.h, s.w, true);
  graph.conv_dgrad(s, dy, w, da);
  if (spec.mask != Mask::none) {
    Tensor m = keep_mask(), masked = graph.nhwc(s.n, s.c, s.h, s.w, true);
    graph.pointwise(CUDNN_POINTWISE_MUL, da, &m, masked);
    da = masked;
  }
  Tensor z = graph.nhwc(s.n, s.c, s.h, s.w);
  add("z", z, in_count, Storage::io16, false);
  Tensor scale = graph.per_channel(s.c, io_params), bias = graph.per_channel(s.c, io_params);
  add("s", scale, s.c, io_params ? Storage::io16 : Storage::f32, false);
  add("b", bias, s.c, io_params ? Storage::io16 : Storage::f32, false);
  Tensor t1 = graph.nhwc(s.n, s.c, s.h, s.w, true), pre = graph.nhwc(s.n, s.c, s.h, s.w, true);
  graph.pointwise(CUDNN_POINTWISE_MUL, z, &scale, t1);
  graph.pointwise(CUDNN_POINTWISE_ADD, t1, &bias, pre);
  Tensor g = graph.nhwc(s.n, s.c, s.h, s.w);
  graph.relu_backward(da, pre, g);
  add("g", g, in_count, Storage::io16, true);
  const char* channel_names[] = {"mean", "invstd", "gamma", "dgamma", "dbeta", "eq_dy", "eq_x", "eq_b"};
  std::vector<Tensor> ch;
  for (int i = 0; i < 8; ++i) {
    ch.push_back(graph.per_channel(s.c));
    add(channel_names[i], ch.back(), s.c, Storage::f32, i >= 3);
  }
  graph.bn_backward_weights(g, z, ch[0], ch[1], ch[2], ch[3], ch[4], ch[5], ch[6], ch[7]);
  return roles;
}

// ---- the executor (cudnn_conv_graphs.cpp) ----

// One graph as the executor caches it (one entry per request and device). plans: how many of the heuristics' plans
// to build and time when the graph is built, the fastest then running every call; 1 takes the first that builds and
// times nothing.
struct GraphRequest {
  GraphSpec spec;
  Shape shape;
  cudnnDataType_t io;
  double keep_probability;
  int plans;
};

struct Binding {
  std::string role;
  void* pointer;
};

// A plan the executor built for a graph: cuDNN's name for it, its median time in ms where plans were timed (else
// negative), and whether it is the one that runs.
struct PlanChoice {
  std::string name;
  double median_ms;
  bool chosen;
};

// The tensors the graph binds (building the graph and its plans on first use, as conv_graph_workspace).
const std::vector<RoleInfo>& conv_graph_roles(const GraphRequest& request);

// The workspace bytes of the chosen plan on the current device, building the graph and its plans on first use.
// Throws Failure when no engine builds it.
int64_t conv_graph_workspace(const GraphRequest& request);

// The plans built for the graph (building them on first use).
std::vector<PlanChoice> conv_graph_plans(const GraphRequest& request);

// Runs the chosen plan on `stream` with every role bound to a device pointer (and `workspace` of at least
// conv_graph_workspace bytes). Throws Failure naming a role left unbound, or with cuDNN's error.
void run_conv_graph(const GraphRequest& request, const std::vector<Binding>& bindings, void* workspace,
                    cudaStream_t stream);

}  // namespace cudnn_graph
}  // namespace lgc
