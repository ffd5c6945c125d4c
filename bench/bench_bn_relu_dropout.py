"""Benchmark a conv block's epilogue (BatchNorm with batch statistics + ReLU + 0.1 scale + dropout), forward +
backward as training runs it, against torch in the same run.

Methods, on the same (N, C, 96, 96) map z (the conv output; channels_last on a GPU, both layouts on the CPU), each
drawing its own dropout mask:
  lgc_fast B        : lgc_fast.ops.bn_relu_dropout on kernel backend B (on a GPU: cuda, the CUDA C++ kernels, and
                      triton; on the CPU: cpu, the C++ kernels) with a byte mask (one byte per value:
                      random_keep_mask)
  lgc_fast B bits   : the same with keep bits (one bit per value: random_keep_bits), drawn before the op
  lgc_fast B drawn  : the same keep bits drawn by the forward pass itself, as ConvBlock runs it
                      (bn_relu_dropout_drawn; on CUDA the apply kernel draws them for float16/bfloat16 maps)
  lgc_fast B seeded : the same with dropout_seed: the kernels draw the mask with Philox, forward and again backward
                      (no mask in memory; ConvBlock's seeded_dropout)
  torch eager       : F.batch_norm, relu, * 0.1, F.dropout: what nn.BatchNorm2d + ReLU + Dropout run
  torch compiled    : the same function under torch.compile (inductor fuses the elementwise parts)
A second case, a 2 x 8 x 4 x 4 map (fp32), measures what a call costs beyond its memory traffic: the host's
dispatch and autograd work per conv block, which bounds small-batch training steps (unless CUDA graphs replay them).
Timed in interleaved rounds (bench/common.py); reported are medians and 20/80 % quantiles, each method's speed-up
over torch eager and torch compiled, and (GPU) the achieved bandwidth of each lgc_fast method against the datasheet
peak for the traffic its four passes need at least: z read twice forward and twice backward, the output gradient read
twice, y and dz written once, and for the byte mask (keep bits), its write and three reads of 1 (1/8) byte a value
(drawn bits: a write and two reads).

Usage:
  python bench/bench_bn_relu_dropout.py [--quick] [--batch N] [--channels C] [--dtypes bf16 fp32]
                                        [--layouts contiguous channels_last] [--backends cuda triton]
                                        [--no-overhead] [--out PATH]
Writes the results under "bn_relu_dropout" in bench/results/<device-slug>.json.
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

from lgc_fast import _backend  # noqa: E402
from lgc_fast.ops.bn_relu_dropout import (bn_relu_dropout, bn_relu_dropout_drawn, random_keep_bits,  # noqa: E402
                                          random_keep_mask)
from lgc_fast.ops.dilated_block import ACTIVATION_SCALE, DROPOUT_P  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
BENCH = "bn_relu_dropout"
SIZE = 96
OVERHEAD_SHAPE = (2, 8, 4, 4)  # a map so small that the per-call host work dominates


def torch_epilogue(z, running_mean, running_var, weight, bias):
    y = torch.relu(F.batch_norm(z, running_mean, running_var, weight, bias, training=True))
    return F.dropout(y * ACTIVATION_SCALE, DROPOUT_P, training=True)


# method suffix -> the dropout form
DROPOUT_FORMS = {"": "byte mask", " bits": "keep bits", " drawn": "drawn bits", " seeded": "seeded"}


def lgc_fast_epilogue(backend: str, form: str):
    def epilogue(z, running_mean, running_var, weight, bias):
        if form == "seeded":
            seed = torch.randint(2**62, (1,), device=z.device)
            return bn_relu_dropout(z, running_mean, running_var, weight, bias, training=True, dropout_seed=seed,
                                   backend=backend)
        if form == "drawn bits":
            return bn_relu_dropout_drawn(z, running_mean, running_var, weight, bias, backend=backend)[0]
        if form == "keep bits":
            bits = random_keep_bits(z, DROPOUT_P, backend)
            return bn_relu_dropout(z, running_mean, running_var, weight, bias, training=True, keep_bits=bits,
                                   backend=backend)
        keep = random_keep_mask(z, DROPOUT_P, backend)
        return bn_relu_dropout(z, running_mean, running_var, weight, bias, keep, training=True, backend=backend)
    return epilogue


def min_traffic_bytes(z: torch.Tensor, form: str) -> float:
    """Bytes the fused forward + backward must move at least (see the module docstring)."""
    mask_bytes = {"byte mask": 4.0, "keep bits": 0.5, "drawn bits": 0.375, "seeded": 0.0}[form]
    return z.numel() * (8 * z.element_size() + mask_bytes)


def make_step(fn, z, grad, params):
    def step():
        z.grad = None
        for p in params[2:]:
            p.grad = None
        fn(z, *params).backward(grad)
    return step


def bench_dtype(device, dtype_name, layout, shape, budget_s, compile_torch, backends):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(0)
    c = shape[1]
    z = (torch.randn(shape, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    z = z.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    params = [torch.zeros(c, device=device), torch.ones(c, device=device), weight, bias]
    methods = {"torch eager": make_step(torch_epilogue, z, grad, params)}
    for backend in backends:
        for suffix, form in DROPOUT_FORMS.items():
            methods[f"lgc_fast {backend}{suffix}"] = make_step(lgc_fast_epilogue(backend, form), z, grad, params)
    if compile_torch:
        methods["torch compiled"] = make_step(torch.compile(torch_epilogue), z, grad, params)
    timings = time_interleaved(methods, device, warmup=3, min_runs=5, budget_s=budget_s)
    rows = []
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for name, t in timings.items():
        row = {"dtype": dtype_name, "layout": layout, "shape": list(shape), "method": name, **t.as_dict()}
        if name.startswith("lgc_fast"):
            row["backend"] = name.split()[1]
            row["dropout"] = DROPOUT_FORMS[name[len("lgc_fast " + row["backend"]):]]
            gbps = min_traffic_bytes(z, row["dropout"]) / (t.median_ms / 1e3) / 1e9
            row["min_traffic_gb_per_s"] = gbps
            row["pct_of_peak_bandwidth"] = 100 * gbps * 1e9 / peak if peak else None
        for baseline, key in (("torch eager", "speedup_vs_eager"), ("torch compiled", "speedup_vs_compiled")):
            if baseline in timings:
                row[key] = timings[baseline].median_ms / t.median_ms  # > 1: this method is faster
        rows.append(row)
    return rows


def kernel_backends(device: torch.device) -> list[str]:
    """The op's kernel backends usable on `device`, in the automatic choice's order."""
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    return [name for name in candidates if _backend._usable(name, device)[0]]


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__, "batch 2, 16 channels, 1 s budget", "64 on a GPU, 4 on the CPU")
    parser.add_argument("--channels", type=int, default=128, help="C (the release's width: 128)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default bf16 fp32 (GPU), fp32 (CPU)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS),
                        help="default channels_last (GPU), contiguous channels_last (CPU)")
    parser.add_argument("--backends", nargs="+", choices=("cuda", "triton", "cpu"),
                        help="kernel backends to time (default: every one usable on the device)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timed calls per dtype (5; CPU 3)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile method")
    parser.add_argument("--no-overhead", action="store_true",
                        help=f"leave out the per-call overhead case ({'x'.join(map(str, OVERHEAD_SHAPE))}, fp32)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.batch or (2 if args.quick else 64 if gpu else 4)
    c = 16 if args.quick else args.channels
    budget = 1.0 if args.quick else args.budget_s or (5.0 if gpu else 3.0)
    dtypes = args.dtypes or (["bf16", "fp32"] if gpu else ["fp32"])
    env = environment(device)
    layouts = args.layouts or (["channels_last"] if gpu else ["contiguous", "channels_last"])
    backends = args.backends or kernel_backends(device)
    for name in backends:
        ok, why = _backend._usable(name, device)
        if not ok:
            parser.error(f"--backends {name}: not usable on {device}: {why}")
    print(f"bn_relu_dropout fwd+bwd (training), {n} x {c} x {SIZE} x {SIZE} on {env['device']}; "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    rows = []
    cases = [(dtype_name, layout, (n, c, SIZE, SIZE)) for dtype_name in dtypes for layout in layouts]
    if not args.no_overhead:
        cases.append(("fp32", layouts[-1], OVERHEAD_SHAPE))
    for dtype_name, layout, shape in cases:
        rows += bench_dtype(device, dtype_name, layout, shape, budget, compile_torch=gpu and not args.no_compile,
                            backends=backends)
    print(format_table(rows, [("dtype", "dtype"), ("layout", "layout"), ("shape", "shape"), ("method", "method"),
                              ("median_ms", "ms"),
                              ("p20_ms", "p20"), ("p80_ms", "p80"), ("speedup_vs_eager", "vs eager"),
                              ("speedup_vs_compiled", "vs compiled"), ("min_traffic_gb_per_s", "GB/s"),
                              ("pct_of_peak_bandwidth", "% peak")]))
    payload = {"environment": env, "batch": n, "channels": c, "size": SIZE, "dropout_p": DROPOUT_P,
               "baselines": "torch eager (F.batch_norm + relu + scale + F.dropout) and the same under torch.compile",
               "results": rows}
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
