"""Benchmark the layout ops and what they replace in the training step, forward + backward, in the same run.

Cases, on the release network's head maps (N x 128 features, 68 landmarks, 96 x 96; bf16 on a GPU, fp32 on the CPU):
  head conv   : the 1x1 output convolution of channels_last features: lgc_fast's pointwise_conv_planar (a batched
                GEMM writing a planar map) against F.conv2d (channels_last output: what kernel_conv and the loss then
                transpose) and F.conv2d followed by .contiguous();
  kernel_conv : lgc_fast's kernel_conv of a planar map against the same op on a channels_last map (the two layout
                changes per call the planar heads remove);
  cat         : joining the two planar 68-channel maps into the global subnet's channels_last input, and the
                backward's split: channels_last_cat (on CUDA one batched transpose per part) against torch.cat then
                .contiguous(channels_last).
Timed in interleaved rounds (bench/common.py); reported are medians, 20/80 % quantiles, the speed-up over the torch
form in the same run, and (GPU) the bandwidth of the bytes each method must move at least (inputs read once, outputs
written once, forward and backward) against the datasheet peak. `python bench/bench_train_step.py --modes
lgc_fast-fused lgc_fast-fused-nhwc-heads` measures the whole step with and without the planar heads.

Usage:
  python bench/bench_layout.py [--quick] [--batch N] [--budget-s S] [--out PATH]
Writes the results under "layout" in bench/results/<device-slug>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (environment, format_table, op_bench_parser, peak_bandwidth, results_path,  # noqa: E402
                    time_interleaved, write_results)

from lgc_fast.ops.kernel_conv import kernel_conv  # noqa: E402
from lgc_fast.ops.layout import channels_last_cat, layout_backend, pointwise_conv_planar  # noqa: E402

BENCH = "layout"
SIZE = 96
LANDMARKS = 68
CL = torch.channels_last


def fwd_bwd(fn, inputs):
    """A step: fn(*inputs) forward and backward with a ones gradient (inputs' .grad cleared first)."""
    def step():
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return step


def leaf(shape, dtype, device, memory_format=torch.contiguous_format, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=memory_format).requires_grad_()


def cases(n: int, width: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[dict, int, str]]:
    """{case: ({method: step}, bytes the fastest form moves at least, baseline method)}."""
    feats = leaf((n, width, SIZE, SIZE), dtype, device, CL)
    weight = leaf((LANDMARKS, width, 1, 1), dtype, device, scale=width ** -0.5)
    bias = leaf((LANDMARKS,), dtype, device)
    planar = leaf((n, LANDMARKS, SIZE, SIZE), dtype, device)
    second = leaf((n, LANDMARKS, SIZE, SIZE), dtype, device)
    channels_last = leaf((n, LANDMARKS, SIZE, SIZE), dtype, device, CL)
    item = feats.element_size()
    feats_bytes, map_bytes = feats.numel() * item, planar.numel() * item
    backend = layout_backend(device)
    return {
        # forward: features read, map written; backward: gradient and features read, features' gradient written
        "head conv": ({
            "lgc_fast pointwise_conv_planar": fwd_bwd(pointwise_conv_planar, [feats, weight, bias]),
            "torch conv2d (channels_last out)": fwd_bwd(F.conv2d, [feats, weight, bias]),
            "torch conv2d + contiguous": fwd_bwd(lambda x, w, b: F.conv2d(x, w, b).contiguous(),
                                                 [feats, weight, bias]),
        }, 3 * feats_bytes + 2 * map_bytes, "torch conv2d + contiguous"),
        "kernel_conv": ({
            "lgc_fast kernel_conv, planar map": fwd_bwd(kernel_conv, [planar]),
            "lgc_fast kernel_conv, channels_last map": fwd_bwd(kernel_conv, [channels_last]),
        }, 4 * map_bytes, "lgc_fast kernel_conv, channels_last map"),
        "cat": ({
            f"lgc_fast channels_last_cat ({backend})": fwd_bwd(lambda a, b: channels_last_cat([a, b], backend),
                                                             [planar, second]),
            "torch cat + contiguous(channels_last)": fwd_bwd(
                lambda a, b: torch.cat([a, b], 1).contiguous(memory_format=CL), [planar, second]),
        }, 8 * map_bytes, "torch cat + contiguous(channels_last)"),
    }


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__, "batch 2, 16 features, 1 s budget", "128 on a GPU, 4 on the CPU")
    parser.add_argument("--width", type=int, default=128, help="features of the 1x1 convolutions (128)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timed calls per case (3)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.batch or (2 if args.quick else 128 if gpu else 4)
    width = 16 if args.quick else args.width
    budget = 1.0 if args.quick else args.budget_s or 3.0
    dtype = torch.bfloat16 if gpu else torch.float32
    env = environment(device)
    print(f"layout ops fwd+bwd, {n} x {width} -> {LANDMARKS} x {SIZE} x {SIZE} {dtype} on {env['device']}; "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if gpu else None
    rows = []
    for case, (methods, min_bytes, baseline) in cases(n, width, dtype, device).items():
        timings = time_interleaved(methods, device, warmup=2, min_runs=5, budget_s=budget)
        for name, t in timings.items():
            gbps = min_bytes / (t.median_ms / 1e3) / 1e9
            rows.append({"case": case, "method": name, "baseline": baseline, **t.as_dict(),
                         "speedup_vs_torch": timings[baseline].median_ms / t.median_ms,
                         "min_traffic_gb_per_s": gbps,
                         "pct_of_peak_bandwidth": 100 * gbps * 1e9 / peak if peak else None})
    print(format_table(rows, [("case", "case"), ("method", "method"), ("median_ms", "ms"), ("p20_ms", "p20"),
                              ("p80_ms", "p80"), ("speedup_vs_torch", "speed-up"),
                              ("min_traffic_gb_per_s", "GB/s"), ("pct_of_peak_bandwidth", "% peak")]))
    payload = {"environment": env, "batch": n, "width": width, "landmarks": LANDMARKS, "size": SIZE,
               "dtype": str(dtype).replace("torch.", ""), "results": rows}
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
