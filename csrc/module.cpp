// The Python module lgc_fast._C. The ops register themselves with torch.library in their own files
// (namespace lgc_fast_C); this file only makes the shared library importable and reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LGC_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
}
