"""Benchmark the fused training loss (forward + backward) against the torch composition in the same run.

Shape N x 68 x 96 x 96 (N = 16 on the CPU, 256 on a GPU). For each fused backend that runs on the device (cpu; or
cuda and triton) and dtype, time
  fused fwd      : lgc_loss(local, omega, points, labelled, backend=...) under no_grad
  fused fwd+bwd  : the same with autograd, then loss.sum().backward()
  torch fwd+bwd  : lgc_loss_ref (dense splat + 45x45 depthwise F.conv2d + elementwise ops) with autograd, likewise
reporting median and 20/80 % quantiles in ms (CUDA events on a GPU, perf_counter on the CPU) and the speed-up
torch / fused of the forward+backward medians, plus the largest relative difference of the two losses.

Usage:
  python bench/bench_lgc_loss.py [--quick] [--batch N] [--dtypes fp32 bf16] [--reps R] [--ref-reps R] [--out PATH]
Writes the results under "lgc_loss" in bench/results/<device-slug>.json (merged with other benches).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, results_path, time_reps, write_results  # noqa: E402

import lgc_fast  # noqa: E402
from lgc_fast.ops import lgc_loss, lgc_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LANDMARKS = 68
SIZE = 96
BENCH = "lgc_loss"
GPU_TARGET = 10.0  # the fused forward+backward should beat the torch composition by this factor on a GPU


def make_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Maps like a network's early in training, points mostly inside the 96 x 96 crop, ~5 % unlabelled (NaN)."""
    g = torch.Generator().manual_seed(seed)
    local = (torch.randn(n, LANDMARKS, SIZE, SIZE, generator=g) * 0.1).to(device=device, dtype=dtype)
    omega = (torch.randn(n, LANDMARKS, SIZE, SIZE, generator=g) * 0.1).to(device=device, dtype=dtype)
    points = (torch.rand(n, LANDMARKS, 2, generator=g) * (SIZE + 10) - 5).to(device)
    labelled = (torch.rand(n, LANDMARKS, generator=g) > 0.05).to(device)
    points[~labelled] = float("nan")
    return local, omega, points, labelled


def _fwd_bwd(loss_fn, local, omega, points, labelled):
    def run():
        local.grad = omega.grad = None
        loss_fn(local, omega, points, labelled).sum().backward()
    return run


def bench_case(device, dtype_name, backend, n, reps, ref_reps, ref_result):
    dtype = DTYPES[dtype_name]
    local, omega, points, labelled = make_inputs(n, dtype, device)
    local.requires_grad_()
    omega.requires_grad_()

    def fused_loss(l, o, p, lab):
        return lgc_loss(l, o, p, lab, backend=backend)

    def fused_fwd():
        with torch.no_grad():
            fused_loss(local, omega, points, labelled)

    with torch.no_grad():
        fused_value = fused_loss(local, omega, points, labelled)
        if ref_result is None:
            ref_value = lgc_loss_ref(local, omega, points, labelled)
        else:
            ref_value = ref_result["value"]
    rel_diff = ((fused_value.double() - ref_value.double()).abs() / ref_value.double().abs().clamp_min(1e-30)).max()
    row = {
        "backend": backend, "dtype": dtype_name,
        "fused_fwd": time_reps(fused_fwd, device, 2, reps).as_dict(),
        "fused_fwd_bwd": time_reps(_fwd_bwd(fused_loss, local, omega, points, labelled), device, 2, reps).as_dict(),
        "max_rel_diff_vs_torch": rel_diff.item(),
    }
    if ref_result is None:
        ref_timing = time_reps(_fwd_bwd(lgc_loss_ref, local, omega, points, labelled), device, 1, ref_reps).as_dict()
        ref_result = {"value": ref_value, "timing": ref_timing}
    row["torch_fwd_bwd"] = ref_result["timing"]
    row["speedup_fwd_bwd"] = row["torch_fwd_bwd"]["median_ms"] / row["fused_fwd_bwd"]["median_ms"]
    return row, ref_result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 2, 3 timed calls, 1 of the torch one")
    parser.add_argument("--batch", type=int, help="faces N (default 256 on a GPU, 16 on the CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default fp32 bf16 (GPU), fp32 (CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls of the fused op (default 50 GPU, 20 CPU)")
    parser.add_argument("--ref-reps", type=int, default=None, help="timed calls of the torch composition (20 / 3)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.batch or (2 if args.quick else 256 if gpu else 16)
    dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    reps = args.reps or (3 if args.quick else 50 if gpu else 20)
    ref_reps = args.ref_reps or (1 if args.quick else 20 if gpu else 3)
    report = lgc_fast.backends()
    backends = [b for b in (("cuda", "triton") if gpu else ("cpu",)) if report[b][0]]
    if not backends:
        print(f"no fused backend runs on {device}: " + "; ".join(f"{b}: {report[b][1]}" for b in report))
        return 1

    env = environment(device)
    print(f"lgc_loss fwd+bwd, {n} x {LANDMARKS} x {SIZE} x {SIZE} on {env['device']}; torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit']}")
    print(f"{'backend':8} {'dtype':5} {'fused fwd ms':>22} {'fused fwd+bwd ms':>22} {'torch fwd+bwd ms':>24} "
          f"{'speed-up':>9} {'rel diff':>9}")
    rows = []
    for dtype_name in dtypes:
        ref_result = None
        for backend in backends:
            row, ref_result = bench_case(device, dtype_name, backend, n, reps, ref_reps, ref_result)
            rows.append(row)

            def fmt(t):
                return f"{t['median_ms']:9.3f} [{t['p20_ms']:.3f}, {t['p80_ms']:.3f}]"
            print(f"{backend:8} {dtype_name:5} {fmt(row['fused_fwd']):>22} {fmt(row['fused_fwd_bwd']):>22} "
                  f"{fmt(row['torch_fwd_bwd']):>24} {row['speedup_fwd_bwd']:8.1f}x "
                  f"{row['max_rel_diff_vs_torch']:9.1e}")
    if gpu:
        worst = min(r["speedup_fwd_bwd"] for r in rows if r["backend"] == "cuda") if "cuda" in backends else None
        print(f"GPU target: >= {GPU_TARGET:.0f}x forward+backward; cuda worst {worst}")

    payload = {
        "environment": env, "shape": [n, LANDMARKS, SIZE, SIZE], "reps": reps, "ref_reps": ref_reps,
        "baseline": "lgc_loss_ref with autograd (dense splat + 45x45 depthwise conv2d + elementwise)",
        "gpu_target_speedup_fwd_bwd": GPU_TARGET, "results": rows,
    }
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
