// The cases of bench/cudnn_fusion_probe.cpp: which cuDNN graph each one is, and the tensors (roles) it binds. A case
// builds its graph with build_case; the probe fills, runs and checks it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cudnn_fusion_graph.h"  // and the library's graphs

namespace cudnn_probe {

constexpr float kDropout = 0.1f;
constexpr int64_t kSeed = 20261124, kOffset = 0;  // an RNG case's Philox seed and offset (the same in every graph)

enum class Kind { fprop, fprop_stats, fprop_sbr_stats, fprop_sbr_mask_stats, fprop_sbr_mask8_stats, fprop_sbr_rng_stats,
                  wgrad, wgrad_sbr, wgrad_sbr_mask, wgrad_sbr_rng, wgrad_dbnapply, wgrad_sbr_rng_dbnapply, dgrad,
                  dgrad_dbnapply, dgrad_drelu_dbn, dgrad_mask_drelu_dbn, dgrad_rng_drelu_dbn,
                  dgrad_dbnapply_rng_drelu_dbn };

// A case: a name for one GraphSpec (csrc/cuda/cudnn_conv_graphs.h says what each field puts in the graph).
struct CaseInfo {
    Kind kind;
    const char* name;
    GraphSpec spec;
};

// In the order the probe runs them, which is the order a run cut off by its time limit keeps them: the plain
// graphs, then those lgc_fast.ops.conv_stack runs (csrc/cuda/cudnn_conv_graphs.h), then the alternatives.
inline const CaseInfo kCases[] = {
    // the plain graphs (precompiled engines: quick to build)
    {Kind::fprop, "fprop", {Conv::fprop, false, Mask::none, false, false, false}},
    {Kind::wgrad, "wgrad", {Conv::wgrad, false, Mask::none, false, false, false}},
    {Kind::dgrad, "dgrad", {Conv::dgrad, false, Mask::none, false, false, false}},
    // conv_stack's graphs
    {Kind::fprop_stats, "fprop_stats", {Conv::fprop, false, Mask::none, true, false, false}},
    {Kind::fprop_sbr_rng_stats, "fprop_sbr_rng_stats", {Conv::fprop, true, Mask::rng, true, false, false}},
    {Kind::wgrad_dbnapply, "wgrad_dbnapply", {Conv::wgrad, false, Mask::none, false, false, true}},
    {Kind::wgrad_sbr_rng_dbnapply, "wgrad_sbr_rng_dbnapply", {Conv::wgrad, true, Mask::rng, false, false, true}},
    {Kind::wgrad_sbr_rng, "wgrad_sbr_rng", {Conv::wgrad, true, Mask::rng, false, false, false}},
    {Kind::dgrad_dbnapply, "dgrad_dbnapply", {Conv::dgrad, false, Mask::none, false, false, true}},
    {Kind::dgrad_dbnapply_rng_drelu_dbn, "dgrad_dbnapply_rng_drelu_dbn", {Conv::dgrad, false, Mask::rng, false, true,
     true}},
    {Kind::dgrad_rng_drelu_dbn, "dgrad_rng_drelu_dbn", {Conv::dgrad, false, Mask::rng, false, true, false}},
    // the alternatives: no mask, the mask as a tensor
    {Kind::fprop_sbr_stats, "fprop_sbr_stats", {Conv::fprop, true, Mask::none, true, false, false}},
    {Kind::fprop_sbr_mask_stats, "fprop_sbr_mask_stats", {Conv::fprop, true, Mask::io, true, false, false}},
    {Kind::fprop_sbr_mask8_stats, "fprop_sbr_mask8_stats", {Conv::fprop, true, Mask::byte, true, false, false}},
    {Kind::wgrad_sbr, "wgrad_sbr", {Conv::wgrad, true, Mask::none, false, false, false}},
    {Kind::wgrad_sbr_mask, "wgrad_sbr_mask", {Conv::wgrad, true, Mask::io, false, false, false}},
    {Kind::dgrad_drelu_dbn, "dgrad_drelu_dbn", {Conv::dgrad, false, Mask::none, false, true, false}},
    {Kind::dgrad_mask_drelu_dbn, "dgrad_mask_drelu_dbn", {Conv::dgrad, false, Mask::io, false, true, false}},
};

inline const CaseInfo& traits(Kind k) {
    for (const auto& c : kCases)
        if (c.kind == k) return c;
    throw Failure("unknown case");
}
inline bool uses_rng(Kind k) { return traits(k).spec.mask == Mask::rng; }
inline bool has_prologue(Kind k) { return traits(k).spec.sbr; }
inline bool has_mask(Kind k) { return traits(k).spec.mask != Mask::none; }
inline bool byte_mask(Kind k) { return traits(k).spec.mask == Mask::byte; }
inline bool is_dbn(Kind k) { return traits(k).spec.dbn; }
inline bool has_stats(Kind k) { return traits(k).spec.stats; }
inline bool dbn_apply(Kind k) { return traits(k).spec.dbn_apply; }
inline bool is_fprop(Kind k) { return traits(k).spec.conv == Conv::fprop; }
inline bool is_wgrad(Kind k) { return traits(k).spec.conv == Conv::wgrad; }
inline bool is_dgrad(Kind k) { return traits(k).spec.conv == Conv::dgrad; }
inline bool is_plain(Kind k) {
    const GraphSpec& c = traits(k).spec;
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
// scale and bias (s, b) in the io type instead of float32. An RNG case also gets a host-only role "keep" (uid 0):
// the mask its graphs draw, read back on the GPU for its reference.
inline Instance build_case(Graph& graph, Kind kind, const Shape& s, bool io_params = false) {
    Instance inst{s, {}};
    for (const RoleInfo& r : build_conv_graph(graph, traits(kind).spec, s, 1.0 - kDropout, io_params)) {
        Buffer b;
        b.count = r.count;
        b.storage = r.storage;
        inst.roles.push_back({r.name, r.uid, std::move(b), r.output});
    }
    if (uses_rng(kind)) {
        Buffer keep;
        keep.count = static_cast<size_t>(s.n * s.c * s.h * s.w);
        keep.storage = Storage::u8;
        inst.roles.push_back({"keep", 0, std::move(keep), false});
    }
    return inst;
}

}  // namespace cudnn_probe
