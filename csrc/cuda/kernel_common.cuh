// What the CUDA kernels share: LGC_HD, which marks the per-thread steps that the host emulations in tests/cpp also run,
// and the element conversions, host and device: each map type to its accumulation type (float32; float64 for
// double) and back, rounding to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#define LGC_HD __host__ __device__ __forceinline__

namespace lgc {

LGC_HD float to_acc(float v) { return v; }
LGC_HD double to_acc(double v) { return v; }
LGC_HD float to_acc(__half v) { return __half2float(v); }
LGC_HD float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Out, typename Acc>
LGC_HD Out from_acc(Acc v) {
  if constexpr (std::is_same_v<Out, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<Out, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<Out>(v);
  }
}

}  // namespace lgc
