// Torch glue of the cuDNN conv graphs (csrc/cuda/cudnn_conv_graphs.h): lgc_fast._C.cudnn_conv_graph(conv, sbr, mask,
// stats, dbn, dbn_apply, shape, keep_probability, tensors, plans), the primitive of conv_stack's cuDNN pieces
// (lgc_fast/ops/conv_stack.py), with cudnn_conv_graph_check and cudnn_conv_graph_plans. Only in a CUDA build that
// found cuDNN's headers (LGC_WITH_CUDNN_GRAPHS, setup.py); elsewhere lgc_fast._C has no such function and conv_stack
// runs its torch pieces.
#ifdef LGC_WITH_CUDNN_GRAPHS
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/cudnn_conv_graphs.h"

namespace lgc {
namespace {

namespace cg = cudnn_graph;

// The executor's request from the Python arguments (io: "bfloat16" or "float16").
cg::GraphRequest make_request(const char* caller, const std::string& conv, bool sbr, const std::string& mask,
                              bool stats, bool dbn, bool dbn_apply, const std::vector<int64_t>& shape,
                              double keep_probability, const std::string& io, int64_t plans) {
  cg::GraphSpec spec{cg::Conv::fprop, sbr, cg::Mask::none, stats, dbn, dbn_apply};
  if (conv == "wgrad") spec.conv = cg::Conv::wgrad;
  else if (conv == "dgrad") spec.conv = cg::Conv::dgrad;
  else TORCH_CHECK(conv == "fprop", caller, ": conv must be fprop, wgrad or dgrad, not ", conv);
  if (mask == "rng") spec.mask = cg::Mask::rng;
  else if (mask == "byte") spec.mask = cg::Mask::byte;
  else if (mask == "io") spec.mask = cg::Mask::io;
  else TORCH_CHECK(mask == "none", caller, ": mask must be none, io, byte or rng, not ", mask);
  TORCH_CHECK(shape.size() == 7, caller, ": shape must be (n, c, k, h, w, r, dilation)");
  TORCH_CHECK(io == "bfloat16" || io == "float16", caller, ": io must be bfloat16 or float16, not ", io);
  TORCH_CHECK(plans >= 1 && plans <= cg::kMaxPlans, caller, ": plans must be in [1, ", cg::kMaxPlans, "], got ",
              plans);
  return {spec, {shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6]},
          io == "float16" ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16, keep_probability, static_cast<int>(plans)};
}

at::ScalarType storage_type(cg::Storage storage, at::ScalarType io) {
  switch (storage) {
    case cg::Storage::f32: return at::kFloat;
    case cg::Storage::io16: return io;
    case cg::Storage::u8: return at::kByte;
    case cg::Storage::i64: return at::kLong;
  }
  return at::kFloat;
}

// Runs one graph with the caller's tensors (outputs allocated by the caller, written in place): activations (N, C, H,
// W) and filters (K, C, r, r) channels_last, per-channel terms (C,) float32, seed and offset (1,) int64, io tensors
// all bfloat16 or all float16, everything on one CUDA device. plans: as cudnn_conv_graph_check's.
void cudnn_conv_graph(const std::string& conv, bool sbr, const std::string& mask, bool stats, bool dbn,
                      bool dbn_apply, const std::vector<int64_t>& shape, double keep_probability,
                      const std::map<std::string, at::Tensor>& tensors, int64_t plans) {
  TORCH_CHECK(!tensors.empty(), "cudnn_conv_graph: no tensors");
  const at::Tensor& first = tensors.begin()->second;
  TORCH_CHECK(first.is_cuda(), "cudnn_conv_graph: tensors must be on a CUDA device");
  at::ScalarType io = at::kBFloat16;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.device() == first.device(), "cudnn_conv_graph: ", name, " is on ", t.device(), ", not ",
                first.device());
    if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) io = t.scalar_type();
  }
  const cg::GraphRequest request = make_request("cudnn_conv_graph", conv, sbr, mask, stats, dbn, dbn_apply, shape,
                                                keep_probability, io == at::kHalf ? "float16" : "bfloat16", plans);
  const c10::cuda::CUDAGuard guard(first.device());
  try {
    std::vector<cg::Binding> bindings;
    for (const cg::RoleInfo& role : cg::conv_graph_roles(request)) {
      const auto found = tensors.find(role.name);
      TORCH_CHECK(found != tensors.end(), "cudnn_conv_graph: tensor ", role.name, " missing");
      const at::Tensor& t = found->second;
      TORCH_CHECK(t.scalar_type() == storage_type(role.storage, io), "cudnn_conv_graph: ", role.name, " must be ",
                  storage_type(role.storage, io), ", got ", t.scalar_type());
      TORCH_CHECK(static_cast<size_t>(t.numel()) == role.count, "cudnn_conv_graph: ", role.name, " must have ",
                  role.count, " values, got shape ", t.sizes());
      TORCH_CHECK(t.dim() == 4 ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(),
                  "cudnn_conv_graph: ", role.name, " must be ", t.dim() == 4 ? "channels_last" : "contiguous");
      bindings.push_back({role.name, t.data_ptr()});
    }
    TORCH_CHECK(bindings.size() == tensors.size(), "cudnn_conv_graph: tensors given that the graph does not have");
    const int64_t workspace_bytes = cg::conv_graph_workspace(request);
    const at::Tensor workspace = at::empty({std::max<int64_t>(workspace_bytes, 1)}, first.options().dtype(at::kByte));
    cg::run_conv_graph(request, bindings, workspace.data_ptr(),
                       c10::cuda::getCurrentCUDAStream(first.device().index()).stream());
  } catch (const cg::Failure& e) {
    TORCH_CHECK(false, "cudnn_conv_graph (", conv, "): ", e.what());
  }
}

// "" where the graph builds on `device` (building and caching it: its fused kernel compiled and, for plans > 1, the
// first `plans` plans that build timed on scratch tensors, the fastest kept), else cuDNN's reason: conv_stack checks
// every graph a stack needs before it runs any.
std::string cudnn_conv_graph_check(const std::string& conv, bool sbr, const std::string& mask, bool stats, bool dbn,
                                   bool dbn_apply, const std::vector<int64_t>& shape, double keep_probability,
                                   const std::string& io, int64_t device, int64_t plans) {
  const cg::GraphRequest request = make_request("cudnn_conv_graph_check", conv, sbr, mask, stats, dbn, dbn_apply,
                                                shape, keep_probability, io, plans);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  try {
    cg::conv_graph_roles(request);
  } catch (const cg::Failure& e) {
    return e.what();
  }
  return "";
}

// The plans built for a graph (building it as cudnn_conv_graph_check does): [(cuDNN's name, median ms or -1 where
// not timed, whether it runs)].
std::vector<std::tuple<std::string, double, bool>> cudnn_conv_graph_plans(
    const std::string& conv, bool sbr, const std::string& mask, bool stats, bool dbn, bool dbn_apply,
    const std::vector<int64_t>& shape, double keep_probability, const std::string& io, int64_t device,
    int64_t plans) {
  const cg::GraphRequest request = make_request("cudnn_conv_graph_plans", conv, sbr, mask, stats, dbn, dbn_apply,
                                                shape, keep_probability, io, plans);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  std::vector<std::tuple<std::string, double, bool>> out;
  try {
    for (const cg::PlanChoice& p : cg::conv_graph_plans(request)) out.emplace_back(p.name, p.median_ms, p.chosen);
  } catch (const cg::Failure& e) {
    TORCH_CHECK(false, "cudnn_conv_graph_plans (", conv, "): ", e.what());
  }
  return out;
}

}  // namespace

void register_cudnn_conv_graphs(pybind11::module_& m) {
  m.def("cudnn_conv_graph", &cudnn_conv_graph, "Runs one cuDNN conv graph (csrc/cuda/cudnn_conv_graphs.h)");
  m.def("cudnn_conv_graph_check", &cudnn_conv_graph_check, "Whether a cuDNN conv graph builds: '' or the reason");
  m.def("cudnn_conv_graph_plans", &cudnn_conv_graph_plans, "The plans built for a cuDNN conv graph, and their times");
}

}  // namespace lgc
#endif  // LGC_WITH_CUDNN_GRAPHS
