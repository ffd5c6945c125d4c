"""Benchmark lgc_fast.kernel_conv (every fast backend available on the device) against the alternatives, all in the
same run, forward and forward+backward, float32.

Alternatives (all compute the same 45x45 convolution, zero padding):
  conv2d        F.conv2d depthwise with the dense 45x45 kernel (= kernel_conv_ref, the torch baseline)
  gemm          banded-matrix form Y = sum_s (1/5) A_s X B_s, one pair of matmuls per Gaussian (A_s, B_s: the
                H x H and W x W banded Toeplitz matrices of g_s)
  gemm_stacked  the same as two large matmuls: X [B_1 .. B_5], then [A_1 .. A_5] on the stacked results
  cv2_filter2D  (CPU) cv2.filter2D per plane with the dense kernel (OpenCV switches to a DFT for large kernels)
  cv2_sep_x5    (CPU) five cv2.sepFilter2D per plane, summed
Backward of the alternatives: autograd for the torch ones; for cv2 a second call on the output gradient (K is
symmetric, so the input gradient is the same convolution of the output gradient).
Also per fast backend, the network's scaled form: kernel_conv(x, scale=0.01) against kernel_conv(x) * 0.01 (the
multiply as a pass of its own, forward and backward), rows "<backend> scale=0.01" / "<backend> then * 0.01".

Timing: on CUDA triton.testing.do_bench (median, 20/80 % quantiles); on the CPU warm-up then rounds of one call per
method (interleaved, so the load of other processes hits all alike), median and quantiles of the rounds. Methods too
slow to run whole on the CPU (dense conv2d on large maps, dense banded matrices of 1024-pixel sides) are timed on a few
channels and scaled to all (depthwise work is linear in the channels); such rows say so. On CUDA: GB/s of the
compulsory traffic (read x, write y; twice that with the backward) and % of the device's datasheet bandwidth.

OpenMP threads wait passively here (OMP_WAIT_POLICY=passive unless the environment sets it): on a CPU shared with
other processes, threads that spin at barriers and between calls burn the time slices their team needs, which
slowed every OpenMP user in this run (our kernel, conv2d and the matmuls alike) by up to 5x on a loaded 2-core
machine. Run with OMP_WAIT_POLICY=active to measure the spinning default.

Usage: python bench/bench_kernel_conv.py [--quick] [--sizes NxCxHxW ...] [--device cpu|cuda] [--out PATH]
Default sizes: CPU 8x68x96x96 and 1x68x1024x1024, CUDA 256x68x96x96 and 1x68x1024x1024.
Writes the results under "kernel_conv" in bench/results/<device-slug>.json (merged with other benches).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read once, when torch loads the OpenMP runtime

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (environment, format_table, peak_bandwidth, results_path, time_cuda,  # noqa: E402
                    time_interleaved, write_results)

import lgc_fast  # noqa: E402
from lgc_fast.ops.kernel_conv import KERNEL_SIZE, RADIUS, WEIGHT, kernel_2d, kernel_conv, kernel_taps  # noqa: E402

BENCH = "kernel_conv"
DEFAULT_SIZES = {"cpu": ["8x68x96x96", "1x68x1024x1024"], "cuda": ["256x68x96x96", "1x68x1024x1024"]}
QUICK_SIZES = {"cpu": ["2x68x96x96", "1x68x512x512"], "cuda": ["64x68x96x96", "1x68x1024x1024"]}
# CPU work (multiply-adds per call) above which an alternative is timed on a channel subset of about
# CPU_SUBSET_MACS and scaled.
CPU_MAX_MACS = 12e9
CPU_SUBSET_MACS = 3e9
SLOW_RUNS = 3  # timed calls of the methods that take seconds on the CPU


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--sizes: expected NxCxHxW with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def band_matrices(n: int, device) -> torch.Tensor:
    """(5, n, n) float32: A_s[i, j] = g_s[i - j] for |i - j| <= 22 (symmetric, so A_s^T = A_s)."""
    g = kernel_taps(torch.float64, device)
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    inside = d.abs() <= RADIUS
    return torch.where(inside, g[:, (d + RADIUS).clamp(0, KERNEL_SIZE - 1)], 0.0).float()


def make_conv2d(device):
    kernel = kernel_2d(torch.float32, device)

    def conv2d(x):
        c = x.shape[1]
        return F.conv2d(x, kernel.expand(c, 1, KERNEL_SIZE, KERNEL_SIZE), padding=RADIUS, groups=c)
    return conv2d


def make_gemm(h: int, w: int, device):
    rows = band_matrices(h, device) * WEIGHT
    cols = band_matrices(w, device)

    def gemm(x):
        y = rows[0] @ x @ cols[0]
        for s in range(1, 5):
            y = y + rows[s] @ x @ cols[s]
        return y
    return gemm


def make_gemm_stacked(h: int, w: int, device):
    rows = band_matrices(h, device) * WEIGHT                   # (5, H, H)
    rows_cat_t = rows.permute(0, 2, 1).reshape(5 * h, h)       # [A_1 .. A_5]^T: (5H, H)
    cols_cat = band_matrices(w, device).permute(1, 0, 2).reshape(w, 5 * w)  # [B_1 .. B_5]: (W, 5W)

    def gemm_stacked(x):
        n, c = x.shape[:2]
        t = (x @ cols_cat).view(n, c, h, 5, w)                 # X B_s for every s
        t = t.permute(0, 1, 4, 3, 2).reshape(n, c, w, 5 * h)   # per plane: [T_1^T .. T_5^T]
        return (t @ rows_cat_t).transpose(2, 3)                # (sum_s A_s T_s)^T transposed back
    return gemm_stacked


def make_cv2(kind: str, threads: int):
    import cv2
    kernel = kernel_2d(torch.float32).numpy()
    g = kernel_taps(torch.float32).numpy()
    pool = ThreadPoolExecutor(threads)

    def one(plane, out):
        if kind == "filter2D":
            cv2.filter2D(plane, -1, kernel, dst=out, borderType=cv2.BORDER_CONSTANT)
        else:
            out[...] = 0.0
            for s in range(5):
                out += cv2.sepFilter2D(plane, -1, g[s] * WEIGHT, g[s], borderType=cv2.BORDER_CONSTANT)

    def run(x):
        planes = x.detach().reshape(-1, *x.shape[2:]).numpy()
        y = torch.empty_like(x)
        out = y.view(-1, *x.shape[2:]).numpy()
        chunks = [range(i, planes.shape[0], threads) for i in range(threads)]
        list(pool.map(lambda idx: [one(planes[i], out[i]) for i in idx], chunks))
        return y
    return run


def alternatives(size, device) -> dict:
    h, w = size[2:]
    alts = {"conv2d": make_conv2d(device), "gemm": make_gemm(h, w, device),
            "gemm_stacked": make_gemm_stacked(h, w, device)}
    if device.type == "cpu":
        try:
            import cv2  # noqa: F401
        except ImportError:
            print("opencv not installed: cv2 alternatives skipped")
        else:
            alts["cv2_filter2D"] = make_cv2("filter2D", torch.get_num_threads())
            alts["cv2_sep_x5"] = make_cv2("sep", torch.get_num_threads())
    return alts


def macs_per_plane(name: str, h: int, w: int) -> float:
    """Multiply-adds per plane: what decides whether an alternative is run whole on the CPU."""
    if name == "conv2d":
        return h * w * KERNEL_SIZE**2
    if name.startswith("gemm"):
        return 5 * (h * w * w + h * h * w)
    return 0.0


def fast_backends(device) -> list[str]:
    report = lgc_fast.backends()
    names = []
    for name in ("cuda", "triton", "cpu"):
        ok, why = report[name]
        if name == "triton" and device.type == "cpu":
            print("triton on the CPU is the interpreter, not a speed path: not timed")
            continue
        if name == "cuda" and device.type != "cuda" or name == "cpu" and device.type != "cpu":
            continue
        if ok:
            names.append(name)
        else:
            print(f"backend {name} not available: {why}")
    return names


def forward_backward(fn, x, grad):
    """One forward and backward of fn at x (gradient w.r.t. x only)."""
    def run():
        xg = x.detach().requires_grad_()
        fn(xg).backward(grad)
        return xg.grad
    return run


def forward_backward_cv2(fn, x, grad):
    return lambda: (fn(x), fn(grad))


def bench_size(size, device, args) -> list[dict]:
    n, c, h, w = size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(size, generator=gen).to(device)
    grad = torch.randn(size, generator=gen).to(device)
    label = "x".join(map(str, size))
    rows = []
    methods = {b: (lambda t, b=b: kernel_conv(t, backend=b)) for b in fast_backends(device)}
    backend_names = set(methods)
    alts = alternatives(size, device)
    scaled = {}  # name -> channels actually run, for alternatives timed on a subset
    for name in alts:
        macs = macs_per_plane(name, h, w) * n * c
        if device.type == "cpu" and macs > CPU_MAX_MACS and c > 1:
            scaled[name] = max(1, int(c * CPU_SUBSET_MACS / macs))
    methods.update(alts)

    reference = kernel_conv(x, backend=next(iter(backend_names))) if backend_names else alts["conv2d"](x)
    errors = {}
    for name, fn in methods.items():
        cs = scaled.get(name, c)
        got = fn(x[:, :cs].contiguous())
        errors[name] = ((got - reference[:, :cs]).abs().max() / reference[:, :cs].abs().max()).item()

    for mode in ("fwd", "fwd+bwd"):
        # The dense conv2d backward on maps where even its forward had to be scaled would take minutes per call.
        skip_conv2d = mode == "fwd+bwd" and "conv2d" in scaled
        fns = {}
        for name, fn in methods.items():
            if skip_conv2d and name == "conv2d":
                continue
            cs = scaled.get(name, c)
            xs, gs = x[:, :cs].contiguous(), grad[:, :cs].contiguous()
            if mode == "fwd":
                fns[name] = (lambda fn=fn, xs=xs: fn(xs))
            elif name.startswith("cv2"):
                fns[name] = forward_backward_cv2(fn, xs, gs)
            else:
                fns[name] = forward_backward(fn, xs, gs)
        if device.type == "cuda":
            timings = {name: time_cuda(fn, rep_ms=args.rep_ms) for name, fn in fns.items()}
        else:
            slow = [name for name in fns if name == "conv2d" or name in scaled]
            # The error check above ran every forward once (their warm-up); slow methods are warm enough after it.
            warmup = {name: 0 if mode == "fwd" or name in slow else 1 for name in fns}
            timings = time_interleaved(fns, device, warmup=warmup, min_runs=args.min_runs, max_runs=args.max_runs,
                                       budget_s=args.budget_s, runs={name: SLOW_RUNS for name in slow})
        for name in scaled:
            if name in timings:
                timings[name] = timings[name].scaled(c / scaled[name], f"timed on {scaled[name]}/{c} channels, scaled")
        alt_medians = {k: v.median_ms for k, v in timings.items() if k not in backend_names}
        fastest_alt = min(alt_medians, key=alt_medians.get) if alt_medians else None
        traffic = (2 if mode == "fwd" else 4) * x.numel() * x.element_size()
        peak = peak_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        for name, t in timings.items():
            row = {"size": label, "pass": mode, "method": name, "kind": "lgc_fast" if name in backend_names else
                   "alternative", "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "runs": t.runs,
                   "cpu_ms": t.cpu_median_ms, "max_rel_err": errors[name], "note": t.note}
            if fastest_alt is not None:
                row["x_fastest_alt"] = alt_medians[fastest_alt] / t.median_ms
                row["fastest_alt"] = fastest_alt
            if "conv2d" in timings:
                row["x_conv2d"] = timings["conv2d"].median_ms / t.median_ms
            if device.type == "cuda":
                row["gb_per_s"] = traffic / (t.median_ms * 1e-3) / 1e9
                row["pct_peak_bw"] = None if peak is None else 100 * traffic / (t.median_ms * 1e-3) / peak
            row["timing"] = t.as_dict()
            rows.append(row)
        if skip_conv2d:
            print(f"{label} {mode}: conv2d not timed (its dense 45x45 backward is prohibitively slow on this CPU)")
    return rows + bench_scale(x, grad, label, sorted(backend_names), device, args)


def bench_scale(x, grad, label: str, backends: list[str], device, args, scale: float = 0.01) -> list[dict]:
    """The scale applied inside the kernels against a separate multiply, per fast backend, fwd and fwd+bwd."""
    # backend -> ((name, kind, fn) inside, (name, kind, fn) after)
    pairs = {b: ((f"{b} scale={scale:g}", "lgc_fast scale", lambda t, b=b: kernel_conv(t, backend=b, scale=scale)),
                 (f"{b} then * {scale:g}", "alternative scale", lambda t, b=b: kernel_conv(t, backend=b) * scale))
             for b in backends}
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fns = {name: (lambda fn=fn: fn(x)) if mode == "fwd" else forward_backward(fn, x, grad)
               for pair in pairs.values() for name, _, fn in pair}
        if not fns:
            continue
        if device.type == "cuda":
            timings = {name: time_cuda(fn, rep_ms=args.rep_ms) for name, fn in fns.items()}
        else:
            timings = time_interleaved(fns, device, min_runs=args.min_runs, max_runs=args.max_runs,
                                       budget_s=args.budget_s)
        for pair in pairs.values():
            after = pair[1][0]
            for name, kind, _ in pair:
                t = timings[name]
                rows.append({"size": label, "pass": mode, "method": name, "kind": kind, "median_ms": t.median_ms,
                             "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "runs": t.runs, "cpu_ms": t.cpu_median_ms,
                             "x_fastest_alt": timings[after].median_ms / t.median_ms, "fastest_alt": after,
                             "note": t.note, "timing": t.as_dict()})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", type=parse_size, help="NxCxHxW sizes (default: see the module doc)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (a smoke run)")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    p.add_argument("--min-runs", type=int, default=None, help="CPU: timed calls per method at least")
    p.add_argument("--max-runs", type=int, default=None, help="CPU: timed calls per method at most")
    p.add_argument("--budget-s", type=float, default=None,
                   help="CPU: seconds in the fast methods after which rounds stop (once --min-runs are done)")
    p.add_argument("--rep-ms", type=float, default=None, help="CUDA: do_bench repetition time per method")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    # Full float32 everywhere: TF32 would make the cuDNN/cuBLAS alternatives less accurate than the others.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = args.sizes or [parse_size(s) for s in (QUICK_SIZES if args.quick else DEFAULT_SIZES)[device.type]]
    defaults = (3, 5, 2.0, 50.0) if args.quick else (7, 30, 20.0, 300.0)
    for key, value in zip(("min_runs", "max_runs", "budget_s", "rep_ms"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)

    env = environment(device)
    print(f"kernel_conv bench on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}, OMP_WAIT_POLICY={env['omp_wait_policy']}, "
          f"load average {env.get('load_average_1min', 'n/a')}")
    rows = []
    for size in sizes:
        rows += bench_size(size, device, args)
    columns = [("size", "size"), ("pass", "pass"), ("method", "method"), ("median_ms", "median ms"),
               ("p20_ms", "p20"), ("p80_ms", "p80"), ("runs", "runs"), ("x_fastest_alt", "x fastest alt"),
               ("x_conv2d", "x conv2d"), ("max_rel_err", "max rel err")]
    if device.type == "cuda":
        columns += [("gb_per_s", "GB/s"), ("pct_peak_bw", "% peak BW")]
    else:
        columns.insert(7, ("cpu_ms", "cpu ms"))
    columns.append(("note", "note"))
    print(format_table(rows, columns))
    print("x fastest alt / x conv2d: median time of the fastest alternative / of conv2d over the row's median "
          "(> 1: the row is faster). max rel err: max |y - y_lgc| / max |y_lgc| on the forward.")
    if device.type == "cpu":
        print("cpu ms: median process CPU time per call over all threads (less sensitive to other processes' load "
              "than wall time; includes OpenMP threads' spin-waiting).")
    out = args.out or results_path(device)
    payload = {"environment": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "sizes": ["x".join(map(str, s)) for s in sizes], "results": rows}
    print(f"wrote {write_results(out, BENCH, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
