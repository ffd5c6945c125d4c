"""Where cuDNN's headers and library are, for the two things built against them: the extension's cuDNN conv graphs
(setup.py, which loads this file by path, before lgc_fast exists) and bench/cudnn_fusion_probe.cpp. Imports nothing of
lgc_fast."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class CudnnNotFound(Exception):
    """A one-line reason no cuDNN headers were found."""


def cudnn_paths(explicit: str | None = None) -> tuple[Path, Path | None]:
    """(the folder with cudnn.h, the folder with libcudnn.so.9 or None). Headers come from `explicit`, else
    $CUDNN_ROOT, else the nvidia.cudnn package beside torch (CUDA wheels of torch ship it), else /usr; the library from
    the first of those that has it, the package always among them (its headers can be missing where its library is
    not)."""
    roots = [Path(explicit)] if explicit else [Path(os.environ["CUDNN_ROOT"])] if os.environ.get("CUDNN_ROOT") else []
    spec = importlib.util.find_spec("nvidia.cudnn") if importlib.util.find_spec("nvidia") else None
    package = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    header_roots = roots or package + [Path("/usr")]
    include = next((r / "include" for r in header_roots if (r / "include" / "cudnn.h").is_file()), None)
    if include is None:
        where = ", ".join(str(r) for r in header_roots) or "(none)"
        raise CudnnNotFound(f"no cuDNN headers (include/cudnn.h) under {where}; set CUDNN_ROOT to a folder with "
                            "include/cudnn.h")
    lib = next((d for r in roots + package + [Path("/usr")]
                for d in (r / "lib", r / "lib64", r / "lib" / "x86_64-linux-gnu") if (d / "libcudnn.so.9").exists()),
               None)
    return include, lib
