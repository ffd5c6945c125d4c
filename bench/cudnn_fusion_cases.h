// The cases of bench/cudnn_fusion_probe.cpp: which cuDNN graph each one is, and the tensors (roles) it binds. A case
// builds its graph with build_case; the probe fills, runs and checks it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cudnn_fusion_graph.h"

namespace cudnn_probe {

constexpr float kDropout = 0.1f;
constexpr int64_t kSeed = 20261124, kOffset = 0;  // an RNG case's Philox seed and offset (the same in every graph)

enum class Kind { fprop, fprop_stats, fprop_sbr_stats, fprop_sbr_mask_stats, fprop_sbr_mask8_stats, fprop_sbr_rng_stats,
                  wgrad, wgrad_sbr, wgrad_sbr_mask, wgrad_sbr_rng, wgrad_dbnapply, wgrad_sbr_rng_dbnapply, dgrad,
                  dgrad_dbnapply, dgrad_drelu_dbn, dgrad_mask_drelu_dbn, dgrad_rng_drelu_dbn,
                  dgrad_dbnapply_rng_drelu_dbn };

enum class Conv { fprop, wgrad, dgrad };
// The dropout keep mask: none; a tensor in the io type (0 or 1/(1-p)); uint8 0 / 1; or drawn in the graph by cuDNN's
// RNG op, 0 / 1. For the 0 / 1 forms the 1 / (1 - p) folds into s and b (relu is positively homogeneous), or into the
// dgrad's copy of the filter.
enum class Mask { none, io, byte, rng };

// What a case's graph holds besides its convolution:
//   sbr        relu(x * s + b) on x (fprop, wgrad): the previous block's BN-apply + ReLU as the prologue
//   mask       the keep mask, on that activation (fprop, wgrad) or on dgrad's output (dbn cases)
//   stats      fprop: per-channel sum and sum of squares of y (genstats) as the epilogue
//   dbn        dgrad: ReLU backward against the recomputed pre-activation z * s + b, then BN backward weights
//   dbn_apply  wgrad, dgrad: dy = eq_dy * g + eq_x * z + eq_b computed in the prologue from the next block's gated
//              gradient g and pre-BN activation z (its BN backward's apply, without a pass of its own)
struct CaseInfo {
    Kind kind;
    const char* name;
    Conv conv;
    bool sbr;
    Mask mask;
    bool stats, dbn, dbn_apply;
};

inline const CaseInfo kCases[] = {
    {Kind::fprop, "fprop", Conv::fprop, false, Mask::none, false, false, false},
    {Kind::fprop_stats, "fprop_stats", Conv::fprop, false, Mask::none, true, false, false},
    {Kind::fprop_sbr_stats, "fprop_sbr_stats", Conv::fprop, true, Mask::none, true, false, false},
    {Kind::fprop_sbr_mask_stats, "fprop_sbr_mask_stats", Conv::fprop, true, Mask::io, true, false, false},
    {Kind::fprop_sbr_mask8_stats, "fprop_sbr_mask8_stats", Conv::fprop, true, Mask::byte, true, false, false},
    {Kind::fprop_sbr_rng_stats, "fprop_sbr_rng_stats", Conv::fprop, true, Mask::rng, true, false, false},
    {Kind::wgrad, "wgrad", Conv::wgrad, false, Mask::none, false, false, false},
    {Kind::wgrad_sbr, "wgrad_sbr", Conv::wgrad, true, Mask::none, false, false, false},
    {Kind::wgrad_sbr_mask, "wgrad_sbr_mask", Conv::wgrad, true, Mask::io, false, false, false},
    {Kind::wgrad_sbr_rng, "wgrad_sbr_rng", Conv::wgrad, true, Mask::rng, false, false, false},
    {Kind::wgrad_dbnapply, "wgrad_dbnapply", Conv::wgrad, false, Mask::none, false, false, true},
    {Kind::wgrad_sbr_rng_dbnapply, "wgrad_sbr_rng_dbnapply", Conv::wgrad, true, Mask::rng, false, false, true},
    {Kind::dgrad, "dgrad", Conv::dgrad, false, Mask::none, false, false, false},
    {Kind::dgrad_dbnapply, "dgrad_dbnapply", Conv::dgrad, false, Mask::none, false, false, true},
    {Kind::dgrad_drelu_dbn, "dgrad_drelu_dbn", Conv::dgrad, false, Mask::none, false, true, false},
    {Kind::dgrad_mask_drelu_dbn, "dgrad_mask_drelu_dbn", Conv::dgrad, false, Mask::io, false, true, false},
    {Kind::dgrad_rng_drelu_dbn, "dgrad_rng_drelu_dbn", Conv::dgrad, false, Mask::rng, false, true, false},
    {Kind::dgrad_dbnapply_rng_drelu_dbn, "dgrad_dbnapply_rng_drelu_dbn", Conv::dgrad, false, Mask::rng, false, true,
     true},
};

inline const CaseInfo& traits(Kind k) {
    for (const auto& c : kCases)
        if (c.kind == k) return c;
    throw Failure("unknown case");
}
inline bool uses_rng(Kind k) { return traits(k).mask == Mask::rng; }
inline bool has_prologue(Kind k) { return traits(k).sbr; }
inline bool has_mask(Kind k) { return traits(k).mask != Mask::none; }
inline bool byte_mask(Kind k) { return traits(k).mask == Mask::byte; }
inline bool is_dbn(Kind k) { return traits(k).dbn; }
inline bool has_stats(Kind k) { return traits(k).stats; }
inline bool dbn_apply(Kind k) { return traits(k).dbn_apply; }
inline bool is_fprop(Kind k) { return traits(k).conv == Conv::fprop; }
inline bool is_wgrad(Kind k) { return traits(k).conv == Conv::wgrad; }
inline bool is_dgrad(Kind k) { return traits(k).conv == Conv::dgrad; }
inline bool is_plain(Kind k) {
    const CaseInfo& c = traits(k);
    return !c.sbr && c.mask == Mask::none && !c.stats && !c.dbn && !c.dbn_apply;
}

// One named tensor of a case: its graph uid, host values and device copy; `output` ones are checked. uid 0: host
// values only, in no graph (an RNG case's keep mask, for its reference).
struct Role {
    std::string name;
    int64_t uid;
    Buffer buffer;
    bool output;
};

struct Instance {
    Shape shape;
    std::vector<Role> roles;
    Role& operator[](const std::string& name) {
        for (auto& r : roles)
            if (r.name == name) return r;
        throw Failure("no tensor " + name);
    }
};

// Builds the case's graph on `graph` and returns its tensors (host values not yet filled). io_params: the prologue's
// scale and bias (s, b) in the io type instead of float32.
inline Instance build_case(Graph& graph, Kind kind, const Shape& s, bool io_params = false) {
    Instance inst{s, {}};
    auto add = [&](const std::string& name, Tensor t, size_t count, Storage storage, bool output) {
        Buffer b;
        b.count = count;
        b.storage = storage;
        inst.roles.push_back({name, t.uid, std::move(b), output});
    };
    const size_t in_count = s.n * s.c * s.h * s.w, out_count = s.n * s.k * s.h * s.w, w_count = s.k * s.c * s.r * s.r;
    // the keep mask over an n x c x h x w tensor: a device tensor, or drawn in the graph from a device seed and offset
    auto keep_mask = [&]() {
        if (uses_rng(kind)) {
            Tensor seed = graph.device_scalar(), offset = graph.device_scalar();
            add("seed", seed, 1, Storage::i64, false);
            add("offset", offset, 1, Storage::i64, false);
            add("keep", Tensor{nullptr, 0}, in_count, Storage::u8, false);
            Tensor m = graph.nhwc(s.n, s.c, s.h, s.w, true);
            graph.bernoulli(seed, offset, 1.0 - kDropout, m);
            return m;
        }
        Tensor m = byte_mask(kind) ? graph.tensor({s.n, s.c, s.h, s.w}, {s.c * s.h * s.w, 1, s.w * s.c, s.c},
                                                  CUDNN_DATA_UINT8, false)
                                   : graph.nhwc(s.n, s.c, s.h, s.w);
        add("m", m, in_count, byte_mask(kind) ? Storage::u8 : Storage::io16, false);
        return m;
    };
    // wgrad's and dgrad's dy: a tensor, or (dbn_apply) made in the prologue from the next block's g, z and terms
    auto grad_operand = [&]() {
        if (!dbn_apply(kind)) {
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
    add("w", w, w_count, Storage::io16, is_wgrad(kind));
    if (!is_dgrad(kind)) {  // fprop and wgrad forms: x (through a prologue) is an input
        Tensor x = graph.nhwc(s.n, s.c, s.h, s.w);
        add("x", x, in_count, Storage::io16, false);
        Tensor a = x;
        if (has_prologue(kind)) {
            Tensor scale = graph.per_channel(s.c, io_params), bias = graph.per_channel(s.c, io_params);
            add("s", scale, s.c, io_params ? Storage::io16 : Storage::f32, false);
            add("b", bias, s.c, io_params ? Storage::io16 : Storage::f32, false);
            Tensor t1 = graph.nhwc(s.n, s.c, s.h, s.w, true), t2 = graph.nhwc(s.n, s.c, s.h, s.w, true);
            Tensor t3 = graph.nhwc(s.n, s.c, s.h, s.w, true);
            graph.pointwise(CUDNN_POINTWISE_MUL, x, &scale, t1);
            graph.pointwise(CUDNN_POINTWISE_ADD, t1, &bias, t2);
            graph.pointwise(CUDNN_POINTWISE_RELU_FWD, t2, nullptr, t3);
            a = t3;
            if (has_mask(kind)) {
                Tensor m = keep_mask(), t4 = graph.nhwc(s.n, s.c, s.h, s.w, true);
                graph.pointwise(CUDNN_POINTWISE_MUL, t3, &m, t4);
                a = t4;
            }
        }
        if (is_fprop(kind)) {
            Tensor y = graph.nhwc(s.n, s.k, s.h, s.w);
            graph.conv_fprop(s, a, w, y);
            add("y", y, out_count, Storage::io16, true);
            if (has_stats(kind)) {
                Tensor sum = graph.per_channel(s.k), sq_sum = graph.per_channel(s.k);
                graph.genstats(y, sum, sq_sum);
                add("sum", sum, s.k, Storage::f32, true);
                add("sq_sum", sq_sum, s.k, Storage::f32, true);
            }
        } else {
            graph.conv_wgrad(s, a, grad_operand(), w);
        }
        return inst;
    }
    Tensor dy = grad_operand();
    if (!is_dbn(kind)) {
        Tensor dx = graph.nhwc(s.n, s.c, s.h, s.w);
        graph.conv_dgrad(s, dy, w, dx);
        add("dx", dx, in_count, Storage::io16, true);
        return inst;
    }
    // dgrad -> (mask) -> ReLU backward against z * s + b -> BN backward weights
    Tensor da = graph.nhwc(s.n, s.c, s.h, s.w, true);
    graph.conv_dgrad(s, dy, w, da);
    if (has_mask(kind)) {
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
    return inst;
}

}  // namespace cudnn_probe
