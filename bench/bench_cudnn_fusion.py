"""Can cuDNN's runtime fusion take the conv blocks' BatchNorm + ReLU + dropout into the convolutions? Builds
bench/cudnn_fusion_probe.cpp against the cuDNN that torch loads, runs it for the training step's layer shapes, and
times in the same run what the step does now at the same shape: torch's convolution (forward; forward + backward)
and lgc_fast's fused epilogue (``bn_relu_dropout_drawn``, forward; forward + backward).

The probe's cases (see its header; the table is bench/cudnn_fusion_cases.h): plain fprop / dgrad / wgrad graphs, and
the fused forms
  fprop_stats                  this block's BN statistics (genstats) as the convolution's epilogue
  fprop_sbr_stats[_mask|_mask8|_rng] previous block's BN-apply + ReLU (+ keep mask: io-typed, uint8, or drawn in
                               the graph by cuDNN's RNG op) as the prologue, genstats as the epilogue
  wgrad_sbr[_mask|_rng]        the weight gradient with the same prologue (recomputing the activation)
  wgrad_dbnapply, dgrad_dbnapply   dy made in the prologue from the next block's gated gradient and activation (its
                               BN backward's apply pass, fused)
  dgrad[_mask|_rng]_drelu_dbn  dgrad, (mask,) ReLU backward, BN backward weights
  wgrad_sbr_rng_dbnapply, dgrad_dbnapply_rng_drelu_dbn   both at once: what a fully fused block runs
each with: built or not (cuDNN's reason), a small instance against a float64 CPU reference (relative L2 error), and
the median of its best plan at the full size. A fused form pays where its time over the plain graph's is well under
the epilogue passes it replaces. The RNG cases are judged on the mask the fprop graph draws, read back first
("keep_fraction" in their check; "keep_error" where it cannot be), so they pass only where all three graphs draw the
same mask from the same seed and offset, the condition for dropout without any mask bytes. Per layer, "block" sums the
three graphs a fully fused block would run (fprop_sbr_rng_stats, wgrad_sbr_rng_dbnapply,
dgrad_dbnapply_rng_drelu_dbn) against torch's conv + lgc_fast's epilogue forward + backward, both from this run.

Layer shapes (--layers): global (128 -> 128, 3x3, dilation 4), global_first (136 -> 128, the release's first global
layer), local3 (128 -> 128, 3x3), local5 (128 -> 128, 5x5); all 96 x 96, NHWC, batch --batch.

cuDNN headers: --cudnn-root, else $CUDNN_ROOT, else the nvidia.cudnn package beside torch (CUDA wheels of torch ship
it), else /usr; the library from the first of those that has it. Where torch's package has no headers, take them from
a nvidia-cudnn-cu13 wheel (bench/gpu_session.sh says how). --compile-only compiles the probe and stops (no GPU or
cuDNN library needed): the CPU test suite uses it as the probe's compile check.

--device-json FILE (for example bench/devices/nvidia-h100-80gb-hbm3.json: cuDNN's device-properties JSON, written
from the datasheet) asks which cases build for that GPU without one: cuDNN (9.8 or later) builds plans for a described
device, nothing runs, nothing is checked or timed. It needs a CUDA build of torch with its cuDNN wheel (any machine).
Only the precompiled engines answer there: the runtime-fusion engines open the driver (libcuda) to compile, so on a
machine without one they refuse with CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING, which says nothing about
the GPU.

Usage: python bench/bench_cudnn_fusion.py [--batch 128] [--layers global global_first local3 local5]
           [--dtypes bf16 fp16] [--reps 20] [--max-plans 3] [--out PATH.json] [--compile-only] [--cudnn-root DIR]
           [--device-json FILE]
Writes bench/results/<device-slug>.cudnn_fusion.json (key "cudnn_fusion"); with --device-json,
bench/results/<described device's slug>.cudnn_fusion_deviceless.json (key "cudnn_fusion_deviceless").
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

from common import RESULTS_DIR, device_slug, environment, name_slug, time_reps, write_results  # noqa: E402
from lgc_fast import cudnn_location  # noqa: E402
PROBE_SOURCE = BENCH_DIR / "cudnn_fusion_probe.cpp"
PROBE_BINARY = ROOT / "build" / "cudnn_fusion_probe"

# name -> (in channels, out channels, kernel, dilation)
LAYERS = {
    "global": (128, 128, 3, 4),
    "global_first": (136, 128, 3, 4),
    "local3": (128, 128, 3, 1),
    "local5": (128, 128, 5, 1),
}


class ProbeError(Exception):
    """A one-line reason the probe cannot be built or run."""


def cudnn_paths(explicit: str | None) -> tuple[Path, Path | None]:
    """lgc_fast.cudnn_location.cudnn_paths (the extension's build finds cuDNN the same way), its error a ProbeError."""
    try:
        return cudnn_location.cudnn_paths(explicit)
    except cudnn_location.CudnnNotFound as exc:
        raise ProbeError(f"{exc}, or pass --cudnn-root DIR") from None


def cuda_root() -> Path:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root)
    raise ProbeError("no CUDA toolkit headers (include/cuda_runtime.h); set CUDA_HOME")


def build_probe(include: Path, lib: Path | None, out: Path, compile_only: bool, source: Path = PROBE_SOURCE) -> Path:
    """Compiles (and, unless compile_only, links) the probe, or another program built on its headers (`source`: the
    tests' reference dump); returns the binary or object file."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise ProbeError("no C++ compiler (g++ or $CXX) on PATH")
    cuda = cuda_root()
    # -Wno-deprecated-declarations: the plan's and graph's handle attributes, deprecated in late cuDNN 9 releases
    # and required by early ones
    cmd = [compiler, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Wno-deprecated-declarations", str(source),
           f"-I{include}", f"-I{cuda / 'include'}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    if compile_only:
        cmd += ["-c", "-o", str(out.with_suffix(".o"))]
    else:
        if lib is None:
            raise ProbeError(f"no libcudnn.so.9 beside {include.parent} or torch's nvidia.cudnn package")
        cuda_lib = cuda / "lib64" if (cuda / "lib64").is_dir() else cuda / "lib"
        cmd += [f"-L{lib}", f"-L{cuda_lib}", "-l:libcudnn.so.9", "-lcudart", f"-Wl,-rpath,{lib}",
                f"-Wl,-rpath,{cuda_lib}", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ProbeError(f"building {source.name} failed:\n{done.stderr.strip()}")
    return out.with_suffix(".o") if compile_only else out


def nvidia_library_dirs() -> list[str]:
    """The lib folders of the nvidia.* wheels beside torch (cuDNN, NVRTC, ...): the probe runs outside torch's process,
    and cuDNN's runtime-fusion engines open NVRTC by name, so these go on its LD_LIBRARY_PATH."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return [str(d) for root in roots for d in sorted(root.glob("*/lib")) if d.is_dir()]


def run_probe(binary: Path, batch: int, layer: str, dtype: str, reps: int, max_plans: int,
              timeout_s: float = 300, device_json: Path | None = None) -> list[dict]:
    c, k, r, dil = LAYERS[layer]
    cmd = [str(binary), "--batch", str(batch), "--in", str(c), "--out", str(k), "--size", "96", "--kernel", str(r),
           "--dilation", str(dil), "--dtype", dtype, "--reps", str(reps), "--max-plans", str(max_plans)]
    if device_json is not None:
        cmd += ["--device-json", str(device_json)]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(nvidia_library_dirs() + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:  # the cases it finished still count (one line each, flushed)
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return _rows(partial, layer) + [
            {"layer": layer, "error": f"the probe ran past {timeout_s} s (plan builds that compile kernels?)"}]
    if done.returncode not in (0, 3):  # 3: some case missed its error bound (reported in its line)
        raise ProbeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return _rows(done.stdout, layer)


def _rows(stdout: str, layer: str) -> list[dict]:
    """The probe's complete JSON lines (a line cut off by a timeout is dropped), each tagged with its layer."""
    rows = []
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append({**row, "layer": layer})
    return rows


def torch_baselines(batch: int, layer: str, dtype: str, reps: int) -> dict:
    """Median ms of what the training step runs at this layer now: torch's conv (cuDNN through aten) forward and
    forward + backward, and lgc_fast's fused BN + ReLU + dropout epilogue forward and forward + backward."""
    import torch
    import torch.nn.functional as F

    from lgc_fast.ops.bn_relu_dropout import bn_relu_dropout_drawn, fused_backend

    c, k, r, dil = LAYERS[layer]
    dev = torch.device("cuda")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    cl = torch.channels_last
    x = torch.randn(batch, c, 96, 96, device=dev, dtype=dt).contiguous(memory_format=cl).requires_grad_()
    w = (torch.randn(k, c, r, r, device=dev, dtype=dt) / (c * r * r) ** 0.5).contiguous(memory_format=cl)
    w.requires_grad_()
    gy = torch.randn(batch, k, 96, 96, device=dev, dtype=dt).contiguous(memory_format=cl)
    pad = dil * (r // 2)
    z = torch.randn(batch, k, 96, 96, device=dev, dtype=dt).contiguous(memory_format=cl).requires_grad_()
    gamma = torch.ones(k, device=dev, requires_grad=True)
    beta = torch.zeros(k, device=dev, requires_grad=True)
    running = (torch.zeros(k, device=dev), torch.ones(k, device=dev))
    backend = fused_backend(dev)

    def conv_fwd():
        with torch.no_grad():
            F.conv2d(x, w, padding=pad, dilation=dil)

    def conv_fwd_bwd():
        torch.autograd.grad(F.conv2d(x, w, padding=pad, dilation=dil), (x, w), gy)

    def epilogue_fwd():
        with torch.no_grad():
            bn_relu_dropout_drawn(z, *running, gamma, beta, backend=backend)

    def epilogue_fwd_bwd():
        y = bn_relu_dropout_drawn(z, *running, gamma, beta, backend=backend)[0]
        torch.autograd.grad(y, (z, gamma, beta), gy)

    out = {"epilogue_backend": backend}
    for name, fn in (("torch_conv_fwd", conv_fwd), ("torch_conv_fwd_bwd", conv_fwd_bwd),
                     ("lgc_fast_epilogue_fwd", epilogue_fwd), ("lgc_fast_epilogue_fwd_bwd", epilogue_fwd_bwd)):
        out[name] = time_reps(fn, dev, warmup=3, reps=reps).as_dict()
    return out


# The graphs a fully fused conv block would run in the training step, one of each: forward (previous block's apply +
# ReLU + drawn mask in, this block's statistics out), weight gradient (the same prologue, and the next block's BN
# apply making dy), data gradient (that dy prologue; mask, ReLU and BN backward weights of the previous block out).
FUSED_BLOCK = ("fprop_sbr_rng_stats", "wgrad_sbr_rng_dbnapply", "dgrad_dbnapply_rng_drelu_dbn")


def block_comparison(rows: list[dict], torch_side: dict) -> dict:
    """One conv block forward + backward, fused (the sum of FUSED_BLOCK's best plans; the per-channel finalize
    kernels and the dgrad's scaled filter copy, all O(channels), not counted) against what the step runs now (torch's
    conv forward + backward plus lgc_fast's epilogue forward + backward), both measured in this run. A case that did
    not build or failed its check leaves fused_ms None, with the reason."""
    by_case = {row.get("case"): row for row in rows}
    now = [torch_side.get(k, {}).get("median_ms") for k in ("torch_conv_fwd_bwd", "lgc_fast_epilogue_fwd_bwd")]
    out = {"now_ms": sum(now) if None not in now else None, "fused_ms": None, "fused_cases": list(FUSED_BLOCK)}
    missing = [c for c in FUSED_BLOCK if not (by_case.get(c, {}).get("supported")
                                              and by_case[c].get("check_passed") and by_case[c].get("best_ms"))]
    if missing:
        out["fused_missing"] = missing  # unsupported, failed its check, or not timed
        return out
    out["fused_ms"] = sum(by_case[c]["best_ms"] for c in FUSED_BLOCK)
    if out["now_ms"]:
        out["speedup"] = out["now_ms"] / out["fused_ms"]
    return out


def summary_line(layer: str, dtype: str, rows: list[dict], torch_side: dict) -> str:
    best = {row["case"]: row.get("best_ms") for row in rows if row.get("supported")}
    checks = {row["case"]: row.get("check_passed") for row in rows if row.get("supported")}
    parts = []
    for case, base in (("fprop_stats", "fprop"), ("fprop_sbr_stats", "fprop"), ("fprop_sbr_mask_stats", "fprop"),
                       ("fprop_sbr_mask8_stats", "fprop"), ("fprop_sbr_rng_stats", "fprop"), ("wgrad_sbr", "wgrad"),
                       ("wgrad_sbr_mask", "wgrad"), ("wgrad_sbr_rng", "wgrad"), ("wgrad_dbnapply", "wgrad"),
                       ("wgrad_sbr_rng_dbnapply", "wgrad"), ("dgrad_dbnapply", "dgrad"), ("dgrad_drelu_dbn", "dgrad"),
                       ("dgrad_mask_drelu_dbn", "dgrad"), ("dgrad_rng_drelu_dbn", "dgrad"),
                       ("dgrad_dbnapply_rng_drelu_dbn", "dgrad")):
        if best.get(case) is None:
            parts.append(f"{case} unsupported")
        else:
            over = f" (+{best[case] - best[base]:.3f} over {base})" if best.get(base) is not None else ""
            parts.append(f"{case} {best[case]:.3f} ms{over}{'' if checks.get(case) else ' CHECK FAILED'}")
    epi = torch_side.get("lgc_fast_epilogue_fwd_bwd", {}).get("median_ms")
    epi_text = f"; lgc_fast epilogue fwd+bwd {epi:.3f} ms" if epi is not None else ""
    block = block_comparison(rows, torch_side)
    if block["fused_ms"] is None:
        block_text = f"; fused block unavailable ({', '.join(block.get('fused_missing', []))})"
    else:
        now = f" against {block['now_ms']:.3f} now ({block['speedup']:.2f}x)" if block.get("speedup") else ""
        block_text = f"; fused block fwd+bwd {block['fused_ms']:.3f} ms{now}"
    return f"{layer} {dtype}: " + "; ".join(parts) + epi_text + block_text


def earlier_entries(path: Path) -> list[dict]:
    """The layers an earlier run recorded in `path` (each with its own environment): a run of other layers, as the
    device calls split them, adds to them instead of replacing them."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text()).get("cudnn_fusion", {}).get("entries", [])
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ProbeError(f"{path}: not a results file this bench wrote ({exc}); move it away to start anew")
    return [e for e in entries if isinstance(e, dict) and "environment" in e]  # older entries name no commit


def merge_entry(entries: list[dict], entry: dict) -> list[dict]:
    """entries with `entry` in place of an earlier one of the same layer, dtype and batch."""
    key = (entry["layer"], entry["dtype"], entry["batch"])
    return [e for e in entries if (e.get("layer"), e.get("dtype"), e.get("batch")) != key] + [entry]


def deviceless(binary: Path, device_json: Path, args) -> Path:
    """Which cases build for the GPU `device_json` describes, per layer and dtype (no GPU used); returns the file."""
    import torch

    try:
        described = json.loads(device_json.read_text())
        name = described["deviceName"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ProbeError(f"--device-json {device_json}: not a device-properties file with a deviceName ({exc})")
    env = environment("cpu")
    env.update(described_device=name, device_json=str(device_json), cudnn_torch=torch.backends.cudnn.version())
    out = args.out or RESULTS_DIR / f"{name_slug(name)}.cudnn_fusion_deviceless.json"
    entries = []
    for dtype in args.dtypes:
        for layer in args.layers:
            rows = run_probe(binary, args.batch, layer, dtype, args.reps, args.max_plans, device_json=device_json)
            built = [row["case"] for row in rows if row.get("supported")]
            entries.append({"layer": layer, "dtype": dtype, "batch": args.batch, "probe": rows, "built": built})
            print(f"{layer} {dtype}: builds {', '.join(built) or 'nothing'}", flush=True)
    write_results(out, "cudnn_fusion_deviceless", {"environment": env, "entries": entries})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=list(LAYERS))
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp16"), default=["bf16"],
                        help="bf16: the training step's autocast dtype; fp16 where a fused engine takes only it")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--max-plans", type=int, default=3,
                        help="plans built and timed per case (runtime-fusion plans compile when built)")
    parser.add_argument("--cudnn-root", help="folder with include/cudnn.h and lib/libcudnn.so.9")
    parser.add_argument("--compile-only", action="store_true", help="build the probe (no GPU needed) and stop")
    parser.add_argument("--binary", type=Path, default=PROBE_BINARY, help="where to build the probe")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<device>.cudnn_fusion.json)")
    parser.add_argument("--device-json", type=Path,
                        help="build only, for the GPU this cuDNN device-properties JSON describes (no GPU needed)")
    args = parser.parse_args(argv)
    try:
        include, lib = cudnn_paths(args.cudnn_root)
        built = build_probe(include, lib, args.binary, args.compile_only)
        print(f"built {built} against {include}" + (f" and {lib}" if lib and not args.compile_only else ""))
        if args.compile_only:
            return 0
        if args.device_json is not None:
            print(f"wrote {deviceless(built, args.device_json, args)}")
            return 0
        import torch
        if not torch.cuda.is_available():
            raise ProbeError("needs a CUDA GPU (the probe compiled; nothing was measured)")
        env = environment("cuda")
        env["cudnn_torch"] = torch.backends.cudnn.version()
        out = args.out or RESULTS_DIR / f"{device_slug('cuda')}.cudnn_fusion.json"
        entries = earlier_entries(out)
        for dtype in args.dtypes:
            for layer in args.layers:
                start = time.perf_counter()
                rows = run_probe(built, args.batch, layer, dtype, args.reps, args.max_plans)
                torch_side = torch_baselines(args.batch, layer, dtype, args.reps)
                entry = {"layer": layer, "dtype": dtype, "batch": args.batch, "environment": env, "probe": rows,
                         "same_run_torch": torch_side, "block": block_comparison(rows, torch_side),
                         "summary": summary_line(layer, dtype, rows, torch_side)}
                entries = merge_entry(entries, entry)
                # after every layer, so a run cut short by the device call's time limit keeps what it measured
                write_results(out, "cudnn_fusion", {"environment": env, "entries": entries})
                print(f"{entry['summary']} [{time.perf_counter() - start:.0f} s]", flush=True)
        print(f"wrote {out}")
        return 0
    except ProbeError as exc:
        print(f"bench_cudnn_fusion: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
