// Writes, for every case of bench/cudnn_fusion_probe.cpp on a small shape (3x3 dilation 4 and 5x5), the host inputs
// the probe draws and the float64 references it checks cuDNN's outputs against, for
// tests/test_bench_cudnn_fusion.py to recompute with torch: the probe's oracle must be right before a GPU run trusts
// it. Builds each case's cuDNN graph too (descriptors finalize on the host; no GPU, no handle), checks that the RNG
// cases' mask read-back (fill_reveal, keep_from_identity_output) returns the mask it is given (exit 1 if not), and
// writes judge_keep's verdicts on made-up masks.
//   cudnn_fusion_reference_dump OUT_DIR   ->   OUT_DIR/<case>_r<k>.txt, <case>_r<k>_{in,ref}_<tensor>.bin,
//                                              judge_keep.verdicts (judge_keep's verdicts on made-up masks)
#define main probe_main
#include "../../bench/cudnn_fusion_probe.cpp"
#undef main

#include <fstream>

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: cudnn_fusion_reference_dump OUT_DIR\n");
        return 2;
    }
    const std::string dir = argv[1];
    for (int r : {3, 5}) {  // the RNG cases' mask read-back: an identity filter's output is the keep mask again
        Shape square{2, 24, 24, 16, 16, r, r == 3 ? 4 : 1};
        Graph graph(nullptr, CUDNN_DATA_BFLOAT16);
        Instance inst = build_case(graph, Kind::fprop_sbr_rng_stats, square);
        Values values{CUDNN_DATA_BFLOAT16};
        fill_inputs(inst, values);
        fill_reveal(inst);
        std::vector<double> y;
        for (auto& [name, out] : reference(Kind::fprop_sbr_rng_stats, inst))
            if (name == "y") y = out;
        if (keep_from_identity_output(y) != inst["keep"].buffer.host) {
            std::fprintf(stderr, "r=%d: the identity filter's output is not the keep mask\n", r);
            return 1;
        }
    }
    {  // judge_keep: two independent draws pass; the same mask again, or one value for all channels of a pixel, fail
        const int64_t channels = 128;
        Values values{CUDNN_DATA_BFLOAT16};
        auto bernoulli = [&](size_t count) {
            std::vector<float> m(count);
            for (auto& k : m) k = values.uniform(0.f, 1.f) < kDropout ? 0.f : 1.f;
            return m;
        };
        const size_t count = 2 * 16 * 16 * channels;
        auto first = bernoulli(count), second = bernoulli(count), per_pixel = bernoulli(count / channels);
        std::vector<float> channel_constant(count);
        for (size_t i = 0; i < count; ++i) channel_constant[i] = per_pixel[i / channels];
        bool independent = false, repeated = true, constant = true;
        std::ofstream verdicts(dir + "/judge_keep.verdicts");
        verdicts << "independent" << judge_keep(first, second, channels, independent) << "\n";
        verdicts << "repeated" << judge_keep(first, first, channels, repeated) << "\n";
        verdicts << "channel_constant" << judge_keep(channel_constant, second, channels, constant) << "\n";
        verdicts << "verdicts " << independent << " " << repeated << " " << constant << "\n";
    }
    for (const auto& info : kCases) {
        for (int r : {3, 5}) {
            // in != out channels, so a swapped index shows
            Shape shape{2, 24, 16, 16, 16, r, r == 3 ? 4 : 1};
            Graph graph(nullptr, CUDNN_DATA_BFLOAT16);
            Instance inst = build_case(graph, info.kind, shape);
            Values values{CUDNN_DATA_BFLOAT16};
            fill_inputs(inst, values);
            auto refs = reference(info.kind, inst);
            const std::string base = dir + "/" + info.name + "_r" + std::to_string(r);
            std::ofstream index(base + ".txt");
            for (const auto& role : inst.roles) {
                index << "in " << role.name << "\n";
                std::ofstream(base + "_in_" + role.name + ".bin", std::ios::binary)
                    .write(reinterpret_cast<const char*>(role.buffer.host.data()), role.buffer.count * sizeof(float));
            }
            for (const auto& [name, values_ref] : refs) {
                index << "ref " << name << "\n";
                std::ofstream(base + "_ref_" + name + ".bin", std::ios::binary)
                    .write(reinterpret_cast<const char*>(values_ref.data()), values_ref.size() * sizeof(double));
            }
        }
    }
    return 0;
}
