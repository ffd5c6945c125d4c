"""Helpers shared by the benches in bench/: timing (medians and quantiles), the run's environment, peak memory
bandwidth by device, tables, and JSON results merged by bench name into one file per device (atomic writes).

Typical use::

    from common import Timing, time_interleaved, environment, write_results, results_path
    timings = time_interleaved({"mine": f, "torch": g}, device)   # {name: Timing}
    timing = time_reps(f, device, warmup=2, reps=20)                # a fixed number of calls: one Timing
    write_results(results_path(device), "my_bench", {"results": [...]})
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

# Datasheet peak DRAM bandwidth in bytes/s; the most specific name first (matched as a substring of the device name).
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # the 40 GB parts
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
]

# Dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets: bf16/fp16, and tf32 for float32 convolutions.
# Most specific name first; the H200 has the H100 SXM's compute.
DATASHEET_PEAK = [("H200", (989.4, 494.7)), ("H100 PCIe", (756.5, 378.0)), ("H100 NVL", (835.0, 417.5)),
                  ("H100", (989.4, 494.7))]


def op_bench_parser(doc: str, quick: str, batch: str) -> argparse.ArgumentParser:
    """A parser with the options every op bench takes: --device, --quick (`quick` says what it runs), --batch
    (`batch` gives the defaults) and --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    parser.add_argument("--batch", type=int, help=f"N (default {batch})")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    return parser


def peak_bandwidth(name: str) -> float | None:
    """Datasheet DRAM bandwidth (bytes/s) of the device called `name`, or None when it is not in the table."""
    for key, value in PEAK_BANDWIDTH:
        if key in name:
            return value
    return None


def datasheet_peak(name: str, dtype: torch.dtype) -> float | None:
    """Datasheet dense tensor-core TFLOP/s of the device called `name` in `dtype` (TF32 for float32), or None."""
    for key, (half, tf32) in DATASHEET_PEAK:
        if all(part in name for part in key.split()):
            return tf32 if dtype == torch.float32 else half
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def name_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_slug(device: torch.device | str) -> str:
    """File-name form of the device: "cpu-amd-epyc", "nvidia-h100-80gb-hbm3"."""
    device = torch.device(device)
    return name_slug(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu " + cpu_model())


def results_path(device: torch.device | str) -> Path:
    return RESULTS_DIR / f"{device_slug(device)}.json"


def git_commit() -> str | None:
    """HEAD of the checkout (with "+dirty" when the working tree differs), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def environment(device: torch.device | str) -> dict:
    """What the numbers depend on: device, software versions, commit, threads, and the CPU load when they ran."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # A copy of the tree whose .git is missing or stale (a lent GPU machine) names its commit in LGC_FAST_COMMIT.
        "commit": os.environ.get("LGC_FAST_COMMIT") or git_commit(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = os.getloadavg()[0]
    if os.environ.get("LGC_FAST_NVCC_FLAGS"):  # a tuning build's flags (bench/gpu_session.sh epilogue sets both)
        env["nvcc_flags"] = os.environ["LGC_FAST_NVCC_FLAGS"]
    if device.type == "cuda":
        env["peak_bandwidth_bytes_per_s"] = peak_bandwidth(env["device"])
    return env


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Timing:
    """Time per call of one method, in milliseconds: median and 20/80 % quantiles (+ the raw samples if kept)."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int | None = None
    min_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    cpu_median_ms: float | None = None  # process CPU time per call, all threads (CPU timings only)
    note: str = ""

    @classmethod
    def from_samples(cls, samples_ms: list[float], cpu_ms: list[float] | None = None, note: str = "") -> "Timing":
        s = sorted(samples_ms)
        cpu = statistics.median(cpu_ms) if cpu_ms else None
        return cls(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), s[0], list(samples_ms), cpu,
                   note)

    def scaled(self, factor: float, note: str) -> "Timing":
        """The timing times `factor` (e.g. measured on a part of the work and extrapolated to all of it)."""
        def mul(v):
            return None if v is None else v * factor
        return Timing(self.median_ms * factor, self.p20_ms * factor, self.p80_ms * factor, self.runs,
                      mul(self.min_ms), [v * factor for v in self.samples_ms], mul(self.cpu_median_ms), note)

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 200) -> Timing:
    """CUDA timing with triton.testing.do_bench (CUDA events, L2 cleared between calls)."""
    from triton.testing import do_bench
    p20, median, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return Timing(median, p20, p80, note="triton.testing.do_bench")


def time_reps(fn: Callable[[], object], device: torch.device | str, warmup: int, reps: int) -> Timing:
    """`warmup` untimed calls, then `reps` timed calls one after another: CUDA events around each call on a GPU,
    wall clock (and process CPU time) on the CPU. For benches that time a fixed number of calls per method."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples, cpu = [], []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return Timing.from_samples(samples, cpu or None, note="CUDA events" if device.type == "cuda" else "")


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                     warmup: int | dict[str, int] = 1, min_runs: int = 5, max_runs: int = 50, budget_s: float = 10.0,
                     runs: dict[str, int] | None = None) -> dict[str, Timing]:
    """Wall-clock timing of several methods in rounds (one call of each per round), so that a changing machine load
    (other processes) hits every method alike. Each method gets `warmup` untimed calls (an int, or per method name),
    then rounds continue until every method has `min_runs` samples and either `max_runs` are reached or `budget_s`
    seconds were spent in the methods without a cap. `runs` caps the samples of slow methods individually (e.g.
    {"conv2d": 3}); their time does not count against the budget."""
    runs = runs or {}
    for name, fn in fns.items():
        for _ in range(warmup.get(name, 1) if isinstance(warmup, dict) else warmup):
            fn()
        synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0  # seconds in the uncapped methods
    for round_ in range(max_runs):
        if round_ >= min_runs and spent > budget_s:
            break
        for name, fn in fns.items():
            if len(samples[name]) >= runs.get(name, max_runs):
                continue
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            synchronize(device)
            seconds = time.perf_counter() - t0
            samples[name].append(seconds * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
            if name not in runs:
                spent += seconds
    keep_cpu = torch.device(device).type == "cpu"
    return {name: Timing.from_samples(s, cpu[name] if keep_cpu else None) for name, s in samples.items()}


def sm90_resources(fn, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int) -> dict:
    """Compile the Triton kernel `fn` for sm_90 without a GPU and read its resources: {"regs", "spill_stack_bytes",
    "shared_bytes", "loop_sass", "wgmma_serialized", "ptx"}. signature: every argument's Triton type ("constexpr" for
    those in `constexprs`, which are keyed by name); attrs: ASTSource's (argument index tuple -> attributes).
    loop_sass: the machine instructions of one iteration of the innermost loop that issues wgmma (None without one),
    what a thread issues per K step besides the MMA; wgmma_serialized: whether ptxas reported (C7515) that it makes
    each wgmma wait for the one before."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return dict(regs=regs, spill_stack_bytes=stack, shared_bytes=compiled.metadata.shared,
                loop_sass=mma_loop_size(sass), wgmma_serialized=wgmma_serialized(compiled.asm["ptx"]),
                ptx=compiled.asm["ptx"])


def sm90_ptxas() -> str:
    """The ptxas Triton assembles sm_90 code with: the one its NVIDIA backend picks for the architecture (Triton 3.9
    bundles one a CUDA generation), else the one it bundles."""
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(90).path
    except (ImportError, TypeError, AttributeError):  # Tritons without the per-architecture choice
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas serialises the wgmmas of `ptx` (its note C7515: each waits for the one before, no MMA overlaps
    the next), from its notes (-v), which Triton's own compile does not show."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "k.ptx")
        Path(source).write_text(ptx)
        notes = subprocess.run([sm90_ptxas(), "-arch=sm_90a", "-v", source, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True, check=True).stderr
    return "C7515" in notes


def mma_loop_size(sass: str):
    """Instructions in the smallest natural loop of `sass` (nvdisasm's listing) that issues HGMMA, or None."""
    code, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(code)
        op = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if op:
            code.append(op.group(1))
    target = {i: labels[m.group(1)] for i, ins in enumerate(code)
              if (m := re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", ins)) and m.group(1) in labels}
    starts = sorted({0, *labels.values(), *(i + 1 for i, ins in enumerate(code) if re.search(r"\b(BRA|EXIT)\b", ins))})
    starts = [s for s in starts if s < len(code)]
    ends = dict(zip(starts, starts[1:] + [len(code)]))
    preds: dict[int, set] = {s: set() for s in starts}
    for s, e in ends.items():
        last = e - 1
        if last in target:
            preds[target[last]].add(s)
        falls = not (re.search(r"\b(BRA|EXIT)\b", code[last]) and not code[last].startswith("@"))
        if falls and e < len(code):
            preds[e].add(s)
    best = None
    for s in starts:
        head = target.get(ends[s] - 1)
        if head is None or head > s:  # not a back edge
            continue
        loop, work = {head, s}, [s]
        while work:  # the blocks that reach the back edge without passing the header
            for p in preds[work.pop()] - loop:
                loop.add(p)
                work.append(p)
        size = sum(ends[b] - b for b in loop)
        if any("HGMMA" in code[i] for b in loop for i in range(b, ends[b])) and (best is None or size < best):
            best = size
    return best


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table: columns are (key, header); floats with 4 significant digits, None as "-"."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(header), *(len(r[i]) for r in body)) if body else len(header)
              for i, (_, header) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def write_results(path: Path | str, bench: str, payload: dict) -> Path:
    """Stores payload (give it an "environment" entry) under key `bench` of the JSON file at `path`, keeping the
    other benches' entries. Read-merge-write under an exclusive lock, replaced atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # the folder is the lock: no lock file is left behind
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc}); move it away to start a new results file") from exc
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object keyed by bench name")
        data[bench] = payload
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        os.close(lock)
    return path


__all__ = ["PEAK_BANDWIDTH", "Timing", "device_name", "device_slug", "environment", "format_table",
           "git_commit", "peak_bandwidth", "results_path", "sm90_resources", "synchronize", "time_cuda",
           "time_interleaved", "time_reps", "write_results"]
