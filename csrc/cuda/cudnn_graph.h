// A thin layer over cuDNN's backend (graph) API, without torch: descriptors that free themselves, a graph builder for
// the operations a conv block's fused forms need (convolutions, pointwise, genstats, BN backward weights, Bernoulli
// RNG), plans from the heuristics, variant packs and execution. Used by the library's cuDNN conv graphs
// (cudnn_conv_graphs.cpp) and by bench/cudnn_fusion_probe.cpp, which checks and times every graph on a GPU.
#pragma once
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace lgc {
namespace cudnn_graph {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Failure(std::string(what) + ": " + cudaGetErrorString(status));
}

inline void check_cudnn(cudnnStatus_t status, const char* what) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  char detail[512] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  throw Failure(std::string(what) + ": " + cudnnGetErrorString(status) +
                (detail[0] ? std::string(" (") + detail + ")" : ""));
}

// The most engine configurations build_plans asks the heuristics for, so the most plans a graph can have.
constexpr int kMaxPlans = 16;

// A convolution layer: n x c x h x w in, k filters of c x r x r, stride 1, dilation dil, "same" zero padding.
struct Shape {
  int64_t n, c, k, h, w, r, dil;
  int64_t pad() const { return dil * (r / 2); }
};

// ---- backend descriptors ----

class Descriptor {
 public:
  explicit Descriptor(cudnnBackendDescriptorType_t type) {
    check_cudnn(cudnnBackendCreateDescriptor(type, &desc_), "create descriptor");
  }
  ~Descriptor() { cudnnBackendDestroyDescriptor(desc_); }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  template <typename T>
  Descriptor& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T* values,
                  int64_t count = 1) {
    check_cudnn(cudnnBackendSetAttribute(desc_, name, type, count, values), "set attribute");
    return *this;
  }
  void finalize(const char* what) { check_cudnn(cudnnBackendFinalize(desc_), what); }
  cudnnBackendDescriptor_t get() const { return desc_; }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

struct Tensor {
  cudnnBackendDescriptor_t desc;
  int64_t uid;
};

#if CUDNN_VERSION >= 90800
// A GPU described by cuDNN's device-properties JSON (the attributes cudaGetDeviceProperties gives, as cuDNN names
// them): graphs built against it need no device, so which engines build for, say, an H100 can be asked on a CPU.
class DeviceProperties {
 public:
  explicit DeviceProperties(const std::string& json) : desc_(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR) {
    desc_.set(CUDNN_ATTR_DEVICEPROP_JSON_REPRESENTATION, CUDNN_TYPE_CHAR, json.data(),
              static_cast<int64_t>(json.size()));
    desc_.finalize("device properties");
  }
  cudnnBackendDescriptor_t get() const { return desc_.get(); }

 private:
  Descriptor desc_;
};
#endif

class Graph {
 public:
  Graph(cudnnHandle_t handle, cudnnDataType_t io_type) : handle_(handle), io_type_(io_type) {}
#if CUDNN_VERSION >= 90800
  // A graph that only builds plans (no handle, nothing runs): for the device `device`, present or not.
  Graph(const DeviceProperties& device, cudnnDataType_t io_type)
      : handle_(nullptr), device_(device.get()), io_type_(io_type) {}
#endif

  Tensor tensor(std::vector<int64_t> dims, std::vector<int64_t> strides, cudnnDataType_t type, bool is_virtual) {
    auto& d = keep(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    int64_t uid = next_uid_++, alignment = 16;
    bool virt = is_virtual;
    d.set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, &type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims.data(), static_cast<int64_t>(dims.size()))
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(), static_cast<int64_t>(strides.size()))
        .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, &uid)
        .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, &alignment)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, &virt);
    d.finalize("tensor");
    return {d.get(), uid};
  }
  // dims in NCHW order, NHWC in memory
  Tensor nhwc(int64_t n, int64_t c, int64_t h, int64_t w, bool is_virtual = false) {
    return tensor({n, c, h, w}, {c * h * w, 1, w * c, c}, is_virtual ? CUDNN_DATA_FLOAT : io_type_, is_virtual);
  }
  // float32 unless io_typed (some fused engines may want a prologue's scale and bias in the io type)
  Tensor per_channel(int64_t c, bool io_typed = false) {
    return tensor({1, c, 1, 1}, {c, 1, c, c}, io_typed ? io_type_ : CUDNN_DATA_FLOAT, false);
  }

  // one int64 on the device (the RNG's seed and offset)
  Tensor device_scalar() { return tensor({1, 1, 1, 1}, {1, 1, 1, 1}, CUDNN_DATA_INT64, false); }

  // y = 1 with probability keep_probability, else 0: Philox draws from the device seed and offset, one an element
  void bernoulli(Tensor seed, Tensor offset, double keep_probability, Tensor y) {
    auto& dist = keep(CUDNN_BACKEND_RNG_DESCRIPTOR);
    cudnnRngDistribution_t kind = CUDNN_RNG_DISTRIBUTION_BERNOULLI;
    dist.set(CUDNN_ATTR_RNG_DISTRIBUTION, CUDNN_TYPE_RNG_DISTRIBUTION, &kind)
        .set(CUDNN_ATTR_RNG_BERNOULLI_DIST_PROBABILITY, CUDNN_TYPE_DOUBLE, &keep_probability);
    dist.finalize("rng descriptor");
    auto& op = keep(CUDNN_BACKEND_OPERATION_RNG_DESCRIPTOR);
    cudnnBackendDescriptor_t d = dist.get();
    op.set(CUDNN_ATTR_OPERATION_RNG_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &d)
        .set(CUDNN_ATTR_OPERATION_RNG_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &y.desc)
        .set(CUDNN_ATTR_OPERATION_RNG_SEED, CUDNN_TYPE_BACKEND_DESCRIPTOR, &seed.desc)
        .set(CUDNN_ATTR_OPERATION_RNG_OFFSET_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &offset.desc);
    add_op(op, "rng");
  }

  void pointwise(cudnnPointwiseMode_t mode, Tensor x, const Tensor* b, Tensor y) {
    auto& op = pointwise_op(mode);
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &x.desc)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &y.desc);
    if (b) op.set(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &b->desc);
    add_op(op, "pointwise");
  }

  // dx = dy where x > 0, else 0
  void relu_backward(Tensor dy, Tensor x, Tensor dx) {
    auto& op = pointwise_op(CUDNN_POINTWISE_RELU_BWD);
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_DYDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &dy.desc)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &x.desc)
        .set(CUDNN_ATTR_OPERATION_POINTWISE_DXDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &dx.desc);
    add_op(op, "relu backward");
  }

  void conv_fprop(const Shape& s, Tensor x, Tensor w, Tensor y) {
    conv_op({CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
             CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, "conv fprop"},
            s, x, w, y);
  }

  void conv_dgrad(const Shape& s, Tensor dy, Tensor w, Tensor dx) {
    conv_op({CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
             CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA, "conv dgrad"},
            s, dy, w, dx);
  }

  void conv_wgrad(const Shape& s, Tensor x, Tensor dy, Tensor dw) {
    conv_op(
        {CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
         CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
         CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
         CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA, "conv wgrad"},
        s, x, dy, dw);
  }

  void genstats(Tensor x, Tensor sum, Tensor sq_sum) {
    auto& op = keep(CUDNN_BACKEND_OPERATION_GEN_STATS_DESCRIPTOR);
    cudnnGenStatsMode_t mode = CUDNN_GENSTATS_SUM_SQSUM;
    cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    op.set(CUDNN_ATTR_OPERATION_GENSTATS_MODE, CUDNN_TYPE_GENSTATS_MODE, &mode)
        .set(CUDNN_ATTR_OPERATION_GENSTATS_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &prec)
        .set(CUDNN_ATTR_OPERATION_GENSTATS_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &x.desc)
        .set(CUDNN_ATTR_OPERATION_GENSTATS_SUMDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &sum.desc)
        .set(CUDNN_ATTR_OPERATION_GENSTATS_SQSUMDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &sq_sum.desc);
    add_op(op, "genstats");
  }

  // dgamma = sum(g * xhat), dbeta = sum(g), and dz = eq_dy * g + eq_x * z + eq_bias
  void bn_backward_weights(Tensor g, Tensor z, Tensor mean, Tensor invstd, Tensor gamma, Tensor dgamma, Tensor dbeta,
                           Tensor eq_dy, Tensor eq_x, Tensor eq_bias) {
    auto& op = keep(CUDNN_BACKEND_OPERATION_BN_BWD_WEIGHTS_DESCRIPTOR);
    cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    op.set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &prec)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DY_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &g.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_X_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &z.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_MEAN_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &mean.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_INVSTD_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &invstd.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_BN_SCALE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &gamma.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_SCALE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &dgamma.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_DBN_BIAS_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &dbeta.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_DY_SCALE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &eq_dy.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_X_SCALE_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, &eq_x.desc)
        .set(CUDNN_ATTR_OPERATION_BN_BWD_WEIGHTS_EQ_BIAS, CUDNN_TYPE_BACKEND_DESCRIPTOR, &eq_bias.desc);
    add_op(op, "bn backward weights");
  }

  // Finalizes the graph and every plan that builds, at most `limit`: heuristics mode A's configurations, then the
  // fallback list's, then (as cuDNN's frontend does when both come up empty) every engine by its global index with
  // default knobs. Throws with cuDNN's last message when none builds.
  void build_plans(int limit) {
    auto& graph = keep(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    if (handle_ != nullptr) graph.set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, &handle_);
    graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, ops_.data(),
              static_cast<int64_t>(ops_.size()));
    graph.finalize("operation graph");
    cudnnBackendDescriptor_t g = graph.get();
    std::string last_error = "no engine configuration offered";
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      auto& heur = keep(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
      heur.set(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, &g)
          .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &mode);
      on_device(heur, DeviceRole::heuristics);
      try {
        heur.finalize("heuristics");
      } catch (const Failure& e) {
        last_error = e.what();
        continue;
      }
      std::vector<cudnnBackendDescriptor_t> configs;
      for (int i = 0; i < kMaxPlans; ++i) configs.push_back(keep(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR).get());
      int64_t returned = 0;
      check_cudnn(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                           kMaxPlans, &returned, configs.data()),
                  "heuristics results");
      for (int64_t i = 0; i < returned && static_cast<int>(plans_.size()) < limit; ++i)
        try_plan(configs[i], last_error);
      if (!plans_.empty()) return;
    }
    int64_t engines = 0, got = 0;
    check_cudnn(
        cudnnBackendGetAttribute(g, CUDNN_ATTR_OPERATIONGRAPH_ENGINE_GLOBAL_COUNT, CUDNN_TYPE_INT64, 1, &got, &engines),
        "engine count");
    for (int64_t index = 0; index < engines && static_cast<int>(plans_.size()) < limit; ++index) {
      auto& engine = keep(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
      engine.set(CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, &g)
          .set(CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, &index);
      on_device(engine, DeviceRole::engine);
      try {
        engine.finalize("engine");
        auto& config = keep(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
        cudnnBackendDescriptor_t e = engine.get();
        config.set(CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, &e);
        config.finalize("engine configuration");
        try_plan(config.get(), last_error);
      } catch (const Failure& e) {
        last_error = e.what();
      }
    }
    if (plans_.empty()) throw Failure(last_error);
  }

  struct Plan {
    cudnnBackendDescriptor_t desc;
    int64_t workspace;
    std::string name;
  };
  const std::vector<Plan>& plans() const { return plans_; }
  cudnnDataType_t io_type() const { return io_type_; }

  // A variant pack binds device pointers to the graph's tensors; made once, outside any timed region.
  cudnnBackendDescriptor_t pack(const std::vector<int64_t>& uids, std::vector<void*> pointers, void* workspace) {
    auto& pack = keep(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(), static_cast<int64_t>(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, pointers.data(),
             static_cast<int64_t>(pointers.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &workspace);
    pack.finalize("variant pack");
    return pack.get();
  }
  void execute(const Plan& plan, cudnnBackendDescriptor_t pack) {
    check_cudnn(cudnnBackendExecute(handle_, plan.desc, pack), "execute");
  }
  // Runs `plan` on `stream` through a variant pack made for this call and freed after it (a library's calls bind new
  // pointers each time; pack() keeps its packs for the graph's lifetime).
  void run(const Plan& plan, const std::vector<int64_t>& uids, std::vector<void*> pointers, void* workspace,
           cudaStream_t stream) {
    Descriptor pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(), static_cast<int64_t>(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, pointers.data(),
             static_cast<int64_t>(pointers.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &workspace);
    pack.finalize("variant pack");
    check_cudnn(cudnnSetStream(handle_, stream), "set stream");
    check_cudnn(cudnnBackendExecute(handle_, plan.desc, pack.get()), "execute");
  }

 private:
  // Keeps the plan of `config` if it finalizes; else records cuDNN's message.
  void try_plan(cudnnBackendDescriptor_t config, std::string& last_error) {
    auto& plan = keep(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    if (handle_ != nullptr) plan.set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, &handle_);
    on_device(plan, DeviceRole::plan);
    plan.set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, &config);
    try {
      plan.finalize("execution plan");
    } catch (const Failure& e) {
      last_error = e.what();
      return;
    }
    int64_t workspace = 0, got = 0;
    check_cudnn(cudnnBackendGetAttribute(plan.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                         &got, &workspace),
                "workspace size");
    plans_.push_back({plan.get(), workspace, plan_name(plan.get())});
  }

  // A pointwise operation of `mode` in float32 arithmetic, its tensors still to be set.
  Descriptor& pointwise_op(cudnnPointwiseMode_t mode) {
    auto& pw = keep(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, &mode)
        .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &prec);
    pw.finalize("pointwise descriptor");
    auto& op = keep(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    cudnnBackendDescriptor_t pwd = pw.get();
    op.set(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, &pwd);
    return op;
  }

  // The three convolution operations differ only in their attribute names: two inputs, one output.
  struct ConvOp {
    cudnnBackendDescriptorType_t type;
    cudnnBackendAttributeName_t first, second, output, conv, alpha, beta;
    const char* what;
  };
  void conv_op(const ConvOp& kind, const Shape& s, Tensor first, Tensor second, Tensor output) {
    auto& op = keep(kind.type);
    cudnnBackendDescriptor_t conv = conv_desc(s);
    float alpha = 1.f, beta = 0.f;
    op.set(kind.first, CUDNN_TYPE_BACKEND_DESCRIPTOR, &first.desc)
        .set(kind.second, CUDNN_TYPE_BACKEND_DESCRIPTOR, &second.desc)
        .set(kind.output, CUDNN_TYPE_BACKEND_DESCRIPTOR, &output.desc)
        .set(kind.conv, CUDNN_TYPE_BACKEND_DESCRIPTOR, &conv)
        .set(kind.alpha, CUDNN_TYPE_FLOAT, &alpha)
        .set(kind.beta, CUDNN_TYPE_FLOAT, &beta);
    add_op(op, kind.what);
  }

  Descriptor& keep(cudnnBackendDescriptorType_t type) {
    descriptors_.push_back(std::make_unique<Descriptor>(type));
    return *descriptors_.back();
  }
  void add_op(Descriptor& op, const char* what) {
    op.finalize(what);
    ops_.push_back(op.get());
  }
  cudnnBackendDescriptor_t conv_desc(const Shape& s) {
    auto& conv = keep(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
    cudnnDataType_t comp = CUDNN_DATA_FLOAT;
    cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
    int64_t dims = 2, dil[2] = {s.dil, s.dil}, stride[2] = {1, 1}, pad[2] = {s.pad(), s.pad()};
    conv.set(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &comp)
        .set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, &mode)
        .set(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, &dims)
        .set(CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, dil, 2)
        .set(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, stride, 2)
        .set(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, pad, 2)
        .set(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, pad, 2);
    conv.finalize("convolution descriptor");
    return conv.get();
  }
  static std::string plan_name(cudnnBackendDescriptor_t plan) {
    std::vector<char> json(4096, 0);
    int64_t got = 0;
    if (cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_JSON_REPRESENTATION, CUDNN_TYPE_CHAR,
                                 static_cast<int64_t>(json.size()) - 1, &got, json.data()) != CUDNN_STATUS_SUCCESS)
      return "";
    std::string text(json.data());
    for (char& ch : text)
      if (ch == '"' || ch == '\\' || ch == '\n') ch = '\'';
    return text.substr(0, 240);
  }

  // Where the graph was made for a described device, each descriptor that picks kernels is told which.
  enum class DeviceRole { heuristics, engine, plan };
  void on_device(Descriptor& d, DeviceRole where) {
#if CUDNN_VERSION >= 90800
    if (device_ == nullptr) return;
    const cudnnBackendAttributeName_t name = where == DeviceRole::heuristics ? CUDNN_ATTR_ENGINEHEUR_DEVICEPROP
                                             : where == DeviceRole::engine   ? CUDNN_ATTR_ENGINE_DEVICEPROP
                                                                             : CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP;
    d.set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &device_);
#else
    (void)d;
    (void)where;
#endif
  }

  cudnnHandle_t handle_;
  cudnnBackendDescriptor_t device_ = nullptr;
  cudnnDataType_t io_type_;
  int64_t next_uid_ = 1;
  std::vector<std::unique_ptr<Descriptor>> descriptors_;
  std::vector<cudnnBackendDescriptor_t> ops_;
  std::vector<Plan> plans_;
};

}  // namespace cudnn_graph
}  // namespace lgc
