"""Benchmark lgc_fast.ops.same_conv2d at each convolution shape of the release network (96x96, channels_last).

Per layer (the 1-channel first layer twice: its image with channels_last strides, as a channels_last LGCN passes it,
and with planar ones, as it did before), in the same run (interleaved rounds, bench/common.py):
  forward     F.conv2d (cuDNN's forward kernels: what nn.Conv2d runs; the baseline) against F.conv_transpose2d with
              the transposed, flipped filter (the data-gradient kernels);
  input grad  the data-gradient kernels (what autograd runs for nn.Conv2d; the baseline) against F.conv2d with the
              transposed, flipped filter (the forward kernels); not for the 1-channel first layer, whose input (the
              image) needs no gradient;
  fwd+bwd     F.conv2d and its autograd backward (the baseline) against same_conv2d(via="auto") and its backward,
              each direction on the family it measured faster at its first call.
Reported: the median and 20/80 % quantiles, TFLOP/s (2 N H W C_out C_in k^2 a direction; the weight gradient counts
in fwd+bwd), % of the datasheet's dense tensor-core peak on a GPU, the speed-up over the baseline, and the choices
that "auto" recorded with both families' times.

Usage:
  python bench/bench_same_conv2d.py                      # GPU: batch 128, bfloat16
  python bench/bench_same_conv2d.py --batch 2            # CPU (float32 unless --dtype bf16)
  python bench/bench_same_conv2d.py --quick [--out PATH.json]
Writes the results under "same_conv2d" in bench/results/<device-slug>.json (or --out).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (datasheet_peak, environment, format_table, op_bench_parser, results_path,  # noqa: E402
                    time_interleaved, write_results)

from lgc_fast.ops.layout import channels_last_strided  # noqa: E402
from lgc_fast.ops.same_conv2d import (clear_same_conv2d_choices, same_conv2d, same_conv2d_choices,  # noqa: E402
                                      transposed_filter)

BENCH = "same_conv2d"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WIDTH = 128
SIZE = 96
# (name, input channels, kernel size, dilation, x's layout): the release network's distinct convolution shapes; the
# 1-channel image with channels_last strides (as a channels_last LGCN passes it to its first layer) and with planar
# strides (as it did before; .contiguous(memory_format=channels_last) keeps those), which send oneDNN's and cuDNN's
# kernels down different paths and give a channels_last or a planar output
CL, PLANAR = torch.channels_last, torch.contiguous_format
LAYERS = [("local 5x5, first, channels_last image", 1, 5, 1, CL), ("local 5x5, first, planar image", 1, 5, 1, PLANAR),
          ("local 5x5", WIDTH, 5, 1, CL), ("local 3x3", WIDTH, 3, 1, CL), ("global, first", 136, 3, 4, CL),
          ("global", WIDTH, 3, 4, CL)]


def layer_methods(n: int, c: int, k: int, dilation: int, x_format: torch.memory_format, dtype: torch.dtype,
                  device: torch.device):
    """{direction: {method: fn}} for one layer; the first method of each direction is its baseline."""
    g = torch.Generator(device=device).manual_seed(0)
    fmt = torch.channels_last
    x = torch.randn(n, c, SIZE, SIZE, generator=g, device=device, dtype=dtype)
    x = channels_last_strided(x) if x_format == CL else x
    # the filter as the model holds it: .contiguous(memory_format=channels_last) leaves a 1-channel one planar
    weight = (torch.randn(WIDTH, c, k, k, generator=g, device=device) / (c * k * k) ** 0.5).to(dtype)
    weight = weight.contiguous(memory_format=fmt)
    grad = torch.randn(n, WIDTH, SIZE, SIZE, generator=g, device=device, dtype=dtype).contiguous(memory_format=fmt)
    pad = dilation * (k // 2)
    other = transposed_filter(weight)  # in the weight's layout, as same_conv2d makes it
    methods = {"forward": {
        "F.conv2d (fprop)": lambda: F.conv2d(x, weight, padding=pad, dilation=dilation),
        "F.conv_transpose2d (dgrad)": lambda: F.conv_transpose2d(x, other, padding=pad, dilation=dilation)}}
    if c > 1:
        methods["input grad"] = {
            "F.conv_transpose2d (dgrad)": lambda: F.conv_transpose2d(grad, weight, padding=pad, dilation=dilation),
            "F.conv2d (fprop)": lambda: F.conv2d(grad, other, padding=pad, dilation=dilation)}
    x_leaf = x.detach().requires_grad_(c > 1)
    w_leaf = weight.detach().requires_grad_()

    def train(conv):
        def run():
            x_leaf.grad = w_leaf.grad = None
            conv(x_leaf, w_leaf).backward(grad)
        return run

    methods["fwd+bwd"] = {
        "F.conv2d + autograd": train(lambda a, b: F.conv2d(a, b, padding=pad, dilation=dilation)),
        "same_conv2d (auto)": train(lambda a, b: same_conv2d(a, b, None, dilation))}
    return methods


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__, "batch 2 (GPU 8), a 0.5 s budget a layer", "128 on a GPU, 2 on the CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--budget-s", type=float, default=3.0, help="seconds of timing a direction")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    n = args.batch or ((8 if gpu else 2) if args.quick else (128 if gpu else 2))
    budget = 0.5 if args.quick else args.budget_s
    torch.backends.cudnn.benchmark = gpu  # as lgc-fast train does
    env = environment(device)
    peak = datasheet_peak(env["device"], dtype) if gpu else None
    print(f"same_conv2d: batch {n}, {WIDTH} filters, {SIZE}x{SIZE} channels_last {dtype}, on {env['device']}; torch "
          f"{env['torch']}, commit {env['commit']}")
    clear_same_conv2d_choices()
    rows = []
    for name, c, k, dilation, x_format in LAYERS:
        flop = 2.0 * n * SIZE * SIZE * WIDTH * c * k * k
        for direction, methods in layer_methods(n, c, k, dilation, x_format, dtype, device).items():
            timings = time_interleaved(methods, device, warmup=2, min_runs=5, budget_s=budget)
            baseline = next(iter(timings.values())).median_ms
            passes = (3 if c > 1 else 2) if direction == "fwd+bwd" else 1
            for method, t in timings.items():
                tflops = passes * flop / (t.median_ms * 1e-3) / 1e12
                rows.append({"layer": name, "c_in": c, "kernel": k, "dilation": dilation, "direction": direction,
                             "method": method, **t.as_dict(), "tflops": tflops,
                             "pct_datasheet_peak": None if peak is None else 100 * tflops / peak,
                             "speedup_vs_baseline": baseline / t.median_ms})
    print(format_table(rows, [("layer", "layer"), ("direction", "direction"), ("method", "method"),
                              ("median_ms", "ms"), ("p20_ms", "p20"), ("p80_ms", "p80"), ("tflops", "TFLOP/s"),
                              ("pct_datasheet_peak", "% peak"), ("speedup_vs_baseline", "speed-up")]))
    choices = same_conv2d_choices()
    for choice in choices:
        print(f"auto: {choice['direction']:10s} input {choice['input']} weight {choice['weight']} dilation "
              f"{choice['dilation']}: {choice['via']} (fprop {choice['fprop_ms']:.3f} ms, dgrad "
              f"{choice['dgrad_ms']:.3f} ms)")
    if not gpu:
        print("on the CPU 'auto' measures nothing and runs F.conv2d: its row is the baseline's")
    payload = {"environment": env, "batch": n, "dtype": str(dtype).replace("torch.", ""), "size": SIZE,
               "width": WIDTH, "layout": "channels_last", "datasheet_peak_tflops": peak, "results": rows,
               "auto_choices": choices}
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
