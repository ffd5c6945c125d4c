// conv_stack's BatchNorm finalize on the CPU: a few hundred channels of scalar arithmetic, one thread.
#include "cpu/bn_finalize.h"

namespace lgc {

template <typename A>
static void finalize_channels(const BnFinalizeArgs<A>& args, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) bn_finalize_channel(args, c);
}

void bn_finalize_cpu(const BnFinalizeArgs<float>& args, int64_t channels) { finalize_channels(args, channels); }
void bn_finalize_cpu(const BnFinalizeArgs<double>& args, int64_t channels) { finalize_channels(args, channels); }

}  // namespace lgc
