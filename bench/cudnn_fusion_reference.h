// The float64 CPU convolutions that bench/cudnn_fusion_probe.cpp checks cuDNN's outputs against (forward, data and
// weight gradient), over the probe's layouts.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cudnn_fusion_graph.h"

namespace cudnn_probe {

// NHWC activations, KRSC filters; stride 1, "same" zero padding.
struct Reference {
    Shape s;
    size_t at(int64_t n, int64_t y, int64_t x, int64_t c, int64_t channels) const {
        return static_cast<size_t>(((n * s.h + y) * s.w + x) * channels + c);
    }
    size_t wat(int64_t k, int64_t i, int64_t j, int64_t c) const {
        return static_cast<size_t>(((k * s.r + i) * s.r + j) * s.c + c);
    }
    // Calls f(n, oy, ox, iy, ix, i, j) for every output pixel and in-bounds filter tap.
    template <typename F>
    void taps(F f) const {
        for (int64_t n = 0; n < s.n; ++n)
            for (int64_t oy = 0; oy < s.h; ++oy)
                for (int64_t ox = 0; ox < s.w; ++ox)
                    for (int64_t i = 0; i < s.r; ++i) {
                        int64_t iy = oy - s.pad() + i * s.dil;
                        if (iy < 0 || iy >= s.h) continue;
                        for (int64_t j = 0; j < s.r; ++j) {
                            int64_t ix = ox - s.pad() + j * s.dil;
                            if (ix >= 0 && ix < s.w) f(n, oy, ox, iy, ix, i, j);
                        }
                    }
    }
    std::vector<double> fprop(const std::vector<double>& a, const std::vector<float>& w) const {
        std::vector<double> y(static_cast<size_t>(s.n * s.h * s.w * s.k), 0.0);
        taps([&](int64_t n, int64_t oy, int64_t ox, int64_t iy, int64_t ix, int64_t i, int64_t j) {
            for (int64_t k = 0; k < s.k; ++k) {
                double acc = 0.0;
                for (int64_t c = 0; c < s.c; ++c) acc += a[at(n, iy, ix, c, s.c)] * w[wat(k, i, j, c)];
                y[at(n, oy, ox, k, s.k)] += acc;
            }
        });
        return y;
    }
    std::vector<double> dgrad(const std::vector<double>& dy, const std::vector<float>& w) const {
        std::vector<double> dx(static_cast<size_t>(s.n * s.h * s.w * s.c), 0.0);
        taps([&](int64_t n, int64_t oy, int64_t ox, int64_t iy, int64_t ix, int64_t i, int64_t j) {
            for (int64_t k = 0; k < s.k; ++k) {
                double g = dy[at(n, oy, ox, k, s.k)];
                for (int64_t c = 0; c < s.c; ++c) dx[at(n, iy, ix, c, s.c)] += g * w[wat(k, i, j, c)];
            }
        });
        return dx;
    }
    std::vector<double> wgrad(const std::vector<double>& a, const std::vector<double>& dy) const {
        std::vector<double> dw(static_cast<size_t>(s.k * s.r * s.r * s.c), 0.0);
        taps([&](int64_t n, int64_t oy, int64_t ox, int64_t iy, int64_t ix, int64_t i, int64_t j) {
            for (int64_t k = 0; k < s.k; ++k) {
                double g = dy[at(n, oy, ox, k, s.k)];
                for (int64_t c = 0; c < s.c; ++c) dw[wat(k, i, j, c)] += a[at(n, iy, ix, c, s.c)] * g;
            }
        });
        return dw;
    }
};

}  // namespace cudnn_probe
