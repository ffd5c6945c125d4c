// Element types the CUDA launchers accept. Plain enum so that .cu files stay free of torch headers.
#pragma once

namespace lgc {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace lgc
