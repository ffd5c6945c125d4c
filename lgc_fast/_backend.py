"""Which implementation of each op runs: the compiled extension, Triton, or plain torch.

Order of preference for a tensor on a CUDA device: ``cuda`` (compiled CUDA kernels) -> ``triton`` -> ``ref``.
On the CPU: ``cpu`` (compiled C++ kernels) -> ``ref``; ``triton`` runs on the CPU only under ``TRITON_INTERPRET=1``
and only when asked for by name. ``LGC_FAST_BACKEND`` overrides the automatic choice; a ``backend=`` argument
overrides both.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "ref")
ENV_VAR = "LGC_FAST_BACKEND"


@functools.lru_cache(maxsize=None)
def _extension():
    """(module or None, reason). Never builds anything; warns once when the extension is missing."""
    try:
        return importlib.import_module("lgc_fast._C"), "built"
    except ImportError as exc:
        reason = f"compiled extension lgc_fast._C not importable ({exc})"
        fallback = "triton/ref on CUDA, ref on CPU" if torch.cuda.is_available() else "ref (plain torch)"
        warnings.warn(f"lgc_fast: {reason}; using {fallback}", RuntimeWarning, stacklevel=3)
        return None, reason


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton not importable ({exc})"
    return True, "triton " + importlib.import_module("triton").__version__


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _numpy_refuses_sized_scalars() -> bool:
    """Whether int() of a one-element NumPy array raises (NumPy 2.4 does; earlier versions warn)."""
    import numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(numpy.ones(1))
        except TypeError:
            return True
    return False


def _interpreter_defect() -> str | None:
    """Why this Triton's interpreter cannot run the kernels right here, or None."""
    import numpy
    import triton

    version = triton.__version__
    if version.startswith("3.0.") and int(numpy.__version__.split(".")[0]) >= 2:
        return (f"triton {version}'s interpreter drops the kernels' stores under NumPy {numpy.__version__} "
                "(it works with NumPy 1)")
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < (3, 7) and _numpy_refuses_sized_scalars():
        return (f"triton {version}'s interpreter converts loop bounds with int(), which NumPy {numpy.__version__} "
                "refuses for its one-element arrays (Triton 3.7 on, or NumPy before 2.4, works)")
    return None


def backends() -> dict[str, tuple[bool, str]]:
    """Every backend with (available, why or why not)."""
    ext, ext_reason = _extension()
    has_triton, triton_reason = _triton()
    cuda_dev = torch.cuda.is_available()
    report = {}
    if ext is None:
        report["cuda"] = (False, ext_reason)
    elif not ext.with_cuda:
        report["cuda"] = (False, "extension built without CUDA (torch without CUDA or no nvcc at build time)")
    elif not cuda_dev:
        report["cuda"] = (False, "no CUDA device visible")
    else:
        graphs = "with" if getattr(ext, "with_cudnn_graphs", False) else "without"
        report["cuda"] = (True, f"compiled CUDA kernels, {graphs} the cuDNN conv graphs of conv_stack")
    if not has_triton:
        report["triton"] = (False, triton_reason)
    elif cuda_dev:
        report["triton"] = (True, triton_reason + " on CUDA")
    elif triton_interpret():
        defect = _interpreter_defect()
        report["triton"] = (False, defect) if defect else (True, triton_reason + " in the interpreter "
                                                                  "(TRITON_INTERPRET=1, slow)")
    else:
        report["triton"] = (False, triton_reason + " present but no CUDA device (set TRITON_INTERPRET=1 to interpret)")
    if ext is None:
        report["cpu"] = (False, ext_reason)
    else:
        omp = "OpenMP" if ext.with_openmp else "no OpenMP"
        report["cpu"] = (True, f"compiled C++ kernels ({omp}, {torch.get_num_threads()} threads)")
    report["ref"] = (True, "plain torch reference")
    return report


def _available(name: str) -> bool:
    """backends()[name][0] without writing the report's reasons: ops ask on every call (host time per conv block)."""
    if name == "ref":
        return True
    ext = _extension()[0]
    if name == "cpu":
        return ext is not None
    if name == "cuda":
        return ext is not None and ext.with_cuda and torch.cuda.is_available()
    if not _triton()[0]:
        return False
    return torch.cuda.is_available() or (triton_interpret() and _interpreter_defect() is None)


@torch.compiler.assume_constant_result  # the same answer in a compiled graph (and dynamo cannot trace the caches)
def _usable(name: str, device: torch.device) -> tuple[bool, str]:
    """(whether backend `name` runs `device`'s tensors here, why not; "" where it does)."""
    if not _available(name):
        return False, backends()[name][1]
    if name == "cuda" and device.type != "cuda":
        return False, "the cuda backend needs CUDA tensors"
    if name == "cpu" and device.type != "cpu":
        return False, "the cpu backend needs CPU tensors"
    if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and triton_interpret())):
        return False, "triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    return True, ""


# Dynamo cannot trace the import checks below; the answers are constants for a compiled graph anyway.
@torch.compiler.assume_constant_result
def has_compiled_kernels(device_type: str) -> bool:
    """Whether the compiled extension has kernels for "cpu" or "cuda" tensors (importing it where no op has yet)."""
    ext = _extension()[0]
    return ext is not None and (device_type == "cpu" or (device_type == "cuda" and ext.with_cuda))


@torch.compiler.assume_constant_result
def choose(op: str, device: torch.device, backend: str | None, supported=BACKENDS) -> str:
    """The backend that runs `op` on `device`: `backend` if given, else $LGC_FAST_BACKEND, else the best available."""
    requested, source = backend, "backend"
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], ENV_VAR
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, not {requested!r}")
        if requested not in supported:
            raise ValueError(f"{op}: {source}={requested!r} is not implemented for this op")
        ok, why = _usable(requested, device)
        if not ok:
            raise ValueError(f"{op}: {source}={requested!r} is not usable here: {why}")
        return requested
    order = ("cuda", "triton", "ref") if device.type == "cuda" else ("cpu", "ref")
    for name in order:
        if name in supported and _usable(name, device)[0]:
            return name
    return "ref"


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instruction sets that multiply bfloat16


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> tuple[bool, str]:
    """(whether this x86 CPU multiplies bfloat16 in hardware, the instruction sets found): AVX512-BF16 or AMX-BF16.

    oneDNN runs bfloat16 convolutions with them at about twice the float32 speed (the bundled network's forward on a
    Zen 4 EPYC: 2.0x); elsewhere it emulates bfloat16 and is slower than float32. Other architectures answer False
    (not measured here)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # missing in older torch: the kernel's flags
    if get_capabilities is not None:
        flags = {name for name, value in get_capabilities().items() if value is True}
    else:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        except OSError:
            flags = set()
    found = [name for name in BF16_CPU_FLAGS if name in flags]
    return bool(found), ", ".join(found) or "no AVX512-BF16 or AMX-BF16"


def extension():
    """The compiled extension module, or None."""
    return _extension()[0]
