"""Benchmark full-frame inference (the network on a whole 1080p / 4K frame, as ``Detector.detect`` runs it on every
pyramid level): the untiled forward (the torch baseline) against ``lgc_fast.tiling`` under memory caps.

Methods, per frame size:
  untiled    model(x) under no_grad: one forward of the whole frame (skipped when its estimated memory exceeds
             --untiled-max; the JSON says so)
  tiled@CAP  iter_tiles(model, x, max_memory_bytes=CAP): the tile size is chosen for the cap; each tile's omega is
             reduced right away (per-channel maximum), so no full-size map is held: the working set alone.
Reported: time per frame (median, 20/80 % quantiles of the timed calls), peak memory above the level before the call
(CPU: the process's peak resident set, VmHWM, reset through /proc/self/clear_refs before each call; CUDA:
torch.cuda.max_memory_allocated above the allocated bytes before the call), the cap's estimate
(tiling.bytes_per_pixel x tile pixels), the tile size and count, and the pixel overhead of the halos (pixels
computed / frame pixels). Random weights: time and memory do not depend on their values.

On the CPU the full-width network (128) takes minutes per frame on a few cores; use --width 8 or 16 there (the
kernel convolution and the landmark-sized maps, which do not shrink with the width, are then the bulk).
CPU peaks of small tiles include glibc heap retention: blocks under the (dynamically raised) mmap threshold stay
resident between tiles; MALLOC_MMAP_THRESHOLD_=1048576 in the environment fixes the threshold and keeps peaks near
the estimate (record such runs with --tag).

Usage: python bench/bench_inference.py [--device cpu|cuda] [--width W] [--frames 1080p 4k] [--caps 512M 2G]
                                       [--runs N] [--warmup N] [--untiled-max SIZE] [--tag TAG] [--out PATH]
Writes the results under "inference" in bench/results/<device-slug>.json (merged with other benches).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Timing, environment, format_table, results_path, synchronize, write_results  # noqa: E402

from lgc_fast.model import LGCN  # noqa: E402
from lgc_fast.tiling import bytes_per_pixel, iter_tiles, plan_tiles, tile_for_memory  # noqa: E402

BENCH = "inference"
FRAMES = {"720p": (720, 1280), "1080p": (1080, 1920), "4k": (2160, 3840)}
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = UNITS.get(text[-1:], 1)
    try:
        value = float(text[:-1] if text[-1:] in UNITS else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {text!r}") from None
    return int(value * scale)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(fn, device: torch.device, runs: int, warmup: int) -> tuple[Timing, int]:
    """Time `fn` (warm-up calls untimed) and return (timing, peak bytes above the level before a call, max over
    calls)."""
    for _ in range(warmup):
        fn()
    samples, peaks = [], []
    for _ in range(runs):
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
        after = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")
        peaks.append(after - before)
    return Timing.from_samples(samples), max(peaks)


def untiled(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def tiled(model, x, cap):
    def run():
        for _, _, omega in iter_tiles(model, x, tile=None, max_memory_bytes=cap):
            omega.amax(dim=(2, 3))  # reduce and drop: the consumer pattern of a bounded-memory pipeline
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=None, help="network width (default: 128 on CUDA, 8 on CPU)")
    parser.add_argument("--frames", nargs="+", default=["1080p", "4k"], choices=sorted(FRAMES))
    parser.add_argument("--caps", nargs="+", type=parse_bytes, default=None,
                        help="memory caps for tiling (default: 512M 2G on CPU, 1G 4G on CUDA)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method first")
    parser.add_argument("--untiled-max", type=parse_bytes, default=None,
                        help="skip the untiled forward above this estimated memory (default: 6G CPU, 60G CUDA)")
    parser.add_argument("--tag", default="", help="store the results under inference_TAG (e.g. another malloc setup)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width = args.width or (128 if device.type == "cuda" else 8)
    caps = args.caps or ([1 << 29, 1 << 31] if device.type == "cpu" else [1 << 30, 1 << 32])
    untiled_max = args.untiled_max or (6 << 30 if device.type == "cpu" else 60 << 30)

    torch.manual_seed(0)
    model = LGCN("release", width=width).to(device).eval()
    halo = model.receptive_radius
    per_px = bytes_per_pixel(model)
    rows = []
    for frame in args.frames:
        height, width_px = FRAMES[frame]
        x = (torch.rand((1, 1, height, width_px), generator=torch.Generator().manual_seed(1)) * 255).to(device)
        pixels = height * width_px
        methods = [("untiled", None)] + [(f"tiled@{cap / 2**20:.0f}MiB", cap) for cap in caps]
        for name, cap in methods:
            row = {"frame": frame, "method": name, "pixels": pixels}
            if cap is None:
                estimate = per_px * pixels
                row.update(tile=max(height, width_px), tiles=1, overhead=1.0, estimate_bytes=estimate)
                if estimate > untiled_max:
                    row["note"] = f"skipped: estimated {estimate / 2**30:.1f} GiB > --untiled-max"
                    rows.append(row)
                    print(f"{frame} {name}: {row['note']}", flush=True)
                    continue
                fn = untiled(model, x)
            else:
                tile = tile_for_memory(model, cap, halo)
                plan = plan_tiles(height, width_px, tile, halo)
                computed = sum((t.iy1 - t.iy0) * (t.ix1 - t.ix0) for t in plan)
                row.update(tile=tile, tiles=len(plan), overhead=computed / pixels, cap_bytes=cap,
                           estimate_bytes=per_px * (tile + 2 * halo) ** 2)
                fn = tiled(model, x, cap)
            timing, peak = measure(fn, device, args.runs, args.warmup)
            row.update(timing=timing.as_dict(), median_s=timing.median_ms / 1e3, p20_s=timing.p20_ms / 1e3,
                       p80_s=timing.p80_ms / 1e3, peak_bytes=peak, peak_mib=peak / 2**20,
                       estimate_mib=row["estimate_bytes"] / 2**20)
            rows.append(row)
            print(f"{frame} {name}: {timing.median_ms / 1e3:.2f} s, peak {peak / 2**20:.0f} MiB", flush=True)
        base = next((r for r in rows if r["frame"] == frame and r["method"] == "untiled" and "median_s" in r), None)
        for r in rows:
            if r["frame"] == frame and base is not None and "median_s" in r:
                r["time_vs_untiled"] = r["median_s"] / base["median_s"]
                r["memory_vs_untiled"] = r["peak_bytes"] / base["peak_bytes"]
    print(format_table(rows, [("frame", "frame"), ("method", "method"), ("tile", "tile"), ("tiles", "tiles"),
                              ("overhead", "px overhead"), ("median_s", "median s"), ("p20_s", "p20 s"),
                              ("p80_s", "p80 s"), ("peak_mib", "peak MiB"), ("estimate_mib", "estimate MiB"),
                              ("time_vs_untiled", "time x"), ("memory_vs_untiled", "memory x")]))
    env = environment(device)
    env["MALLOC_MMAP_THRESHOLD_"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    payload = {"environment": env, "model": model.config, "receptive_radius": halo,
               "bytes_per_pixel_estimate": per_px, "runs": args.runs, "warmup": args.warmup, "results": rows,
               "note": "random weights; time per frame; peak memory above the level before each call"}
    path = write_results(args.out or results_path(device), f"{BENCH}_{args.tag}" if args.tag else BENCH, payload)
    print(f"wrote {path}")
    return 0 if all(math.isfinite(r.get("median_s", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
