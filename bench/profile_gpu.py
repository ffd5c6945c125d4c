"""Where the time of a training step and of Detector.landmarks goes: torch.profiler tables (top ops by device time
and by host time) and the step's wall time against the sum of its kernels' time (a gap means the host is the bound).

Usage: python bench/profile_gpu.py [--what train landmarks] [--batch 128] [--modes lgc_fast lgc_fast-fused]
Prints the tables; with --trace DIR also writes Chrome traces there. Not a benchmark: the profiler adds overhead,
so read it for shares, and take times from the benches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_landmarks import jittered_boxes  # noqa: E402
from bench_train_step import make_step  # noqa: E402

from lgc_fast.demo import DEMO_IMAGE  # noqa: E402
from lgc_fast.detect import Detector, load_gray  # noqa: E402


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::slice_backward")


def profiled(name: str, call, device: torch.device, repeats: int, trace_dir: Path | None) -> None:
    for _ in range(3):
        call()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        call()
    end.record()
    torch.cuda.synchronize(device)
    wall_ms = start.elapsed_time(end) / repeats
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(repeats):
            call()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    # Device-side events only: kineto also credits each operator with its kernels' time, which summed twice.
    kernel_ms = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3 / repeats
    print(f"\n=== {name}: {wall_ms:.2f} ms per call unprofiled; kernels {kernel_ms:.2f} ms per call "
          f"({100 * kernel_ms / wall_ms:.0f} % of the wall time)")
    print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    by_shape = prof.key_averages(group_by_input_shape=True)
    print(by_shape.table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=40,
                         max_shapes_column_width=90))
    # Layout and dtype copies hide below the top rows: list the largest ones with their shapes.
    copies = sorted((e for e in by_shape if e.key in COPY_OPS and e.self_device_time_total > 0),
                    key=lambda e: -e.self_device_time_total)
    print(f"copies (ms per call of the profiled step): {', '.join(COPY_OPS)}")
    for e in copies[:10]:
        print(f"  {e.key:<16} {e.self_device_time_total / 1e3 / repeats:8.3f} ms  {e.count // repeats:4d} calls  "
              f"{e.input_shapes}")
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_dir / f"{name.replace(' ', '_')}.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", nargs="+", default=["train", "landmarks"], choices=("train", "landmarks"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["lgc_fast", "lgc_fast-fused"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--trace", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    if "train" in args.what:
        settings = SimpleNamespace(channels_last=True, variant="release", width=args.width, compile="default",
                                   size=96, amp=True)
        for mode in args.modes:
            profiled(f"train {mode} batch {args.batch}", make_step(mode, settings, device, args.batch), device,
                     args.repeats, args.trace)
    if "landmarks" in args.what:
        detector = Detector(device=device)
        image = load_gray(str(DEMO_IMAGE))
        boxes = jittered_boxes(args.batch)

        def landmarks():
            with torch.no_grad():
                detector.landmarks(image, boxes)
        profiled(f"landmarks batch {args.batch}", landmarks, device, args.repeats, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
