"""Benchmark the fused dilated block (global-context subnet layer) against cuDNN composed ops in the same run.

GPU: for each release shape (N = 64/256, Cin = 136 (first global layer) or 128, Cout = 128, 96x96, channels_last) and
dtype (bfloat16, float32 with TF32 as cuDNN's default), time
  conv   : Triton dilated_conv                          vs F.conv2d(dilation=4, padding=4)
  eval   : Triton dilated_block, folded BN, no dropout  vs F.conv2d + F.batch_norm(eval) + relu + *0.1
  train  : Triton dilated_block with a keep mask        vs the same composed + *mask/(1-p)
reporting median and 20/80 % quantiles (CUDA events), TFLOP/s (2*N*H*W*Cout*Cin*9 flops), % of the datasheet peak and
of a matrix product measured in the same run, and the speed-up over cuDNN.

CPU (no CUDA): only the reference path can run (Triton needs a GPU; the interpreter is not a speed path). ``--quick``
times the composed torch ops (oneDNN) at a small batch so the script runs anywhere; GPU figures are then unmeasured.
``--sm90-report`` needs no GPU: it compiles every autotune config for sm_90 as a channels_last release-shape launch
would specialise it, and reports registers, spill stack, shared memory and whether wgmma and cp.async are used.

Usage: python bench/bench_dilated_block.py [--quick | --sm90-report] [--batches 64 256] [--dtypes bf16 fp32]
Writes the results under "dilated_block" (or "dilated_block_sm90_compile") in bench/results/<device-slug>.json
(merged with other benches).
"""
from __future__ import annotations

import argparse
import collections
import importlib
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (datasheet_peak, device_name, environment, results_path, sm90_resources, time_reps,  # noqa: E402
                    write_results)

from lgc_fast.ops.dilated_block import dilated_block, dilated_conv  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DROPOUT_P = 0.1
ACT = 0.1
DILATION = 4


def _matmul_ceiling(device, dtype, reps):
    """TFLOP/s of a large matrix product in `dtype`; float32 uses TF32 exactly when cuDNN convolutions do."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        ms = time_reps(lambda: a @ b, device, 3, reps).median_ms
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _quantiles(t) -> list[float]:
    """[median, 20 %, 80 %] in ms, the order this bench's rows and tables use."""
    return [t.median_ms, t.p20_ms, t.p80_ms]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(n, c_in, c_out, hw, dtype, device, gen):
    x = torch.randn(n, c_in, hw, hw, device=device, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, device=device, generator=gen) / (3 * c_in**0.5)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(c_out, device=device, generator=gen) + 0.5
    beta = torch.randn(c_out, device=device, generator=gen) * 0.1
    mean = torch.randn(c_out, device=device, generator=gen) * 0.1
    var = torch.rand(c_out, device=device, generator=gen) + 0.5
    keep = torch.rand(n, c_out, hw, hw, device=device, generator=gen) >= DROPOUT_P
    keep = keep.contiguous(memory_format=torch.channels_last)
    return x, w, gamma, beta, mean, var, keep


def _composed(x, w, gamma, beta, mean, var, keep):
    z = F.conv2d(x, w, padding=DILATION, dilation=DILATION)
    y = torch.relu(F.batch_norm(z, mean.to(x.dtype), var.to(x.dtype), gamma.to(x.dtype), beta.to(x.dtype),
                                training=False, eps=1e-5)) * ACT
    if keep is not None:
        y = y * keep * (1.0 / (1.0 - DROPOUT_P))
    return y


def run_gpu(args, device):
    name = torch.cuda.get_device_name(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        ceiling = _matmul_ceiling(device, dtype, args.reps)
        peak = datasheet_peak(name, dtype)
        for n in args.batches:
            for c_in in args.cin:
                rows += _gpu_case(args, device, gen, dname, n, c_in, ceiling, peak)
                torch.cuda.empty_cache()  # the case's tensors died with its frame
    return name, rows


def _gpu_case(args, device, gen, dname, n, c_in, ceiling, peak) -> list[dict]:
    """The three variants of one (dtype, batch, input channels) case, Triton against cuDNN composed."""
    x, w, gamma, beta, mean, var, keep = _case(n, c_in, args.cout, args.hw, DTYPES[dname], device, gen)
    scale = gamma * torch.rsqrt(var + 1e-5)
    shift = beta - mean * scale
    flops = 2 * n * args.hw * args.hw * args.cout * c_in * 9
    variants = {
        "conv": (lambda: dilated_conv(x, w, backend="triton"),
                 lambda: F.conv2d(x, w, padding=DILATION, dilation=DILATION)),
        "eval": (lambda: dilated_block(x, w, scale, shift, backend="triton"),
                 lambda: _composed(x, w, gamma, beta, mean, var, None)),
        "train": (lambda: dilated_block(x, w, scale, shift, keep, dropout_p=DROPOUT_P, backend="triton"),
                  lambda: _composed(x, w, gamma, beta, mean, var, keep)),
    }
    rows = []
    for variant, (fast, base) in variants.items():
        err = _rel(fast(), base())
        t_fast = time_reps(fast, device, args.warmup, args.reps)
        t_base = time_reps(base, device, args.warmup, args.reps)
        tflops = flops / (t_fast.median_ms * 1e-3) / 1e12
        rows.append(dict(
            variant=variant, dtype=dname, n=n, c_in=c_in, c_out=args.cout, hw=args.hw,
            triton_ms=_quantiles(t_fast), cudnn_ms=_quantiles(t_base),
            triton_timing=t_fast.as_dict(), cudnn_timing=t_base.as_dict(),
            speedup=t_base.median_ms / t_fast.median_ms,
            triton_tflops=tflops, cudnn_tflops=flops / (t_base.median_ms * 1e-3) / 1e12,
            pct_datasheet_peak=None if peak is None else 100 * tflops / peak,
            pct_matmul_ceiling=100 * tflops / ceiling, matmul_ceiling_tflops=ceiling,
            rel_err_vs_cudnn=err))
    return rows


def run_cpu(args):
    gen = torch.Generator().manual_seed(0)
    rows = []
    dev = torch.device("cpu")
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for n in args.batches:
            for c_in in args.cin:
                x, w, gamma, beta, mean, var, keep = _case(n, c_in, args.cout, args.hw, dtype, dev, gen)
                scale = gamma * torch.rsqrt(var + 1e-5)
                shift = beta - mean * scale
                flops = 2 * n * args.hw * args.hw * args.cout * c_in * 9
                ref = time_reps(lambda: dilated_block(x, w, scale, shift, keep, dropout_p=DROPOUT_P, backend="ref"),
                                dev, args.warmup, args.reps)
                base = time_reps(lambda: _composed(x, w, gamma, beta, mean, var, keep), dev, args.warmup, args.reps)
                rows.append(dict(variant="train", dtype=dname, n=n, c_in=c_in, c_out=args.cout, hw=args.hw,
                                 ref_ms=_quantiles(ref), composed_ms=_quantiles(base), ref_timing=ref.as_dict(),
                                 composed_timing=base.as_dict(), ref_gflops=flops / (ref.median_ms * 1e-3) / 1e9,
                                 composed_gflops=flops / (base.median_ms * 1e-3) / 1e9))
    return device_name(dev), rows


def sm90_report(args):
    """Compile the kernel for sm_90 the way a channels_last launch at the release shape specialises it (ints equal
    to 1 become constants, ints and pointers divisible by 16 get the divisibility attribute); no GPU needed."""
    import triton

    kernels = importlib.import_module("lgc_fast.kernels.dilated_conv")
    kern = kernels.dilated_conv_kernel
    rows = []
    n, hw, c_out = args.batches[0], args.hw, args.cout
    for dname in args.dtypes:
        dt = dname  # the DTYPES keys are Triton's type names
        vec = 16 // torch.tensor([], dtype=DTYPES[dname]).element_size()
        for c_in in args.cin:
            ints = dict(n_pix=n * hw * hw, height=hw, width=hw, c_in=c_in, c_out=c_out,
                        sx_n=c_in * hw * hw, sx_c=1, sx_h=hw * c_in, sx_w=c_in,
                        sy_n=c_out * hw * hw, sy_c=1, sy_h=hw * c_out, sy_w=c_out,
                        sk_n=c_out * hw * hw, sk_c=1, sk_h=hw * c_out, sk_w=c_out)
            sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                   "keep_ptr": "*u8", "y_ptr": f"*{dt}"}
            attrs = {(kern.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if a.endswith("_ptr")}
            consts = {}
            for a, v in ints.items():
                sig[a] = "constexpr" if v == 1 else "i32"
                if v == 1:
                    consts[a] = 1
                elif v % 16 == 0:
                    attrs[(kern.arg_names.index(a),)] = [["tt.divisibility", 16]]
            for cfg in kernels.gpu_configs():
                flags = dict(DILATION=DILATION, EPILOGUE=True, CLAMP_ABOVE=False, HAS_MASK=True,
                             INPUT_PRECISION="tf32" if dt == "fp32" else "ieee", ACC_FP64=False, DOT_IN_FP32=False,
                             USE_INT64=False, VEC=vec, OUT_VEC=vec, **cfg.kwargs)
                full_sig = {**sig, **{k: "constexpr" for k in flags}}
                res = sm90_resources(kern, full_sig, {**consts, **flags}, attrs, cfg.num_warps, cfg.num_stages)
                regs, stack, ptx = res["regs"], res["spill_stack_bytes"], res["ptx"]
                loads = collections.Counter(re.findall(r"ld\.global[.\w]*", ptx))
                rows.append(dict(dtype=dname, c_in=c_in, c_out=c_out, **cfg.kwargs, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages, regs=regs, spill_stack_bytes=stack,
                                 shared_bytes=res["shared_bytes"], wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                                 cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared\.global", ptx)),
                                 ld_global=dict(loads)))
    return f"sm_90 compile (triton {triton.__version__}, no GPU)", rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small batch, few repetitions (CPU smoke run)")
    p.add_argument("--sm90-report", action="store_true", help="compile for sm_90 and report resources (no GPU)")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--cin", type=int, nargs="+", default=[136, 128])
    p.add_argument("--cout", type=int, default=128)
    p.add_argument("--hw", type=int, default=96)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.batches is None:
        args.batches = [2] if args.quick or not cuda else [64, 256]
    if args.dtypes is None:
        args.dtypes = ["bf16", "fp32"] if cuda or args.sm90_report else ["fp32"]
    if args.quick and not cuda and not args.sm90_report:
        args.cin = args.cin[:1]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 30)

    if args.sm90_report:
        measured_on, rows = sm90_report(args)
        note = "compile-only resource report; nothing timed"
    elif cuda:
        measured_on, rows = run_gpu(args, torch.device("cuda"))
        note = "GPU measured: Triton vs cuDNN composed, same run"
    else:
        measured_on, rows = run_cpu(args)
        note = "no CUDA device: only the reference (oneDNN) path timed; GPU figures unmeasured"
    device = torch.device("cuda" if cuda else "cpu")
    payload = dict(environment=environment(device), measured_on=measured_on, note=note,
                   tf32=torch.backends.cudnn.allow_tf32, args={k: str(v) for k, v in vars(args).items()}, rows=rows)
    bench = "dilated_block_sm90_compile" if args.sm90_report else "dilated_block"
    out = write_results(args.out or results_path(device), bench, payload)

    print(f"# {measured_on}; {note}")
    if args.sm90_report:
        print(f"{'dtype':5} {'Cin':>4} {'tile MxNxK':>12} {'w':>2} {'st':>2} {'regs':>4} {'spill':>5} {'smem KB':>7} "
              f"{'wgmma':>5} {'cp.async':>8}")
        for r in rows:
            tile = f"{r['BLOCK_M']}x{r['BLOCK_N']}x{r['BLOCK_K']}"
            print(f"{r['dtype']:5} {r['c_in']:>4} {tile:>12} {r['num_warps']:>2} {r['num_stages']:>2} {r['regs']:>4} "
                  f"{r['spill_stack_bytes']:>5} {r['shared_bytes'] / 1024:7.0f} {r['wgmma']:>5} {r['cp_async']:>8}")
    elif cuda:
        print(f"{'variant':6} {'dtype':5} {'N':>4} {'Cin':>4} {'triton ms (p20-p80)':>22} {'cuDNN ms':>9} "
              f"{'x':>5} {'TFLOP/s':>8} {'%peak':>6} {'%mm':>5} {'relerr':>8}")
        for r in rows:
            lo, hi = r["triton_ms"][1], r["triton_ms"][2]
            pk = "n/a" if r["pct_datasheet_peak"] is None else f"{r['pct_datasheet_peak']:.0f}"
            print(f"{r['variant']:6} {r['dtype']:5} {r['n']:>4} {r['c_in']:>4} "
                  f"{r['triton_ms'][0]:9.3f} ({lo:.3f}-{hi:.3f}) {r['cudnn_ms'][0]:9.3f} {r['speedup']:5.2f} "
                  f"{r['triton_tflops']:8.1f} {pk:>6} {r['pct_matmul_ceiling']:5.0f} {r['rel_err_vs_cudnn']:8.1e}")
    else:
        print(f"{'dtype':5} {'N':>4} {'Cin':>4} {'ref ms':>9} {'composed ms':>12} {'ref GFLOP/s':>12}")
        for r in rows:
            print(f"{r['dtype']:5} {r['n']:>4} {r['c_in']:>4} {r['ref_ms'][0]:9.2f} {r['composed_ms'][0]:12.2f} "
                  f"{r['ref_gflops']:12.1f}")
    print(f"# wrote {out} (key {bench})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
