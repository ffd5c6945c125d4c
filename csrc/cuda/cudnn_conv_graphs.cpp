// The executor of the cuDNN conv graphs (cudnn_conv_graphs.h): a cuDNN handle per device and thread, and a cache of
// built graphs with their plans per thread (autograd runs the backward on its own thread; a cache of its own needs
// no lock). Building a fused graph compiles its kernel (runtime fusion), so it happens once per key and thread;
// timing its plans, where a request asks for more than one, once per key in the process. No torch here.
#include "cudnn_conv_graphs.h"

#include <algorithm>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

namespace lgc {
namespace cudnn_graph {
namespace {

using Key = std::tuple<int, int, int, int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                       double, int, int>;

struct Entry {
  std::unique_ptr<Graph> graph;
  std::vector<RoleInfo> roles;
  size_t chosen = 0;
  std::vector<double> median_ms;  // per plan, where they were timed
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

size_t storage_bytes(Storage storage) {
  switch (storage) {
    case Storage::f32: return 4;
    case Storage::io16: return 2;
    case Storage::u8: return 1;
    case Storage::i64: return 8;
  }
  return 8;
}

// What time_plans allocates and creates, released however it returns (cudaFree waits for the device: build time).
struct TimingResources {
  void* scratch = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  ~TimingResources() {
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (scratch != nullptr) cudaFree(scratch);
  }
};

// Each plan's median time over a few runs on zero-filled scratch tensors of the graph's roles (a convolution's time
// does not depend on the values; the RNG's seed and offset are 0), on a stream of its own; infinity for a plan that
// fails to run. Empty where the scratch does not fit in free device memory: the first plan is kept untimed.
std::vector<double> time_plans(Graph& graph, const std::vector<RoleInfo>& roles) {
  constexpr int kWarmups = 2, kRuns = 7;
  constexpr size_t kAlign = 256;
  int64_t workspace = 0;
  for (const auto& plan : graph.plans()) workspace = std::max(workspace, plan.workspace);
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const RoleInfo& role : roles) {
    offsets.push_back(total);
    total += (role.count * storage_bytes(role.storage) + kAlign - 1) / kAlign * kAlign;
  }
  TimingResources res;
  check_cuda(cudaDeviceSynchronize(), "before timing plans");  // the caller's kernels in flight would share the SMs
  if (cudaMalloc(&res.scratch, total + static_cast<size_t>(workspace)) != cudaSuccess) {
    cudaGetLastError();  // the failed allocation's error is not the next call's
    return {};
  }
  check_cuda(cudaMemset(res.scratch, 0, total), "timing scratch");
  check_cuda(cudaStreamCreateWithFlags(&res.stream, cudaStreamNonBlocking), "timing stream");
  check_cuda(cudaEventCreate(&res.start), "timing event");
  check_cuda(cudaEventCreate(&res.stop), "timing event");
  std::vector<int64_t> uids;
  std::vector<void*> pointers;
  for (size_t i = 0; i < roles.size(); ++i) {
    uids.push_back(roles[i].uid);
    pointers.push_back(static_cast<char*>(res.scratch) + offsets[i]);
  }
  void* workspace_pointer = static_cast<char*>(res.scratch) + total;
  std::vector<double> medians;
  for (const auto& plan : graph.plans()) {
    std::vector<double> runs;
    try {
      for (int i = 0; i < kWarmups; ++i) graph.run(plan, uids, pointers, workspace_pointer, res.stream);
      for (int i = 0; i < kRuns; ++i) {
        check_cuda(cudaEventRecord(res.start, res.stream), "timing event");
        graph.run(plan, uids, pointers, workspace_pointer, res.stream);
        check_cuda(cudaEventRecord(res.stop, res.stream), "timing event");
        check_cuda(cudaEventSynchronize(res.stop), "timing event");
        float ms = 0.0f;
        check_cuda(cudaEventElapsedTime(&ms, res.start, res.stop), "timing event");
        runs.push_back(ms);
      }
    } catch (const Failure&) {
      cudaGetLastError();
      runs.assign(1, std::numeric_limits<double>::infinity());
    }
    std::nth_element(runs.begin(), runs.begin() + runs.size() / 2, runs.end());
    medians.push_back(runs[runs.size() / 2]);
  }
  check_cuda(cudaStreamSynchronize(res.stream), "timing stream");
  return medians;
}

// time_plans' result for `key`, timed once per process: the backward's thread builds the same plans in the same
// order (the heuristics are deterministic), so it takes the forward's times instead of timing again inside a backward
// pass. Keyed by the plans' names too, in case a thread's list differs after all.
std::vector<double> shared_timings(const Key& key, Graph& graph, const std::vector<RoleInfo>& roles) {
  static std::mutex mutex;
  static auto* timings = new std::map<std::pair<Key, std::string>, std::vector<double>>();
  std::string names;
  for (const auto& plan : graph.plans()) names += plan.name + "\n";
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = timings->find({key, names});
  if (found != timings->end()) return found->second;
  std::vector<double> times = time_plans(graph, roles);
  if (!times.empty()) timings->emplace(std::make_pair(key, names), times);
  return times;
}

Entry& entry_for(const GraphRequest& r) {
  thread_local auto* cache = new std::map<Key, Entry>();
  const int device = current_device();
  const GraphSpec& spec = r.spec;
  const Shape& s = r.shape;
  const Key key{static_cast<int>(spec.conv), spec.sbr, static_cast<int>(spec.mask), spec.stats, spec.dbn,
                spec.dbn_apply, s.n, s.c, s.k, s.h, s.w, s.r, s.dil, static_cast<int>(r.io), r.keep_probability,
                std::max(r.plans, 1), device};
  auto found = cache->find(key);
  if (found != cache->end()) return found->second;
  Entry entry;
  entry.graph = std::make_unique<Graph>(handle_for(device), r.io);
  entry.roles = build_conv_graph(*entry.graph, spec, s, r.keep_probability);
  entry.graph->build_plans(std::max(r.plans, 1));  // heuristics mode A's first plans that build
  if (entry.graph->plans().size() > 1) {
    entry.median_ms = shared_timings(key, *entry.graph, entry.roles);
    if (!entry.median_ms.empty()) {
      entry.chosen = static_cast<size_t>(std::min_element(entry.median_ms.begin(), entry.median_ms.end()) -
                                         entry.median_ms.begin());
      if (entry.median_ms[entry.chosen] == std::numeric_limits<double>::infinity())
        throw Failure("no plan of the graph runs");
    }
  }
  return cache->emplace(key, std::move(entry)).first->second;
}

}  // namespace

const std::vector<RoleInfo>& conv_graph_roles(const GraphRequest& request) { return entry_for(request).roles; }

int64_t conv_graph_workspace(const GraphRequest& request) {
  const Entry& entry = entry_for(request);
  return entry.graph->plans()[entry.chosen].workspace;
}

std::vector<PlanChoice> conv_graph_plans(const GraphRequest& request) {
  const Entry& entry = entry_for(request);
  std::vector<PlanChoice> choices;
  const auto& plans = entry.graph->plans();
  for (size_t i = 0; i < plans.size(); ++i)
    choices.push_back({plans[i].name, entry.median_ms.empty() ? -1.0 : entry.median_ms[i], i == entry.chosen});
  return choices;
}

void run_conv_graph(const GraphRequest& request, const std::vector<Binding>& bindings, void* workspace,
                    cudaStream_t stream) {
  Entry& entry = entry_for(request);
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
  entry.graph->run(entry.graph->plans()[entry.chosen], uids, pointers, workspace, stream);
}

}  // namespace cudnn_graph
}  // namespace lgc
