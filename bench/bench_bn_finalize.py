"""Benchmark conv_stack's BatchNorm finalize (lgc_fast.ops.bn_finalize) per call: the compiled op of the device (one
C++ loop on the CPU, one kernel launch on a GPU) against bn_finalize_ref (plain torch: a dozen small ops), in the
same run, at the stack's channel count (128), float32, batch statistics with the running update (a training step's
call). Each timed function makes CALLS calls back to back, as a training step makes one per conv block, so the figure
is the per-call host and launch cost that a step pays; reported per call: median and 20/80 % quantiles in
microseconds and the speed-up over the reference.

Usage:
  python bench/bench_bn_finalize.py [--quick] [--channels C] [--out PATH]
Writes the results under "bn_finalize" in bench/results/<device-slug>.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import environment, format_table, op_bench_parser, results_path, time_interleaved, write_results  # noqa

from lgc_fast import _backend  # noqa: E402
from lgc_fast.ops.bn_finalize import bn_finalize, bn_finalize_ref  # noqa: E402

BENCH = "bn_finalize"
CALLS = 100


def calls_of(finalize, device: torch.device, channels: int):
    g = torch.Generator().manual_seed(0)
    total, sq_total = torch.randn(channels, generator=g) * 100, torch.rand(channels, generator=g) * 1e4 + 1e4
    gamma, beta = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    vectors = [t.to(device) for t in (total, sq_total, gamma, beta)]
    running = [torch.zeros(channels, device=device), torch.ones(channels, device=device)]

    def run():
        for _ in range(CALLS):
            finalize(*vectors[:2], 128 * 96 * 96, *vectors[2:], *running, batch_stats=True, update_running=True,
                     momentum=0.1, eps=1e-5, factor=0.1 / 0.9)
    return run


def main(argv=None) -> int:
    parser = op_bench_parser(__doc__, "a 1 s budget", "unused")
    parser.add_argument("--channels", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    compiled = "cuda" if device.type == "cuda" else "cpu"
    print(f"bn_finalize: {args.channels} channels float32, {CALLS} calls a timing, on {env['device']}; torch "
          f"{env['torch']}, commit {env['commit']}")
    methods = {"bn_finalize_ref (torch)": calls_of(bn_finalize_ref, device, args.channels)}
    usable, why = _backend._usable(compiled, device)
    if usable:
        methods[f"bn_finalize ({compiled})"] = calls_of(
            lambda *a, **k: bn_finalize(*a, backend=compiled, **k), device, args.channels)
    timings = time_interleaved(methods, device, warmup=2, min_runs=5, budget_s=1.0 if args.quick else 5.0)
    baseline = timings["bn_finalize_ref (torch)"].median_ms
    rows = [{"method": name, "us_per_call": t.median_ms * 1e3 / CALLS, "p20_us": t.p20_ms * 1e3 / CALLS,
             "p80_us": t.p80_ms * 1e3 / CALLS, "speedup_vs_ref": baseline / t.median_ms, **t.as_dict()}
            for name, t in timings.items()]
    if not usable:
        rows.append({"method": f"bn_finalize ({compiled})", "missing": why})
    print(format_table(rows, [("method", "method"), ("us_per_call", "us/call"), ("p20_us", "p20"),
                              ("p80_us", "p80"), ("speedup_vs_ref", "speed-up")]))
    payload = {"environment": env, "channels": args.channels, "calls_per_timing": CALLS, "dtype": "float32",
               "results": rows}
    print(f"wrote {write_results(args.out or results_path(device), BENCH, payload)} (key {BENCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
