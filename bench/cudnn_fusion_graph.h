// Host helpers of bench/cudnn_fusion_probe.cpp: values in the io dtype (bfloat16 or float16 bits) and the buffers
// of a case's tensors. The graph API layer itself is the library's (csrc/cuda/cudnn_graph.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "../csrc/cuda/cudnn_conv_graphs.h"

namespace cudnn_probe {

using namespace lgc::cudnn_graph;

// ---- host values in the io dtype (bfloat16 or float16 bits) ----

inline uint16_t to_bf16(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    return v;
}

inline uint16_t to_fp16(float v) {  // finite inputs of moderate range only (all this program makes)
    uint32_t u;
    std::memcpy(&u, &v, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exponent = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
    uint32_t mantissa = u & 0x7fffffu;
    if (exponent <= 0) return static_cast<uint16_t>(sign);  // flush the tiny ones
    uint32_t half = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
    uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
}

inline float from_fp16(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
    uint32_t u = exponent == 0 ? sign : sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
    float v;
    std::memcpy(&v, &u, 4);
    return v;
}

// A tensor's device copy and, for the checked instance, its host values (float, already rounded to its dtype).

struct Buffer {
    size_t count = 0;
    Storage storage = Storage::f32;
    std::vector<float> host;
    void* device = nullptr;
    size_t element_bytes() const {
        switch (storage) {
            case Storage::f32: return 4;
            case Storage::io16: return 2;
            case Storage::u8: return 1;
            case Storage::i64: return 8;
        }
        return 0;
    }
    size_t bytes() const { return count * element_bytes(); }
};

}  // namespace cudnn_probe
