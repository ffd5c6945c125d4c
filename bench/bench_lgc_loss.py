"""Benchmark the fused training loss (forward + backward) against the torch composition in the same run.

Shape N x 68 x 96 x 96 (N = 16 on the CPU, 256 on a GPU). For each fused backend that runs on the device (cpu; or
cuda and triton) and dtype, time
  fused fwd      : lgc_loss(local, omega, points, labelled, backend=...) under no_grad
  fused fwd+bwd  : the same with autograd, then loss.sum().backward()
  torch fwd+bwd  : lgc_loss_ref (dense splat + 45x45 depthwise F.conv2d + elementwise ops) with autograd, likewise
reporting median and 20/80 % quantiles in ms (CUDA events on a GPU, perf_counter on the CPU) and the speed-up
torch / fused of the forward+backward medians, plus the largest relative difference of the two losses.

Self-contained timer (bench/common.py did not exist when this was written). Usage:
  python bench/bench_lgc_loss.py [--batch N] [--dtypes fp32 bf16] [--reps R] [--ref-reps R] [--out PATH]
Writes JSON to bench/results/lgc_loss_<cpu or cuda>.json (atomic replace).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lgc_fast  # noqa: E402
from lgc_fast.ops import lgc_loss, lgc_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LANDMARKS = 68
SIZE = 96
GPU_TARGET = 10.0  # the fused forward+backward should beat the torch composition by this factor on a GPU


def _time(fn, device: torch.device, warmup: int, reps: int) -> dict:
    """Milliseconds per call: median and 20/80 % quantiles."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "q20_ms": q[1], "q80_ms": q[7], "reps": reps}


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
        "fused_fwd": _time(fused_fwd, device, 2, reps),
        "fused_fwd_bwd": _time(_fwd_bwd(fused_loss, local, omega, points, labelled), device, 2, reps),
        "max_rel_diff_vs_torch": rel_diff.item(),
    }
    if ref_result is None:
        ref_timing = _time(_fwd_bwd(lgc_loss_ref, local, omega, points, labelled), device, 1, ref_reps)
        ref_result = {"value": ref_value, "timing": ref_timing}
    row["torch_fwd_bwd"] = ref_result["timing"]
    row["speedup_fwd_bwd"] = row["torch_fwd_bwd"]["median_ms"] / row["fused_fwd_bwd"]["median_ms"]
    return row, ref_result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="faces N (default 256 on a GPU, 16 on the CPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default fp32 bf16 (GPU), fp32 (CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls of the fused op (default 50 GPU, 20 CPU)")
    parser.add_argument("--ref-reps", type=int, default=None, help="timed calls of the torch composition (20 / 3)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/lgc_loss_<cpu or cuda>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.batch or (256 if gpu else 16)
    dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    reps = args.reps or (50 if gpu else 20)
    ref_reps = args.ref_reps or (20 if gpu else 3)
    report = lgc_fast.backends()
    backends = [b for b in (("cuda", "triton") if gpu else ("cpu",)) if report[b][0]]
    if not backends:
        print(f"no fused backend runs on {device}: " + "; ".join(f"{b}: {report[b][1]}" for b in report))
        return 1

    name = _device_name(device)
    print(f"lgc_loss fwd+bwd, {n} x {LANDMARKS} x {SIZE} x {SIZE} on {name} ({torch.get_num_threads()} CPU threads)")
    print(f"{'backend':8} {'dtype':5} {'fused fwd ms':>22} {'fused fwd+bwd ms':>22} {'torch fwd+bwd ms':>24} "
          f"{'speed-up':>9} {'rel diff':>9}")
    rows = []
    for dtype_name in dtypes:
        ref_result = None
        for backend in backends:
            row, ref_result = bench_case(device, dtype_name, backend, n, reps, ref_reps, ref_result)
            rows.append(row)

            def fmt(t):
                return f"{t['median_ms']:9.3f} [{t['q20_ms']:.3f}, {t['q80_ms']:.3f}]"
            print(f"{backend:8} {dtype_name:5} {fmt(row['fused_fwd']):>22} {fmt(row['fused_fwd_bwd']):>22} "
                  f"{fmt(row['torch_fwd_bwd']):>24} {row['speedup_fwd_bwd']:8.1f}x "
                  f"{row['max_rel_diff_vs_torch']:9.1e}")
    if gpu:
        worst = min(r["speedup_fwd_bwd"] for r in rows if r["backend"] == "cuda") if "cuda" in backends else None
        print(f"GPU target: >= {GPU_TARGET:.0f}x forward+backward; cuda worst {worst}")

    payload = {
        "op": "lgc_loss", "device": name, "device_type": device.type, "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "shape": [n, LANDMARKS, SIZE, SIZE],
        "baseline": "lgc_loss_ref with autograd (dense splat + 45x45 depthwise conv2d + elementwise)",
        "gpu_target_speedup_fwd_bwd": GPU_TARGET, "results": rows,
    }
    out = args.out or ROOT / "bench" / "results" / f"lgc_loss_{device.type}.json"
    _write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
