"""Benchmark a stack of conv blocks forward + backward as lgc_fast.ops.conv_stack against what the training step runs
now, in the same run: the global subnet's seven blocks (136 -> 128, then 128 -> 128, 3x3, dilation 4, 96 x 96).

Methods (each a fresh copy of the same blocks, training mode, dropout 0.1):
  modules + fused epilogue : the ConvBlocks as LGCN runs them by default on a GPU (cuDNN convolutions, then
                             lgc_fast's bn_relu_dropout per block: LGCN.fuse_epilogues);
  modules                  : the ConvBlocks with torch's BatchNorm, ReLU and dropout;
  conv_stack (cudnn)       : conv_stack on cuDNN's fused graphs (LGCN.use_conv_stacks), where lgc_fast._C has them and
                             every graph builds (else the row says why it is missing), each graph on the first plan
                             cuDNN's heuristics offer;
  conv_stack (cudnn, N plans timed): the same with each graph's first N plans timed once and the fastest running
                             (conv_stack's cudnn_plans=N, --cudnn-plans; 4); the results keep every graph's plans and
                             times (cudnn_plan_report);
  conv_stack (triton)      : conv_stack on lgc_fast's own Triton kernels (graphs="triton": fused_conv's forward and
                             input-gradient kernel, the split-K filter-gradient kernel on the activations and dz they
                             store), where they run (else the row says why it is missing);
  conv_stack (triton, remade): the same with the filter gradient making both operands again in its prologues
                             (TritonGraphs(operands="remade"): no activation kept, more work in the filter gradient);
  conv_stack (torch)       : the same pieces as torch functions (the oracle; slower than the modules by design).
Timed in interleaved rounds (bench/common.py): medians, 20/80 % quantiles, the speed-up over "modules + fused
epilogue", and (GPU) TFLOP/s of the stack's convolutions (forward + both backward convolutions: 3x the forward FLOPs).
On a GPU, bfloat16 channels_last maps; on the CPU float32 at a small batch.

Usage:
  python bench/bench_conv_stack.py [--quick] [--batch N] [--budget-s S] [--out PATH]
Writes the results under "conv_stack" in bench/results/<device-slug>.json.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, format_table, op_bench_parser, results_path, time_interleaved, write_results  # noqa

from lgc_fast.model import ConvBlock, run_blocks  # noqa: E402
from lgc_fast.ops.conv_stack import conv_stack, cudnn_plan_report, cudnn_unusable, stack_graphs  # noqa: E402
from lgc_fast.ops.conv_stack_triton import TritonGraphs, triton_unusable  # noqa: E402

BENCH = "conv_stack"
SIZE = 96
DILATION = 4


def make_blocks(c_in: int, width: int, layers: int, device, fused: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = [ConvBlock(c_in if i == 0 else width, width, 3, dilation=DILATION) for i in range(layers)]
    for block in blocks:
        block.fused_epilogue = fused
    return torch.nn.Sequential(*blocks).to(device).train()


def step_of(forward, blocks: torch.nn.Sequential, x: torch.Tensor, dtype: torch.dtype):
    """Forward and backward of `forward(blocks, x)` under autocast to `dtype` (GPU) with a ones gradient."""
    params = list(blocks.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with torch.autocast(x.device.type, dtype=dtype, enabled=x.is_cuda):
            out = forward(blocks, x)
        out.backward(torch.ones_like(out))
    return step


def stack_forward(graphs, cudnn_plans: int = 1):
    def forward(blocks, x):
        bns = [b.bn for b in blocks]
        xin = x.to(torch.get_autocast_dtype("cuda")) if x.is_cuda else x
        return conv_stack(xin, [b.conv.weight for b in blocks], [bn.weight for bn in bns], [bn.bias for bn in bns],
                          [bn.running_mean for bn in bns], [bn.running_var for bn in bns], dilation=DILATION,
                          graphs=graphs, cudnn_plans=cudnn_plans)
    return forward


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__, "batch 2, width 16, 3 layers, 1 s budget", "128 on a GPU, 2 on the CPU")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--in-channels", type=int, default=136, help="the first block's input channels (136)")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds of timed calls per method (5)")
    parser.add_argument("--cudnn-plans", type=int, default=4,
                        help="plans each graph times once in the tuned cuDNN row (4; 1 leaves the row out)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.batch or (2 if args.quick or not gpu else 128)
    width, layers = (16, 3) if args.quick else (args.width, args.layers)
    c_in = 16 if args.quick else args.in_channels
    budget = 1.0 if args.quick else args.budget_s or 5.0
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.backends.cudnn.benchmark = gpu  # as lgc-fast train does
    env = environment(device)
    print(f"conv stack fwd+bwd: {layers} blocks {c_in} -> {width}, 3x3 dilation {DILATION}, {n} x {SIZE}^2, {dtype} "
          f"on {env['device']}; torch {env['torch']}, commit {env['commit']}")
    fmt = torch.channels_last if gpu else torch.contiguous_format
    x = torch.randn(n, c_in, SIZE, SIZE, device=device).contiguous(memory_format=fmt).requires_grad_()
    base = make_blocks(c_in, width, layers, device, fused=False).to(memory_format=fmt)
    fused = copy.deepcopy(base)
    for block in fused:
        block.fused_epilogue = True
    methods = {
        "modules + fused epilogue": step_of(lambda b, v: b(v), fused, x, dtype),
        "modules": step_of(lambda b, v: b(v), base, x, dtype),
        "conv_stack (torch)": step_of(stack_forward("torch"), copy.deepcopy(base), x, dtype),
    }
    weights = [b.conv.weight for b in base]
    why = cudnn_unusable(x.to(dtype), weights, DILATION, 0.1, True) if gpu else ["not a CUDA device"]
    plan_reports, tuned_why, masks = {}, [], None
    if not why:
        methods["conv_stack (cudnn)"] = step_of(stack_forward("cudnn"), copy.deepcopy(base), x, dtype)
        methods["LGCN.use_conv_stacks path"] = step_of(lambda b, v: run_blocks(b, v, conv_stacks=True),
                                                       copy.deepcopy(base), x, dtype)
        plan_reports["1"] = cudnn_plan_report(x.to(dtype), weights, DILATION, 0.1, True)
        masks = stack_graphs(x.to(dtype), weights, DILATION, 0.1, True).mask
        print(f"conv_stack (cudnn): keep masks {'drawn by cuDNN RNG op' if masks == 'rng' else 'as byte maps'}")
        tuned_why = cudnn_unusable(x.to(dtype), weights, DILATION, 0.1, True, cudnn_plans=args.cudnn_plans)
        if args.cudnn_plans > 1 and not tuned_why:  # building the tuned graphs times their plans, before any round
            methods[f"conv_stack (cudnn, {args.cudnn_plans} plans timed)"] = step_of(
                stack_forward("cudnn", args.cudnn_plans), copy.deepcopy(base), x, dtype)
            plan_reports[str(args.cudnn_plans)] = cudnn_plan_report(x.to(dtype), weights, DILATION, 0.1, True,
                                                                    cudnn_plans=args.cudnn_plans)
    triton_why = triton_unusable(x.to(dtype), weights) if gpu else ["not a CUDA device (the interpreter is no speed "
                                                                     "path)"]
    if not triton_why:
        methods["conv_stack (triton)"] = step_of(stack_forward("triton"), copy.deepcopy(base), x, dtype)
        methods["conv_stack (triton, remade)"] = step_of(stack_forward(TritonGraphs(dtype, operands="remade")),
                                                         copy.deepcopy(base), x, dtype)
    timings = time_interleaved(methods, device, warmup=3, min_runs=5, budget_s=budget,
                               runs={"conv_stack (torch)": 3 if gpu else 5})
    flops = 3 * sum(2 * n * SIZE * SIZE * w.shape[0] * w.shape[1] * 9 for w in weights)
    baseline = timings["modules + fused epilogue"].median_ms
    rows = [{"method": name, **t.as_dict(), "speedup_vs_step": baseline / t.median_ms,
             "conv_tflop_per_s": flops / (t.median_ms / 1e3) / 1e12 if gpu else None} for name, t in timings.items()]
    if why:
        rows.append({"method": "conv_stack (cudnn)", "missing": "; ".join(why)})
    if triton_why:
        rows.append({"method": "conv_stack (triton)", "missing": "; ".join(triton_why)})
    if tuned_why:
        rows.append({"method": f"conv_stack (cudnn, {args.cudnn_plans} plans timed)", "missing": "; ".join(tuned_why)})
    print(format_table(rows, [("method", "method"), ("median_ms", "ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
                              ("speedup_vs_step", "speed-up"), ("conv_tflop_per_s", "TFLOP/s")]))
    if why:
        print(f"conv_stack (cudnn) not timed: {'; '.join(why)}")
    payload = {"environment": env, "batch": n, "width": width, "layers": layers, "in_channels": c_in, "size": SIZE,
               "dilation": DILATION, "dtype": str(dtype).replace("torch.", ""), "results": rows,
               "cudnn_plans": plan_reports, "cudnn_masks": masks}
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
