"""Benchmark fused_conv (a convolution with the previous block's BatchNorm-apply / ReLU / dropout as its prologue and
its own statistics as its epilogue) against what the training step runs for the same work, in the same run.

GPU, per layer shape of the release network (the global subnet's first layer 136 -> 128 and its 128 -> 128, 3x3 at
dilation 4; the local subnet's 3x3 and 5x5), bf16 channels_last, batch --batch (default 128):
  conv   : the Triton kernel as a plain convolution (no prologue, no statistics)   vs F.conv2d (cuDNN)
  block  : fused_conv(z_prev, W, s, b, keep bits) -> z and its sums                 vs lgc_fast's epilogue on z_prev
           (statistics pass + apply pass writing the activation, keep bits given) and then F.conv2d
  block+store : the same kernel also writing the activation for the filter gradient, as conv_stack's training
           forward runs it (TritonGraphs.fprop with made_out)                      vs the same baseline
  block+store vs apply : the same                                                  vs a separate apply pass
           (lgc_fast's epilogue in eval form: the same read and write, no mask) and then F.conv2d: whether the
           prologue still pays now that the activation is written anyway
  dgrad  : the input-gradient kernel with BatchNorm backward's apply from (g, z) as its prologue, the previous
           block's gates and BatchNorm sums as its epilogue, and dz written for the filter gradient (conv_stack's
           TritonGraphs.dgrad with made_out)                                        vs cuDNN's plain input gradient
  wgrad  : the split-K filter-gradient kernel on the stored activation and dz, a plain convolution's filter gradient
           (TritonGraphs' default)                                                  vs cuDNN's plain filter gradient
  wgrad (remade) : the same kernel making both operands again in its prologues (operands="remade")
                                                                                    vs cuDNN's plain filter gradient
  (block, dgrad and wgrad (remade) do more than their baselines: the rows say how near the fused kernels come to
  cuDNN's bare convolutions, the question that decides whether conv_stack's Triton pieces can beat cuDNN plus the
  epilogue passes)
Timed with triton.testing.do_bench (CUDA events, L2 cleared between calls): median and 20/80 % quantiles, TFLOP/s
(2 * N*H*W * Cout * Cin * r*r), % of the datasheet's dense peak, and the speed-up over the baseline.

CPU: the Triton kernel runs only in the interpreter (not a speed path), so the rows time the reference against the
same baseline in torch at a small batch, to keep the script runnable anywhere; the GPU figures are then unmeasured.
``--sm90-report`` needs no GPU: it compiles the kernels for sm_90 for every config the autotuner keeps at these shapes
(the forward plain and with its prologue and statistics, also storing the activation; the input gradient with its
prologue and gate, also storing dz; the filter gradient on plain operands and with both prologues) and reports
registers, spilled bytes, shared memory, the wgmma / TMA instruction counts, the machine instructions of one iteration
of the MMA loop (loop_sass: with 8 warps, 2 x loop_sass issue cycles a SM against the about 500 of a 128 x 128 x 64 bf16
MMA step at the datasheet peak) and whether ptxas serialises the wgmmas. Each compile is specialised as a launch at
the GPU's batch (128) would be: pointers and the integers that are multiples of 16 (96, 128) marked so.

Usage: python bench/bench_fused_conv.py [--quick | --sm90-report] [--batch 128] [--layers global local3 ...]
Writes key "fused_conv" (or "fused_conv_sm90_compile") of bench/results/<device-slug>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (datasheet_peak, device_name, environment, format_table, op_bench_parser,  # noqa: E402
                    results_path, sm90_resources, time_cuda, time_reps, write_results)

from lgc_fast.ops.bn_finalize import bn_finalize  # noqa: E402
from lgc_fast.ops.bn_relu_dropout import bn_relu_dropout, pack_keep_mask  # noqa: E402
from lgc_fast.ops.fused_conv import fused_conv  # noqa: E402

# name: (Cin, Cout, filter size, dilation)
LAYERS = {"global_first": (136, 128, 3, 4), "global": (128, 128, 3, 4), "local3": (128, 128, 3, 1),
          "local5": (128, 128, 5, 1)}
FIRST_BLOCKS = ("global_first",)  # a stack's first block (the others: interior blocks)
DROPOUT_P = 0.1


def _case(layer, n, hw, dtype, device, gen):
    c_in, c_out, k, dil = LAYERS[layer]
    z_prev = torch.randn(n, c_in, hw, hw, device=device, generator=gen).to(dtype)
    z_prev = z_prev.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, k, k, device=device, generator=gen) / (k * c_in**0.5)).to(dtype)
    gamma = torch.rand(c_in, device=device, generator=gen) + 0.5
    beta = torch.randn(c_in, device=device, generator=gen) * 0.1
    keep = torch.rand(n, c_in, hw, hw, device=device, generator=gen) >= DROPOUT_P
    bits = pack_keep_mask(keep, memory_format=torch.channels_last)
    # the prologue's terms from z_prev's batch statistics, as conv_stack makes them (factor 0.1 / (1 - p))
    zf = z_prev.float()
    terms = bn_finalize(zf.sum((0, 2, 3)), (zf * zf).sum((0, 2, 3)), n * hw * hw, gamma, beta, None, None,
                        batch_stats=True, update_running=False, momentum=0.1, eps=1e-5, factor=0.1 / (1 - DROPOUT_P))
    return dict(z_prev=z_prev, weight=weight, gamma=gamma, beta=beta, bits=bits, terms=terms, s=terms.s, b=terms.b,
                k=k, dil=dil,
                flops=2 * n * hw * hw * c_out * c_in * k * k)


def _epilogue_then_conv(c):
    """The step's work for the same block: the previous block's epilogue (statistics, apply) writes the activation,
    which cuDNN convolves."""
    a = bn_relu_dropout(c["z_prev"], None, None, c["gamma"], c["beta"], training=True, dropout_p=DROPOUT_P,
                        keep_bits=c["bits"])
    return F.conv2d(a, c["weight"], padding=c["dil"] * (c["k"] // 2), dilation=c["dil"])


def _plain_triton(c):
    from lgc_fast.kernels.fused_conv import fused_conv_triton, pack_filter
    x, w = c["z_prev"], c["weight"]
    z = torch.empty(x.shape[0], w.shape[0], *x.shape[2:], dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    return fused_conv_triton(x, pack_filter(w), c["k"], c["dil"], z)


def _backward_operands(c, gen):
    """The block's backward operands: the gradient g at its BatchNorm output, its z and BatchNorm backward's terms
    (the previous block's BnTerms are the case's, from z_prev's statistics)."""
    x, w = c["z_prev"], c["weight"]
    shape = (x.shape[0], w.shape[0], *x.shape[2:])
    g, z = (torch.randn(shape, device=x.device, generator=gen).to(x.dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2))
    eq = tuple(torch.randn(w.shape[0], device=x.device, generator=gen) * 0.1 for _ in range(3))
    return g, z, *eq


def _apply_then_conv(c, mean, var):
    """The activation by a separate pass (lgc_fast's epilogue with running statistics mean, var: one read of z_prev,
    one write), then cuDNN's convolution."""
    a = bn_relu_dropout(c["z_prev"], mean, var, c["gamma"], c["beta"], training=False)
    return F.conv2d(a, c["weight"], padding=c["dil"] * (c["k"] // 2), dilation=c["dil"])


def _stored_variants(c, gen):
    """The Triton pieces as conv_stack's training step runs them (TritonGraphs' stored operands), and the filter
    gradient with its operands remade."""
    from lgc_fast.ops.conv_stack_triton import TritonGraphs
    pieces = TritonGraphs(c["z_prev"].dtype)
    dy, terms, prologue = _backward_operands(c, gen), c["terms"], (c["terms"], c["bits"])
    x, w, dil, pad = c["z_prev"], c["weight"], c["dil"], c["dil"] * (c["k"] // 2)
    a, dz = pieces.new_map(x), pieces.new_map(dy[0])
    pieces.fprop(x, w, dil, prologue, made_out=a)
    pieces.dgrad(dy, w, x.shape, dil, (x, terms, c["bits"], True), made_out=dz)
    cudnn_wgrad = lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy[0], padding=pad, dilation=dil)  # noqa: E731
    mean, var = torch.zeros(x.shape[1], device=x.device), torch.ones(x.shape[1], device=x.device)
    return {
        "block+store": (lambda: pieces.fprop(x, w, dil, prologue, made_out=a), lambda: _epilogue_then_conv(c)),
        "block+store vs apply": (lambda: pieces.fprop(x, w, dil, prologue, made_out=a),
                                 lambda: _apply_then_conv(c, mean, var)),
        "dgrad": (lambda: pieces.dgrad(dy, w, x.shape, dil, (x, terms, c["bits"], True), made_out=dz),
                  lambda: torch.nn.grad.conv2d_input(x.shape, w, dy[0], padding=pad, dilation=dil)),
        "wgrad": (lambda: pieces.wgrad(a, w.shape, dz, dil), cudnn_wgrad),
        "wgrad (remade)": (lambda: pieces.wgrad(x, w.shape, dy, dil, prologue), cudnn_wgrad),
    }


def run_gpu(args, device):
    gen = torch.Generator(device=device).manual_seed(0)
    peak = datasheet_peak(torch.cuda.get_device_name(device), torch.bfloat16)
    rows = []
    with torch.no_grad():
        for layer in args.layers:
            c = _case(layer, args.batch, args.hw, torch.bfloat16, device, gen)
            pad = c["dil"] * (c["k"] // 2)
            variants = {
                "conv": (lambda: _plain_triton(c),
                         lambda: F.conv2d(c["z_prev"], c["weight"], padding=pad, dilation=c["dil"])),
                "block": (lambda: fused_conv(c["z_prev"], c["weight"], c["s"], c["b"], c["bits"],
                                             dilation=c["dil"], backend="triton"),
                          lambda: _epilogue_then_conv(c)),
                **_stored_variants(c, gen),
            }
            for variant, (fast, base) in variants.items():
                fast()  # the autotuner's first call, outside the timing
                t_fast, t_base = time_cuda(fast), time_cuda(base)
                tflops = c["flops"] / (t_fast.median_ms * 1e-3) / 1e12
                rows.append(dict(layer=layer, variant=variant, n=args.batch, hw=args.hw, dtype="bf16",
                                 lgc_fast_ms=t_fast.median_ms, baseline_ms=t_base.median_ms,
                                 lgc_fast_timing=t_fast.as_dict(), baseline_timing=t_base.as_dict(),
                                 speedup=t_base.median_ms / t_fast.median_ms, lgc_fast_tflops=tflops,
                                 baseline_tflops=c["flops"] / (t_base.median_ms * 1e-3) / 1e12,
                                 pct_datasheet_peak=None if peak is None else 100 * tflops / peak))
            del c
            torch.cuda.empty_cache()
    return rows


def run_cpu(args):
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for layer in args.layers:
            c = _case(layer, args.batch, args.hw, torch.float32, "cpu", gen)
            t_ref = time_reps(lambda: fused_conv(c["z_prev"], c["weight"], c["s"], c["b"], c["bits"],
                                                 dilation=c["dil"], backend="ref"), "cpu", 1, args.reps)
            t_base = time_reps(lambda: _epilogue_then_conv(c), "cpu", 1, args.reps)
            rows.append(dict(layer=layer, variant="block (reference)", n=args.batch, hw=args.hw, dtype="fp32",
                             lgc_fast_ms=t_ref.median_ms, baseline_ms=t_base.median_ms,
                             lgc_fast_timing=t_ref.as_dict(), baseline_timing=t_base.as_dict(),
                             speedup=t_base.median_ms / t_ref.median_ms))
    return rows


def sm90_report(args):
    """Every config the autotuner keeps for each layer shape, compiled for sm_90 in the modes conv_stack runs it in: a
    stack's first block (global_first: no previous block, so no prologue in the forward, no gate in dgrad and only
    dz's in the filter gradient) or an interior block; and the plain convolution."""
    import triton

    from lgc_fast.kernels import fused_conv as kernels

    from lgc_fast.kernels import fused_conv_wgrad

    plain = ("forward", kernels.PROLOGUE_NONE, kernels.EPILOGUE_STORE, False)
    first_modes = [plain, ("forward+stats", kernels.PROLOGUE_NONE, kernels.EPILOGUE_STATS, False),
                   ("dgrad+dbn", kernels.PROLOGUE_DBN, kernels.EPILOGUE_STORE, False),
                   ("dgrad+dbn+store", kernels.PROLOGUE_DBN, kernels.EPILOGUE_STORE, True)]
    interior_modes = [plain, ("forward+prologue+stats", kernels.PROLOGUE_BN, kernels.EPILOGUE_STATS, False),
                      ("forward+prologue+stats+store", kernels.PROLOGUE_BN, kernels.EPILOGUE_STATS, True),
                      ("dgrad+dbn+gate", kernels.PROLOGUE_DBN, kernels.EPILOGUE_GATE, False),
                      ("dgrad+dbn+gate+store", kernels.PROLOGUE_DBN, kernels.EPILOGUE_GATE, True)]
    # the filter gradient: (piece, activation prologue, dBN prologue)
    first_wgrad = [("wgrad (stored operands)", False, False), ("wgrad+dbn", False, True)]
    interior_wgrad = [("wgrad (stored operands)", False, False), ("wgrad+prologue+dbn", True, True)]
    common = dict(ACC_FP64=False, INPUT_PRECISION="ieee", DOT_IN_FP32=False, USE_INT64=False)
    rows = []

    def report(fn, consts, config, layer, piece, tile, ints):
        """ints: the integer arguments' values at the layer's shape, for the launcher's specialisation."""
        types = (kernels if fn is kernels.fused_conv_kernel else fused_conv_wgrad).signature_types("bf16", "fp32",
                                                                                                 config)
        signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
        # what a launch tells the compiler: pointers (torch's allocations) and integers that are multiples of 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in consts
                 and (types[name].startswith("*") or ints.get(name, 1) % 16 == 0)}
        res = sm90_resources(fn, signature, consts, attrs, config.num_warps, config.num_stages)
        ptx = res.pop("ptx")
        rows.append(dict(layer=layer, piece=piece, tile=tile, num_warps=config.num_warps,
                         num_stages=config.num_stages, **res, wgmma=ptx.count("wgmma.mma_async"),
                         tma=ptx.count("cp.async.bulk.tensor")))

    for layer in args.layers:
        c_in, c_out, k, dil = LAYERS[layer]
        first = layer in FIRST_BLOCKS
        for piece, prologue, epilogue, store in first_modes if first else interior_modes:
            # the input gradient's GEMM runs from Cout to Cin
            gemm_k, n_out = (c_out, c_in) if prologue == kernels.PROLOGUE_DBN else (c_in, c_out)
            for config in kernels.kept_configs(kernels.gpu_configs(), n_out, torch.bfloat16.itemsize, prologue,
                                               epilogue, store):
                bh, bw, bn, bk = (config.kwargs[name] for name in ("BH", "BW", "BN", "BK"))
                consts = dict(common, KSIZE=k, DILATION=dil, PROLOGUE=prologue,
                              HAS_KEEP=prologue == kernels.PROLOGUE_BN, EPILOGUE=epilogue,
                              E_HAS_KEEP=epilogue == kernels.EPILOGUE_GATE, STORE_PROLOGUE=store,
                              **kernels.whole_flags(gemm_k, n_out), **config.kwargs)
                report(kernels.fused_conv_kernel, consts, config, layer, piece, f"{bh}x{bw}x{bn}x{bk}",
                       dict(height=args.hw, width=args.hw, c_in=gemm_k, c_out=n_out))
        for piece, a_prologue, dbn in first_wgrad if first else interior_wgrad:
            for config in fused_conv_wgrad.kept_configs(fused_conv_wgrad.gpu_configs(), c_in, c_out,
                                                        torch.bfloat16.itemsize, dbn=dbn,
                                                        prologue=a_prologue):
                bh, bw, bm, bn = (config.kwargs[name] for name in ("BH", "BW", "BM", "BN"))
                consts = dict(common, KSIZE=k, DILATION=dil, PROLOGUE=a_prologue, HAS_KEEP=a_prologue, DBN=dbn,
                              **fused_conv_wgrad.whole_flags(c_in, c_out), **config.kwargs)
                report(fused_conv_wgrad.fused_conv_wgrad_kernel, consts, config, layer, piece, f"{bh}x{bw}x{bm}x{bn}",
                       dict(n_img=args.batch, height=args.hw, width=args.hw, c_in=c_in, c_out=c_out))
    return f"sm_90 compile (triton {triton.__version__}, no GPU)", rows


def main(argv=None) -> int:
    p = op_bench_parser(__doc__, "batch 2, 32 px, two layers (CPU)", "128 on a GPU, 4 on the CPU")
    p.add_argument("--sm90-report", action="store_true", help="compile for sm_90 and report resources (no GPU)")
    p.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    p.add_argument("--hw", type=int, default=96)
    p.add_argument("--reps", type=int, default=5, help="timed calls a method on the CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.hw, args.layers, args.reps = args.batch or 2, 32, args.layers[:2], 3
    args.batch = args.batch or (128 if device.type == "cuda" or args.sm90_report else 4)

    if args.sm90_report:
        measured_on, rows = sm90_report(args)
        note, bench = "compile-only resource report; nothing timed", "fused_conv_sm90_compile"
        columns = [(k, k) for k in ("layer", "piece", "tile", "num_warps", "num_stages", "regs",
                                    "spill_stack_bytes", "shared_bytes", "wgmma", "tma", "loop_sass",
                                    "wgmma_serialized")]
    elif device.type == "cuda":
        measured_on, rows = device_name(device), run_gpu(args, device)
        note, bench = "GPU measured: Triton against cuDNN (+ lgc_fast's epilogue passes), same run", "fused_conv"
        columns = [("layer", "layer"), ("variant", "variant"), ("lgc_fast_ms", "fused ms"),
                   ("baseline_ms", "baseline ms"), ("speedup", "x"), ("lgc_fast_tflops", "TFLOP/s"),
                   ("pct_datasheet_peak", "% peak")]
    else:
        measured_on, rows = device_name(device), run_cpu(args)
        note = "no CUDA device: the reference against the same torch baseline; the GPU figures are unmeasured"
        bench = "fused_conv"
        columns = [("layer", "layer"), ("variant", "variant"), ("lgc_fast_ms", "reference ms"),
                   ("baseline_ms", "baseline ms"), ("speedup", "x")]
    payload = dict(environment=environment(device), measured_on=measured_on, note=note,
                   args={k: str(v) for k, v in vars(args).items()}, rows=rows)
    out = write_results(args.out or results_path(device), bench, payload)
    print(f"# {measured_on}; {note}")
    print(format_table(rows, columns))
    print(f"# wrote {out} (key {bench})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
