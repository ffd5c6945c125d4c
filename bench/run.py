"""Run every bench in bench/ and render their merged results as a Markdown table.

Each bench runs as its own process (a crash or an out-of-memory kill in one does not stop the others); a failing
bench is reported and the rest still run. The benches merge their results by bench name into
bench/results/<device-slug>.json; this script then writes bench/results/<device-slug>.md with one row per
lgc_fast measurement: op, size, lgc_fast median, baseline median (the torch composition the bench compares against,
timed in the same run), speed-up (baseline / lgc_fast: > 1 means lgc_fast is faster) and device.

Usage:
  python bench/run.py [--quick] [--only lgc_loss fit_shape ...] [--out PATH.json] [--markdown PATH.md]
  python bench/run.py --render-only [--out PATH.json] [--markdown PATH.md]   # no benches run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

# Bench name -> (extra arguments of a full run, of a --quick run). None: the bench has no --out option.
BENCHES = {
    "kernel_conv": ([], ["--quick"]),
    "lgc_loss": ([], ["--quick"]),
    "fit_shape": ([], ["--quick"]),
    "dilated_block": ([], ["--quick"]),
    "fused_conv": ([], ["--quick"]),
    "bn_relu_dropout": ([], ["--quick"]),
    "layout": ([], ["--quick"]),
    "bn_finalize": ([], ["--quick"]),
    "same_conv2d": ([], ["--quick"]),
    "train_step": ([], ["--quick"]),
    "inference": ([], ["--frames", "720p", "--runs", "1", "--warmup", "0"]),
    "detect": ([], ["--quick"]),
    "landmarks": ([], ["--quick"]),
}


# The train step's modes after eager-ref, as bench_train_step.py names them.
MODES_OF_TRAIN_STEP = ("lgc_fast", "lgc_fast-fused", "lgc_fast-compiled", "lgc_fast-fused-compiled",
                       "lgc_fast-fused-nhwc-heads")


def run_benches(names: list[str], quick: bool, out: Path | None) -> dict[str, str]:
    """Runs the benches one after another; returns {name: why it failed} for those that did not exit 0."""
    failures = {}
    for name in names:
        full, small = BENCHES[name]
        cmd = [sys.executable, str(BENCH_DIR / f"bench_{name}.py"), *(small if quick else full)]
        if out is not None:
            cmd += ["--out", str(out)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.run(cmd, cwd=ROOT).returncode
        except OSError as exc:
            failures[name] = f"could not start: {exc}"
            continue
        print(f"=== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failures[name] = f"exit status {rc}"
    return failures


def _row(op, size, fast_ms, base_ms, device):
    speedup = base_ms / fast_ms if fast_ms and base_ms is not None else None
    return {"op": op, "size": size, "fast_ms": fast_ms, "base_ms": base_ms, "speedup": speedup, "device": device}


def rows_kernel_conv(entry, device):
    rows = entry.get("results", [])
    for r in rows:
        if r.get("kind") == "lgc_fast scale":  # against its own baseline, the multiply after kernel_conv
            yield _row(f"kernel_conv {r['pass']} ({r['method']}) vs {r['fastest_alt']}", r["size"], r["median_ms"],
                       r["median_ms"] * r["x_fastest_alt"], device)
            continue
        if r.get("kind") != "lgc_fast":
            continue
        base = next((b for b in rows if b["method"] == "conv2d" and b["size"] == r["size"]
                     and b["pass"] == r["pass"]), None)
        if base is not None:
            yield _row(f"kernel_conv {r['pass']} ({r['method']}) vs conv2d", r["size"], r["median_ms"],
                       base["median_ms"], device)
        elif r.get("fastest_alt"):
            yield _row(f"kernel_conv {r['pass']} ({r['method']}) vs {r['fastest_alt']}", r["size"], r["median_ms"],
                       r["median_ms"] * r["x_fastest_alt"], device)


def rows_lgc_loss(entry, device):
    size = "x".join(map(str, entry.get("shape", [])))
    for r in entry.get("results", []):
        yield _row(f"lgc_loss fwd+bwd ({r['backend']}, {r['dtype']}) vs lgc_loss_ref", size,
                   r["fused_fwd_bwd"]["median_ms"], r["torch_fwd_bwd"]["median_ms"], device)


def rows_fit_shape(entry, device):
    fits = entry.get("fit", [])
    ref = next((r for r in fits if "speedup_vs_ref_loop" not in r), None)
    if ref is None:
        return
    for r in fits:
        if r is ref:
            continue
        # Per face: the batched call and the reference loop run on different numbers of faces.
        yield _row(f"{r['impl']} vs fit_shape_ref loop (ms/face)", f"{r['batch']} faces x 68x96x96",
                   r["median_ms"] / r["batch"], ref["median_ms"] / ref["batch"],
                   device if r.get("device", "cpu") == "cpu" else r["device"])


def rows_dilated_block(entry, device):
    for r in entry.get("rows", []):  # the sm_90 compile report (dilated_block_sm90_compile) has no timed rows
        if "triton_ms" not in r and "ref_ms" not in r:
            continue
        size = f"{r['n']}x{r['c_in']}x{r['hw']}x{r['hw']}"
        if "triton_ms" in r:
            yield _row(f"dilated_block {r['variant']} ({r['dtype']}, triton) vs cuDNN composed", size,
                       r["triton_ms"][0], r["cudnn_ms"][0], device)
        elif "ref_ms" in r:
            yield _row(f"dilated_block {r['variant']} ({r['dtype']}, ref backend) vs torch composed", size,
                       r["ref_ms"][0], r["composed_ms"][0], device)


def rows_fused_conv(entry, device):
    for r in entry.get("rows", []):  # the sm_90 compile report (fused_conv_sm90_compile) has no timed rows
        if "lgc_fast_ms" not in r:
            continue
        against = {"conv": "cuDNN conv", "block": "epilogue passes + conv", "dgrad": "cuDNN plain input gradient",
                   "wgrad": "cuDNN plain filter gradient"}[r["variant"]]
        yield _row(f"fused_conv {r['variant']} ({r['dtype']}) vs {against}", f"{r['layer']}, N={r['n']}, {r['hw']}²",
                   r["lgc_fast_ms"], r["baseline_ms"], device)


def rows_bn_relu_dropout(entry, device):
    by_case = {}
    for r in entry.get("results", []):
        by_case.setdefault((r["dtype"], r.get("layout", "channels_last"), tuple(r["shape"])), {})[r["method"]] = r
    for (dtype, layout, _), methods in by_case.items():
        # The mask methods: "lgc_fast <backend>" (byte mask; "lgc_fast" in results from before the bench named
        # backends), "lgc_fast <backend> bits" (keep bits) and "lgc_fast <backend> drawn" (keep bits drawn in the op).
        fast = {name: r for name, r in methods.items() if name.startswith("lgc_fast") and not name.endswith("seeded")}
        for fast_name, r in fast.items():
            backend = f", {r['backend']}" if "backend" in r else ""
            if r.get("dropout") in ("keep bits", "drawn bits"):
                backend += f", {r['dropout']}"
            for name in ("torch eager", "torch compiled"):
                if name in methods:
                    yield _row(f"bn_relu_dropout fwd+bwd ({dtype}, {layout}, training{backend}) vs {name}",
                               "x".join(map(str, r["shape"])), r["median_ms"], methods[name]["median_ms"], device)


def rows_layout(entry, device):
    size = (f"{entry.get('batch')}x{entry.get('width')} -> {entry.get('landmarks')}x{entry.get('size')}^2 "
            f"{entry.get('dtype')}")
    rows = entry.get("results", [])
    for r in rows:
        base = next((b for b in rows if b["case"] == r["case"] and b["method"] == r["baseline"]), None)
        if base is not None and r is not base and r["method"].startswith("lgc_fast"):
            yield _row(f"{r['case']} fwd+bwd: {r['method']} vs {base['method']}", size, r["median_ms"],
                       base["median_ms"], device)


def rows_bn_finalize(entry, device):
    rows = entry.get("results", [])
    base = next((r for r in rows if r["method"].startswith("bn_finalize_ref")), None)
    size = f"{entry.get('channels')} channels {entry.get('dtype')}, per call"
    for r in rows:
        if base is not None and r is not base and "us_per_call" in r:
            yield _row(f"{r['method']} vs {base['method']}", size, r["us_per_call"] / 1e3, base["us_per_call"] / 1e3,
                       device)


def rows_same_conv2d(entry, device):
    size = f"batch {entry.get('batch')}, {entry.get('size')}^2 {entry.get('dtype')} {entry.get('layout')}"
    groups = {}
    for r in entry.get("results", []):
        groups.setdefault((r["layer"], r["direction"]), []).append(r)
    for (layer, direction), rows in groups.items():
        base = rows[0]  # the bench lists each direction's baseline first
        for r in rows[1:]:
            yield _row(f"{layer} conv {direction}: {r['method']} vs {base['method']}", size, r["median_ms"],
                       base["median_ms"], device)
    # the first layer's image with channels_last strides (what LGCN passes) against planar ones (what it passed)
    firsts = {layer: rows[0] for (layer, direction), rows in groups.items()
              if layer.startswith("local 5x5, first") and direction == "forward"}
    cl, planar = (next((r for name, r in firsts.items() if name.endswith(kind)), None)
                  for kind in ("channels_last image", "planar image"))
    if cl is not None and planar is not None:
        yield _row(f"local 5x5, first conv forward ({cl['method']}): channels_last image vs planar image", size,
                   cl["median_ms"], planar["median_ms"], device)


def rows_train_step(entry, device):
    config = entry.get("config", {})
    numerics = "bfloat16 autocast" if config.get("amp") else "float32"
    by_batch = {}
    for r in entry.get("results", []):
        by_batch.setdefault(r["batch"], {})[r["mode"]] = r
    for batch, modes in by_batch.items():
        for mode in MODES_OF_TRAIN_STEP:
            if mode in modes and "eager-ref" in modes:
                name = mode if not mode.endswith("compiled") else \
                    f"{mode.removesuffix('-compiled')}, torch.compile mode {config.get('compile')}"
                yield _row(f"train step ({name}) vs eager torch reference",
                           f"batch {batch}, width {config.get('width')}, {numerics}", modes[mode]["median_ms"],
                           modes["eager-ref"]["median_ms"], device)
        if "lgc_fast-fused" in modes and "lgc_fast-fused-fprop" in modes:
            yield _row("train step (lgc_fast-fused: convolutions on cuDNN's faster kernel family) vs the same on its "
                       "forward kernels only (lgc_fast-fused-fprop)", f"batch {batch}, width {config.get('width')}, "
                       f"{numerics}", modes["lgc_fast-fused"]["median_ms"],
                       modes["lgc_fast-fused-fprop"]["median_ms"], device)
        for mode, r in modes.items():  # --compare-amp: bfloat16 autocast against float32, same mode, same run
            other = modes.get(f"{mode}+no-amp" if r.get("amp") else f"{mode}+amp")
            if other is not None:
                amp, fp32 = (r, other) if r["amp"] else (other, r)
                yield _row(f"train step ({mode}), bfloat16 autocast vs float32", f"batch {batch}, width "
                           f"{config.get('width')}", amp["median_ms"], fp32["median_ms"], device)


def rows_inference(entry, device):
    rows = entry.get("results", [])
    for r in rows:
        if r["method"] == "untiled" or "median_s" not in r:
            continue
        base = next((b for b in rows if b["frame"] == r["frame"] and b["method"] == "untiled" and "median_s" in b),
                    None)
        yield _row(f"inference {r['method']} vs untiled forward", f"{r['frame']} frame",
                   r["median_s"] * 1e3, None if base is None else base["median_s"] * 1e3, device)


def rows_landmarks(entry, device):
    by_batch = {}
    for r in entry.get("results", []):
        by_batch.setdefault(r["batch"], {})[r["mode"]] = r
    for batch, modes in by_batch.items():
        if "lgc_fast" in modes and "eager-ref" in modes:
            fast = modes["lgc_fast"]
            size = f"batch {batch}, {entry.get('config', {}).get('model')}"
            yield _row(f"landmarks, given boxes ({fast['faces_per_s']:.0f} faces/s) vs eager torch reference", size,
                       fast["median_ms"], modes["eager-ref"]["median_ms"], device)
            if "lgc_fast-modules" in modes:
                yield _row("landmarks, given boxes, Detector's network (folded, channels_last) vs its modules",
                           size, fast["median_ms"], modes["lgc_fast-modules"]["median_ms"], device)
            for mode, precision in (("lgc_fast-fp16", "float16"), ("lgc_fast-bf16", "bfloat16")):
                reduced = modes.get(mode)
                if reduced is not None:
                    yield _row(f"landmarks, given boxes, precision {precision} ({reduced['faces_per_s']:.0f} faces/s; "
                               f"points within {reduced['max_point_shift_px']:.2g} px of float32's) vs float32",
                               size, reduced["median_ms"], fast["median_ms"], device)


def rows_detect(entry, device):
    default = next((r for r in entry.get("results", []) if r.get("default")), None)
    if default is not None:
        height, width = entry["image_size"]
        yield _row(f"detect (pyramid forward; default thresholds: recall {default['recall']:.2f}, precision "
                   f"{default['precision']:.2f})", f"{width}x{height} scene", entry["forward_ms"]["median"], None,
                   device)


RENDERERS = {name: globals()[f"rows_{name}"] for name in BENCHES}


def table_rows(results: dict) -> list[dict]:
    """One row per lgc_fast measurement of every known bench in the merged results (keys like inference_TAG too)."""
    rows = []
    for key in sorted(results):
        name = next((n for n in BENCHES if key == n or key.startswith(n + "_")), None)
        if name is None:
            continue
        entry = results[key]
        device = entry.get("environment", {}).get("device", "?")
        for row in RENDERERS[name](entry, device):
            if key != name:
                row["op"] += f" [{key}]"
            rows.append(row)
    return rows


def render_markdown(results: dict, title: str) -> str:
    def ms(value):
        if value is None:
            return "-"
        return f"{value / 1e3:.4g} s" if value >= 1e3 else f"{value:.4g} ms"

    def ratio(value):
        if value is None:
            return "-"
        return f"{value:.0f}x" if value >= 100 else f"{value:.3g}x"

    lines = [f"# {title}", "",
             "Medians of the timed calls; baseline timed in the same run; speed-up = baseline / lgc_fast "
             "(> 1: lgc_fast is faster).", "",
             "| op | size | lgc_fast median | baseline median | speed-up | device |",
             "|---|---|---:|---:|---:|---|"]
    for r in table_rows(results):
        cells = [r["op"], r["size"], ms(r["fast_ms"]), ms(r["base_ms"]), ratio(r["speedup"]), r["device"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "| bench | commit | torch | triton | time |", "|---|---|---|---|---|"]
    for key in sorted(results):
        env = results[key].get("environment", {}) if isinstance(results[key], dict) else {}
        lines.append(f"| {key} | {env.get('commit', '-')} | {env.get('torch', '-')} | {env.get('triton', '-')} | "
                     f"{env.get('time', '-')} |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    """Atomic: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every bench in its smallest (smoke) setting")
    p.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these benches")
    p.add_argument("--render-only", action="store_true", help="run no bench; render the Markdown from --out")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/<device-slug>.json)")
    p.add_argument("--markdown", type=Path, help="Markdown file (default: the results JSON with suffix .md)")
    args = p.parse_args(argv)

    failures = {}
    if not args.render_only:
        failures = run_benches(args.only or list(BENCHES), args.quick, args.out)
    out = args.out
    if out is None:
        import torch  # only here: --help and --render-only with --out need no torch import

        sys.path.insert(0, str(BENCH_DIR))
        from common import results_path
        out = results_path(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not out.is_file():
        print(f"error: --out {out}: no results file to render", file=sys.stderr)
        return 1
    try:
        results = json.loads(out.read_text())
    except json.JSONDecodeError as exc:
        print(f"error: --out {out}: not valid JSON ({exc})", file=sys.stderr)
        return 1
    if not isinstance(results, dict):
        print(f"error: --out {out}: expected a JSON object keyed by bench name", file=sys.stderr)
        return 1
    markdown = args.markdown or out.with_suffix(".md")
    write_text(markdown, render_markdown(results, f"lgc_fast benchmarks: {out.stem}"))
    print(f"wrote {markdown}")
    for name, why in failures.items():
        print(f"FAILED: {name}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
