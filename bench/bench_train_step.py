"""Benchmark one training step of the LGCN (forward, loss, backward, gradient clipping, SGD update) in samples/s.

Modes, timed in the same run on the same synthetic batch (random 0-255 images, landmarks inside the crop):
  eager-ref : plain torch: every lgc_fast op on its reference path (LGC_FAST_BACKEND=ref), no torch.compile;
  lgc_fast  : the automatic fast backends (compiled C++ on the CPU; CUDA/Triton on a GPU);
  lgc_fast-compiled (with --compile [MODE]): lgc_fast with the forward pass and loss under torch.compile(mode=MODE)
              as `lgc-fast train --compile MODE` runs it (reduce-overhead adds CUDA graphs).
  lgc_fast-fused, lgc_fast-fused-compiled: the same two with every conv block's BN + ReLU + scale + dropout as one
              lgc_fast.ops.bn_relu_dropout (LGCN.fuse_epilogues, `lgc-fast train --fused-epilogue`; its CUDA C++
              kernels on a GPU, its C++ kernels on the CPU; `lgc-fast train` uses it by default on the CPU, and on
              a GPU from batch 64).
  lgc_fast-fused-fprop: lgc_fast-fused with every conv block's convolution on cuDNN's forward kernels, as
              nn.Conv2d runs it (LGCN.use_conv_via("fprop")); the other modes take, per layer shape and direction,
              the faster of the forward and data-gradient kernels, measured at the first step (lgc_fast.ops.same_conv2d;
              the choices are in the results);
  lgc_fast-fused-nhwc-heads: lgc_fast-fused with channels_last output convolutions (LGCN.use_planar_heads(False)):
              kernel_conv and the loss change layout on every call, as before the planar heads (bench_layout.py).
  lgc_fast-stacks: lgc_fast-fused with the conv blocks as conv_stack on cuDNN's fused graphs where they build
              (LGCN.use_conv_stacks; elsewhere, as on the CPU, the same as lgc_fast-fused), each graph on the
              first plan of cuDNN's heuristics;
  lgc_fast-stacks-tuned: the same with each graph's first TUNED_PLANS (4) plans timed once, the fastest running
              (LGCN.use_conv_stacks(cudnn_plans=4));
  lgc_fast-triton-stacks: lgc_fast-fused with the conv blocks as conv_stack on lgc_fast's own Triton kernels
              (LGCN.use_conv_stacks(graphs="triton"); CUDA only, elsewhere the same as lgc_fast-fused);
  lgc_fast-stacks-compiled, lgc_fast-triton-stacks-compiled: those two stacks with the forward and loss under
              torch.compile (--compile MODE): the cuDNN stack runs between its graphs, the Triton stack is one
              registered op inside them (lgc_fast.ops.conv_stack).
All modes use the same --amp / --channels-last settings (defaults as `lgc-fast train`'s: autocast on for CUDA and on a
CPU with hardware bfloat16, channels_last on for CUDA), so the ratio measures the ops. --compare-amp adds, for every
mode but eager-ref, the same mode with bfloat16 autocast flipped ("<mode>+amp" or "<mode>+no-amp"), timed in the same
rounds: what autocast buys on this machine. The modes are timed in interleaved rounds (bench/common.py), so a
changing machine load hits all alike; reported are the median and 20/80 % quantiles of the step time, samples/s from
the median, the speed-up lgc_fast / eager-ref, and the peak memory of one step (CUDA: max allocated; CPU: not measured
per mode).

Usage:
  python bench/bench_train_step.py                                      # GPU: batches 64 128 256, width 128
  python bench/bench_train_step.py --batch-sizes 2 4 --width 32 --ref-runs 2   # a CPU run
  python bench/bench_train_step.py --batch-sizes 4 --width 32 --modes lgc_fast-fused --compare-amp   # CPU autocast
  python bench/bench_train_step.py --quick [--out PATH.json]                      # a smoke run
Results go under the key "train_step" of bench/results/<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read once, when torch loads the OpenMP runtime

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, format_table, results_path, time_interleaved, write_results  # noqa: E402

import lgc_fast  # noqa: E402
from lgc_fast.model import LGCN  # noqa: E402
from lgc_fast.ops.same_conv2d import same_conv2d_choices  # noqa: E402
from lgc_fast.train import (COMPILE_MODES, LOSS_SCALE, _make_optimizer, compiled_forward_loss,  # noqa: E402
                            default_amp, forward_loss, train_step)

LANDMARKS = 68
MODES = ("eager-ref", "lgc_fast", "lgc_fast-compiled", "lgc_fast-fused", "lgc_fast-fused-compiled",
         "lgc_fast-fused-fprop", "lgc_fast-fused-nhwc-heads", "lgc_fast-stacks", "lgc_fast-stacks-tuned",
         "lgc_fast-triton-stacks", "lgc_fast-stacks-compiled", "lgc_fast-triton-stacks-compiled")
TUNED_PLANS = 4


def make_batch(n: int, size: int, device: torch.device, seed: int = 0):
    """images (n, 1, size, size) in [0, 255], points (n, 68, 2) in the middle 60 % of the crop, all labelled."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, size, size, generator=g) * 255).to(device)
    points = (torch.rand(n, LANDMARKS, 2, generator=g) * (0.6 * size) + 0.2 * size).to(device)
    labelled = torch.ones(n, LANDMARKS, dtype=torch.bool, device=device)
    return images, points, labelled


def flipped_amp(mode: str, amp: bool) -> str:
    """The name of `mode` with bfloat16 autocast flipped from `amp` (--compare-amp)."""
    return f"{mode}+no-amp" if amp else f"{mode}+amp"


def base_mode(mode: str) -> str:
    """`mode` without flipped_amp's suffix."""
    return mode.split("+")[0]


def make_step(mode: str, args, device: torch.device, batch: int, amp: bool):
    """A zero-argument callable running one training step of `mode` (it sets the backend for its own calls)."""
    mode = base_mode(mode)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = LGCN(args.variant, args.width).to(device=device, memory_format=memory_format).train()
    model.fuse_epilogues("fused" in mode or "stacks" in mode).use_planar_heads(not mode.endswith("-nhwc-heads"))
    model.use_conv_stacks("stacks" in mode, TUNED_PLANS if mode.endswith("-tuned") else 1,
                          "triton" if "triton" in mode else "cudnn")
    model.use_conv_via("fprop" if mode.endswith("-fprop") else "auto")
    loss_fn = compiled_forward_loss(args.compile) if mode.endswith("-compiled") else forward_loss
    optimizer = _make_optimizer(model.parameters(), 1e-3, 0.9)
    images, points, labelled = make_batch(batch, args.size, device)
    images = images.contiguous(memory_format=memory_format)

    def step():
        if mode == "eager-ref":
            os.environ["LGC_FAST_BACKEND"] = "ref"
        else:
            os.environ.pop("LGC_FAST_BACKEND", None)
        try:
            return train_step(model, optimizer, images, points, labelled, amp, 100.0, loss_fn)
        finally:
            os.environ.pop("LGC_FAST_BACKEND", None)

    return step


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256] if cuda else [2, 4])
    parser.add_argument("--width", type=int, default=128 if cuda else 32)
    parser.add_argument("--variant", default="release", choices=("release", "paper"))
    parser.add_argument("--size", type=int, default=96, help="crop size in pixels")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=default_amp(device))
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=cuda)
    parser.add_argument("--compare-amp", action="store_true",
                        help="also time every mode but eager-ref with --amp flipped, in the same rounds")
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="add the compiled modes: the forward pass and loss under torch.compile(mode=MODE) "
                             "as in lgc-fast train --compile MODE (default MODE: default)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="default: eager-ref, lgc_fast and lgc_fast-fused, and their compiled forms with "
                             "--compile")
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds of timed lgc_fast steps per batch size")
    parser.add_argument("--ref-runs", type=int, default=None,
                        help="cap the timed eager-ref steps (default: as many as lgc_fast on a GPU, 3 on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: batch 2 (8 on a GPU), width 8, 2 s budget, one eager-ref step")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.width, args.budget_s, args.ref_runs = [8 if cuda else 2], 8, 2.0, 1
    if args.modes is None:
        args.modes = list(MODES[:5]) if args.compile else ["eager-ref", "lgc_fast", "lgc_fast-fused"]
    elif any(m.endswith("-compiled") for m in args.modes) and not args.compile:
        args.compile = "default"
    torch.backends.cudnn.benchmark = cuda  # as lgc-fast train does: both modes get the fastest conv algorithms
    ref_runs = args.ref_runs if args.ref_runs is not None else (None if cuda else 3)
    rows = []
    for batch in args.batch_sizes:
        amps = {mode: args.amp for mode in args.modes}
        if args.compare_amp:
            amps.update({flipped_amp(mode, args.amp): not args.amp for mode in args.modes if mode != "eager-ref"})
        steps = {mode: make_step(mode, args, device, batch, amp) for mode, amp in amps.items()}
        peak = {}
        for mode, step in steps.items():  # untimed steps: warm-up, compilation (and graph capture), peak memory
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            # CUDA graphs are recorded on the 2nd/3rd call
            for _ in range(3 if base_mode(mode).endswith("-compiled") else 1):
                step()
            if cuda:
                torch.cuda.synchronize(device)
                peak[mode] = torch.cuda.max_memory_allocated(device) / 2**20
        caps = {"eager-ref": ref_runs} if ref_runs is not None and "eager-ref" in steps else None
        timings = time_interleaved(steps, device, warmup=0, min_runs=3, budget_s=args.budget_s, runs=caps)
        for mode, t in timings.items():
            rows.append({"batch": batch, "mode": mode, "amp": amps[mode], "median_ms": t.median_ms, "p20_ms": t.p20_ms,
                         "p80_ms": t.p80_ms, "runs": t.runs, "samples_per_s": batch / (t.median_ms / 1e3),
                         "peak_memory_mib": peak.get(mode)})
        if "eager-ref" in timings:
            for row in rows[-len(timings):]:
                if row["mode"] != "eager-ref":
                    row["speedup_vs_eager_ref"] = timings["eager-ref"].median_ms / row["median_ms"]
        if args.compare_amp:
            for row in rows[-len(timings):]:
                if row["mode"] in args.modes and row["mode"] != "eager-ref":
                    other = timings[flipped_amp(row["mode"], args.amp)].median_ms
                    row["amp_speedup"] = (other / row["median_ms"]) if args.amp else (row["median_ms"] / other)
        del steps
    print(format_table(rows, [("batch", "batch"), ("mode", "mode"), ("median_ms", "ms/step"), ("p20_ms", "p20"),
                              ("p80_ms", "p80"), ("runs", "runs"), ("samples_per_s", "samples/s"),
                              ("speedup_vs_eager_ref", "speed-up"), ("amp_speedup", "amp speed-up"),
                              ("peak_memory_mib", "peak MiB")]))
    payload = {
        "environment": environment(device),
        "backends": {k: v[0] for k, v in lgc_fast.backends().items()},
        "config": {"variant": args.variant, "width": args.width, "size": args.size, "amp": args.amp,
                   "channels_last": args.channels_last, "compile": args.compile or False,
                   "compare_amp": args.compare_amp, "loss_scale": LOSS_SCALE,
                   "clip_norm": 100.0, "optimizer": "SGD momentum 0.9"},
        "results": rows,
        "same_conv2d_choices": same_conv2d_choices(),
    }
    path = write_results(args.out or results_path(device), "train_step", payload)
    print(f"wrote {path} (key train_step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
