// The Python module lgc_fast._C. The ops register themselves with torch.library in their own files
// (namespace lgc_fast_C); this file only makes the shared library importable and reports how it was built.
#include <torch/extension.h>

#ifdef LGC_WITH_CUDNN_GRAPHS
namespace lgc {
void register_cudnn_conv_graphs(pybind11::module_& m);  // csrc/cudnn_conv_graphs.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LGC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef LGC_WITH_CUDNN_GRAPHS
  lgc::register_cudnn_conv_graphs(m);
  m.attr("with_cudnn_graphs") = true;
#else
  m.attr("with_cudnn_graphs") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
