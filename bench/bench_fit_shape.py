"""Benchmark the batched shape fit against the per-face, pixel-level reference in the same run; decoder accuracy.

Fit: faces/s of ``fit_shape`` (68 x 96 x 96 float32 heatmaps, windows None/20/7, bounds 3 sigma) for a whole batch
with each available backend of its statistics pass, against ``fit_shape_ref`` (NumPy, one weighted equation per
pixel, one face at a time) on the first faces of the same batch. Reports medians and 20/80 % quantiles of the time
per call, faces/s, the speed-up over the reference loop and the largest point difference between the two.
CPU target: batched >= 50x the reference loop. GPU target: >= 100000 faces/s (measured only where CUDA is present).

Decoders: encode -> decode round trips of random sub-pixel points through the network's targets T = K * G
(``target_maps_ref``), mean and max |error| per axis for every decoder in ``lgc_fast.decode.DECODERS``.

The heatmaps are exact targets of random model shapes (the face spans about 70 px), rendered separably.
Usage: python bench/bench_fit_shape.py [--quick] [--batch N] [--ref-faces N] [--reps N] [--out PATH]
Writes the results under "fit_shape" in bench/results/<device-slug>.json (merged with other benches).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import environment, results_path, time_reps, write_results  # noqa: E402

import lgc_fast  # noqa: E402
from lgc_fast.decode import DECODERS  # noqa: E402
from lgc_fast.ops import kernel_conv, splat_heatmaps, target_maps_ref  # noqa: E402
from lgc_fast.ops.fit_shape import fit_shape, fit_shape_ref  # noqa: E402
from lgc_fast.shape import ShapeModel  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ytf68" / "trainset"
MAP = 96
BENCH = "fit_shape"


def _model() -> tuple[ShapeModel, str]:
    files = sorted(DATA.glob("*.pts")) if DATA.is_dir() else []
    if files:
        shapes = []
        for f in files:
            text = f.read_text()
            shapes.append(np.array(text[text.index("{") + 1:text.index("}")].split(), dtype=np.float64).reshape(-1, 2))
        return ShapeModel.fit(np.stack(shapes) - 1.0), f"{len(files)} real training shapes"
    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, (68, 2))
    modes = rng.normal(0, 0.02, (8, 68, 2))
    shapes = base + np.einsum("sk,kcd->scd", rng.normal(0, 1, (500, 8)), modes)
    return ShapeModel.fit(shapes), "500 synthetic shapes (real data absent)"


def _render(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """T = K * G of every point (N, C, 2) -> (N, C, H, W), as ``target_maps_ref`` but with the fast ``kernel_conv``."""
    labelled = torch.ones(points.shape[:2], dtype=torch.bool)
    return kernel_conv(splat_heatmaps(points.double(), labelled, height, width))


def _faces(model: ShapeModel, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coeffs = (torch.rand(n, model.n_modes, generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor(model.stddev)
    scale = 70.0 / float(np.ptp(model.mean, axis=0).max()) * (0.9 + 0.1 * torch.rand(n, generator=g))
    angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.6
    shift = 47.5 + 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    sim = torch.stack((scale * torch.cos(angle), scale * torch.sin(angle), shift[:, 0], shift[:, 1]), dim=1)
    pts = model.reconstruct(coeffs, sim)
    return torch.cat([_render(pts[i:i + 16], MAP, MAP).float() for i in range(0, n, 16)])


def _times(t) -> dict:
    """Row fields of one Timing of a whole call."""
    return dict(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, timing=t.as_dict())


def bench_fit(args, model, maps):
    rows = []
    cpu = torch.device("cpu")
    ref_maps = maps[:args.ref_faces]
    reference = fit_shape_ref(ref_maps, model)  # warm-up and the points to compare with
    ref_t = time_reps(lambda: [fit_shape_ref(ref_maps[i:i + 1], model) for i in range(len(ref_maps))], cpu, 0,
                      args.ref_reps)
    ref_faces_s = len(ref_maps) / (ref_t.median_ms * 1e-3)
    rows.append(dict(impl="fit_shape_ref (per-face loop)", device="cpu", batch=len(ref_maps), **_times(ref_t),
                     faces_per_s=ref_faces_s))
    report = lgc_fast.backends()
    for backend in ("cpu", "ref"):
        if not report[backend][0]:
            continue
        t = time_reps(lambda: fit_shape(maps, model, backend=backend), cpu, 1, args.reps)
        diff = (fit_shape(ref_maps, model, backend=backend).points - reference.points).abs().max().item()
        rows.append(dict(impl=f"fit_shape batched, stats backend {backend}", device="cpu", batch=len(maps),
                         **_times(t), faces_per_s=len(maps) / (t.median_ms * 1e-3),
                         speedup_vs_ref_loop=len(maps) / (t.median_ms * 1e-3) / ref_faces_s,
                         max_abs_point_diff_vs_ref_px=diff))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        big = maps.to(dev).repeat(max(1, args.gpu_batch // len(maps)), 1, 1, 1)
        for backend in ("cuda", "triton"):
            if not report[backend][0]:
                continue
            t = time_reps(lambda: fit_shape(big, model, backend=backend), dev, 3, args.reps)
            diff = (fit_shape(ref_maps.to(dev), model, backend=backend).points.cpu() - reference.points).abs().max()
            rows.append(dict(impl=f"fit_shape batched, stats backend {backend}", device=torch.cuda.get_device_name(),
                             batch=len(big), **_times(t), faces_per_s=len(big) / (t.median_ms * 1e-3),
                             speedup_vs_ref_loop=len(big) / (t.median_ms * 1e-3) / ref_faces_s,
                             max_abs_point_diff_vs_ref_px=diff.item()))
    return rows


def bench_decoders(points: int = 256, size: int = 48):
    g = torch.Generator().manual_seed(1)
    pts = 4.0 + torch.rand(1, points, 2, generator=g, dtype=torch.float64) * (size - 9.0)
    maps = target_maps_ref(pts.float(), torch.ones(1, points, dtype=torch.bool), size, size)
    result = {}
    for name, decoder in DECODERS.items():
        err = (decoder(maps)[0].double() - pts).abs()
        result[name] = dict(mean_abs_error_px=err.mean().item(), max_abs_error_px=err.max().item())
    return dict(points=points, map=size, border_px=4, errors=result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 8, 2 reference faces, 2 timed calls")
    p.add_argument("--batch", type=int, default=None, help="faces per batched call on the CPU (default 64)")
    p.add_argument("--gpu-batch", type=int, default=None, help="faces per batched call on CUDA (default 8192)")
    p.add_argument("--ref-faces", type=int, default=None,
                   help="faces timed through the per-face reference loop (default 8)")
    p.add_argument("--reps", type=int, default=None, help="timed batched calls (default 7)")
    p.add_argument("--ref-reps", type=int, default=None, help="timed reference loops (default 3)")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    args = p.parse_args(argv)
    defaults = (dict(batch=8, gpu_batch=1024, ref_faces=2, reps=2, ref_reps=1) if args.quick else
                dict(batch=64, gpu_batch=8192, ref_faces=8, reps=7, ref_reps=3))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ref_faces = min(args.ref_faces, args.batch)
    model, source = _model()
    maps = _faces(model, args.batch)
    rows = bench_fit(args, model, maps)
    decoders = bench_decoders()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = dict(
        environment=environment(device),
        env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "LGC_FAST_BACKEND")},
        model=dict(source=source, landmarks=model.n_landmarks, modes=model.n_modes), map=[68, MAP, MAP],
        fit=rows, decoders=decoders,
        gpu_note=None if torch.cuda.is_available() else "no CUDA device: GPU faces/s (target >= 100000) unmeasured",
    )
    for row in rows:
        extra = f"  x{row['speedup_vs_ref_loop']:.0f} vs ref loop" if "speedup_vs_ref_loop" in row else ""
        print(f"{row['impl']:42s} {row['device']:>10s} batch {row['batch']:5d}: {row['median_ms']:9.2f} ms "
              f"(20-80 % {row['p20_ms']:.2f}-{row['p80_ms']:.2f})  {row['faces_per_s']:10.1f} faces/s{extra}")
    for name, e in decoders["errors"].items():
        print(f"decoder {name:15s} mean {e['mean_abs_error_px']:.4f} px  max {e['max_abs_error_px']:.4f} px")
    if payload["gpu_note"]:
        print(payload["gpu_note"])
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
