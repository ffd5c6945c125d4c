// conv_stack's BatchNorm finalize on the CPU (no torch headers: the glue is csrc/bn_finalize.cpp).
#pragma once

#include <cstdint>

#include "epilogue.h"

namespace lgc {

// bn_finalize_channel (csrc/epilogue.h) for channels 0 .. channels - 1.
void bn_finalize_cpu(const BnFinalizeArgs<float>& args, int64_t channels);
void bn_finalize_cpu(const BnFinalizeArgs<double>& args, int64_t channels);

}  // namespace lgc
