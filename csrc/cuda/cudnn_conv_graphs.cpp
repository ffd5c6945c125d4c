// The executor of the cuDNN conv graphs (cudnn_conv_graphs.h): a cuDNN handle per device and thread, and a cache of
// built graphs with their plan per thread (autograd runs the backward on its own thread; a cache of its own needs no
// lock). Building a fused graph compiles its kernel (runtime fusion), so it happens once per key. No torch here.
#include "cudnn_conv_graphs.h"

#include <map>
#include <memory>
#include <tuple>

namespace lgc {
namespace cudnn_graph {
namespace {

using Key = std::tuple<int, int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                       double, int>;

struct Entry {
  std::unique_ptr<Graph> graph;
  std::vector<RoleInfo> roles;
};

int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "current device");
  return device;
}

// Handles and graphs are never destroyed: freed at a thread's (or the process's) exit, they could outlive the CUDA
// driver's own shutdown.
cudnnHandle_t handle_for(int device) {
  thread_local auto* handles = new std::map<int, cudnnHandle_t>();
  auto found = handles->find(device);
  if (found != handles->end()) return found->second;
  cudnnHandle_t handle = nullptr;
  check_cudnn(cudnnCreate(&handle), "cuDNN handle");
  handles->emplace(device, handle);
  return handle;
}

Entry& entry_for(const GraphSpec& spec, const Shape& s, cudnnDataType_t io, double keep_probability) {
  thread_local auto* cache = new std::map<Key, Entry>();
  const int device = current_device();
  const Key key{static_cast<int>(spec.conv), spec.sbr, static_cast<int>(spec.mask), spec.stats, spec.dbn,
                spec.dbn_apply, s.n, s.c, s.k, s.h, s.w, s.r, s.dil, static_cast<int>(io), keep_probability, device};
  auto found = cache->find(key);
  if (found != cache->end()) return found->second;
  Entry entry{std::make_unique<Graph>(handle_for(device), io), {}};
  entry.roles = build_conv_graph(*entry.graph, spec, s, keep_probability);
  entry.graph->build_plans(1);  // heuristics mode A's first plan that builds
  return cache->emplace(key, std::move(entry)).first->second;
}

}  // namespace

const std::vector<RoleInfo>& conv_graph_roles(const GraphSpec& spec, const Shape& s, cudnnDataType_t io,
                                              double keep_probability) {
  return entry_for(spec, s, io, keep_probability).roles;
}

int64_t conv_graph_workspace(const GraphSpec& spec, const Shape& s, cudnnDataType_t io, double keep_probability) {
  return entry_for(spec, s, io, keep_probability).graph->plans().front().workspace;
}

void run_conv_graph(const GraphSpec& spec, const Shape& s, cudnnDataType_t io, double keep_probability,
                    const std::vector<Binding>& bindings, void* workspace, cudaStream_t stream) {
  Entry& entry = entry_for(spec, s, io, keep_probability);
  std::vector<int64_t> uids;
  std::vector<void*> pointers;
  for (const RoleInfo& role : entry.roles) {
    const Binding* bound = nullptr;
    for (const Binding& b : bindings)
      if (b.role == role.name) bound = &b;
    if (bound == nullptr || bound->pointer == nullptr) throw Failure("conv graph: tensor " + role.name + " not bound");
    uids.push_back(role.uid);
    pointers.push_back(bound->pointer);
  }
  if (bindings.size() != entry.roles.size()) throw Failure("conv graph: tensors bound that the graph does not have");
  entry.graph->run(entry.graph->plans().front(), uids, pointers, workspace, stream);
}

}  // namespace cudnn_graph
}  // namespace lgc
