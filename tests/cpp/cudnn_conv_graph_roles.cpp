// Prints the tensors (roles) of the library's cuDNN conv graphs, built on the host (no GPU, no handle), for
// tests/test_conv_stack.py's stand-in of lgc_fast._C.cudnn_conv_graph: it checks that conv_stack's cuDNN pieces bind
// exactly these. One graph a line on stdin, "conv sbr mask stats dbn dbn_apply n c k h w r dil keep_probability"
// (conv fprop|wgrad|dgrad, mask none|rng|byte, flags 0/1); one line out each: "name:count:storage:output ..." or
// "error: <cuDNN's message>".
#include <iostream>
#include <sstream>
#include <string>

#include "../../csrc/cuda/cudnn_conv_graphs.h"

using namespace lgc::cudnn_graph;

int main() {
  std::string line;
  const char* storages[] = {"f32", "io16", "u8", "i64"};
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string conv, mask;
    int sbr, stats, dbn, dbn_apply;
    Shape s{};
    double keep = 1.0;
    in >> conv >> sbr >> mask >> stats >> dbn >> dbn_apply >> s.n >> s.c >> s.k >> s.h >> s.w >> s.r >> s.dil >> keep;
    GraphSpec spec{conv == "wgrad" ? Conv::wgrad : conv == "dgrad" ? Conv::dgrad : Conv::fprop, sbr != 0,
                   mask == "rng" ? Mask::rng : mask == "byte" ? Mask::byte : Mask::none, stats != 0, dbn != 0,
                   dbn_apply != 0};
    try {
      Graph graph(nullptr, CUDNN_DATA_BFLOAT16);
      for (const RoleInfo& r : build_conv_graph(graph, spec, s, keep))
        std::cout << r.name << ":" << r.count << ":" << storages[static_cast<int>(r.storage)] << ":" << r.output
                  << " ";
      std::cout << "\n";
    } catch (const Failure& e) {
      std::cout << "error: " << e.what() << "\n";
    }
  }
  return 0;
}
