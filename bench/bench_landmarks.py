"""Benchmark landmark inference with given boxes (``Detector.landmarks``: crop, network, PCA shape fit, decoder) in
faces/s, lgc_fast against the plain-torch reference ops in the same run.

Modes on the same batch: lgc_fast (the automatic backends, the network as ``Detector`` runs it: its BatchNorms
folded into the convolutions, channels_last; float32), lgc_fast-fp16 (on CUDA: the same with
Detector(precision="float16")) or lgc_fast-bf16 (on a CPU with hardware bfloat16: precision "bfloat16", which the
Detector's default "auto" picks there; each row also gives the largest distance of its points from lgc_fast's, in
image pixels), lgc_fast-modules (the same with the network as trained:
torch's BatchNorm, ReLU, scale and dropout modules, contiguous) and eager-ref (every lgc_fast op on its reference path: LGC_FAST_BACKEND=ref, the
network's modules; the shape fit is then the per-face NumPy oracle). The faces are the bundled astronaut's,
with the box jittered per face (up to 5 % of its size), so every crop differs. Timed in interleaved rounds
(bench/common.py); reported are the median and 20/80 % quantiles per call, faces/s and the speed-up, and on CUDA the
peak memory of one call.

Usage: python bench/bench_landmarks.py [--weights W | --width W] [--batch-sizes 1 16] [--quick] [--out PATH]
  --width W: a randomly initialised release network of that width instead of trained weights (e.g. 128 on a GPU;
  the time does not depend on the weights' values, only the shape fit's work does a little).
Writes the results under "landmarks" in bench/results/<device-slug>.json (merged with other benches).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import environment, format_table, results_path, time_interleaved, write_results  # noqa: E402

import lgc_fast  # noqa: E402
from lgc_fast._backend import ENV_VAR, native_bf16_cpu  # noqa: E402
from lgc_fast.demo import DEMO_IMAGE, demo_box  # noqa: E402
from lgc_fast.detect import Detector, load_gray  # noqa: E402
from lgc_fast.model import LGCN  # noqa: E402

BENCH = "landmarks"
MODES = ("eager-ref", "lgc_fast-modules", "lgc_fast")
REDUCED = {"cuda": ("lgc_fast-fp16", "float16"), "cpu": ("lgc_fast-bf16", "bfloat16")}  # mode, Detector precision


def jittered_boxes(count: int, seed: int = 0) -> np.ndarray:
    """(count, 4) boxes around the demo face, each shifted and scaled by up to 5 % of its size."""
    x0, y0, x1, y1 = demo_box()
    size = x1 - x0
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-0.05, 0.05, size=(count, 2)) * size
    scale = rng.uniform(0.95, 1.05, size=count)
    cx, cy = (x0 + x1) / 2 + shift[:, 0], (y0 + y1) / 2 + shift[:, 1]
    half = size * scale / 2
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def max_point_shift(faces_a, faces_b) -> float:
    """The largest distance between corresponding points of two landmarks() results for the same boxes (pixels)."""
    return max(float(np.linalg.norm(a.points - b.points, axis=1).max()) for a, b in zip(faces_a, faces_b))


def make_call(mode: str, detector: Detector, image: np.ndarray, boxes: np.ndarray):
    """The mode's call; `detector` runs the folded network ("lgc_fast") or, for the other modes, its modules."""
    def call():
        if mode == "eager-ref":
            os.environ[ENV_VAR] = "ref"
        try:
            with torch.no_grad():
                return detector.landmarks(image, boxes)
        finally:
            os.environ.pop(ENV_VAR, None)
    return call


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint or exported weights (default: the bundled model)")
    p.add_argument("--width", type=int, default=None, help="a random release network of this width instead")
    p.add_argument("--image-size", type=int, default=96, help="crop size of the --width network (default 96)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256] if cuda else [1, 16])
    p.add_argument("--budget-s", type=float, default=10.0, help="seconds of timed lgc_fast calls per batch size")
    p.add_argument("--ref-runs", type=int, default=3, help="cap on the timed eager-ref calls")
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 2, 1 s budget, one eager-ref call")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.budget_s, args.ref_runs = [2], 1.0, 1
    device = torch.device("cuda" if cuda else "cpu")
    if args.width is not None:
        torch.manual_seed(0)
        weights, image_size = LGCN("release", args.width).eval(), args.image_size
        model_name = f"random release network, width {args.width}"
    else:
        weights, image_size, model_name = args.weights, None, str(args.weights or "bundled")
    detector = Detector(weights=weights, device=device, image_size=image_size, precision="float32")
    with_modules = copy.copy(detector)  # the same settings, the network as trained (not folded)
    with_modules.network = detector.model
    detectors = {"eager-ref": with_modules, "lgc_fast-modules": with_modules, "lgc_fast": detector}
    reduced, precision = REDUCED[device.type]
    if cuda or native_bf16_cpu()[0]:  # emulated bfloat16 is slower than float32 on the CPU
        detectors[reduced] = Detector(weights=detector.model, device=device, image_size=detector.crop,
                                      decode=detector.decode, fit=detector.fit, fit_threshold=detector.fit_threshold,
                                      point_offsets=detector.point_offsets, precision=precision)
    image = load_gray(str(DEMO_IMAGE))
    rows = []
    for batch in args.batch_sizes:
        boxes = jittered_boxes(batch)
        calls = {mode: make_call(mode, d, image, boxes) for mode, d in detectors.items()}
        peak = {}
        for mode, call in calls.items():  # one untimed call each: warm-up and the peak memory
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            call()
            if cuda:
                torch.cuda.synchronize(device)
                peak[mode] = torch.cuda.max_memory_allocated(device) / 2**20
        timings = time_interleaved(calls, device, warmup=0, min_runs=3, budget_s=args.budget_s,
                                   runs={"eager-ref": args.ref_runs})
        for mode, t in timings.items():
            rows.append({"batch": batch, "mode": mode, "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                         "p80_ms": t.p80_ms, "runs": t.runs, "faces_per_s": batch / (t.median_ms / 1e3),
                         "peak_memory_mib": peak.get(mode)})
        for row in rows[-len(timings):]:
            if row["mode"].startswith("lgc_fast") and row["mode"] != "lgc_fast-modules":
                row["speedup_vs_eager_ref"] = timings["eager-ref"].median_ms / row["median_ms"]
                row["speedup_vs_modules"] = timings["lgc_fast-modules"].median_ms / row["median_ms"]
            if row["mode"] == reduced:
                row["max_point_shift_px"] = max_point_shift(calls["lgc_fast"](), calls[reduced]())
    print(format_table(rows, [("batch", "batch"), ("mode", "mode"), ("median_ms", "ms/call"), ("p20_ms", "p20"),
                              ("p80_ms", "p80"), ("runs", "runs"), ("faces_per_s", "faces/s"),
                              ("speedup_vs_eager_ref", "vs eager-ref"), ("speedup_vs_modules", "vs modules"),
                              ("peak_memory_mib", "peak MiB"), ("max_point_shift_px", "max shift px")]))
    payload = {
        "environment": environment(device),
        "backends": {k: v[0] for k, v in lgc_fast.backends().items()},
        "config": {"model": model_name, "crop": detector.crop, "decode": detector.decode, "fit": detector.fit,
                   "cpu_bfloat16": native_bf16_cpu()[1] if not cuda else None},
        "results": rows,
    }
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
