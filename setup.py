"""Build lgc_fast: the Python package, the Triton kernels (as ``lgc_fast.kernels``) and the native extension.

Environment switches:
  LGC_FAST_CUDA=auto|1|0   build the CUDA kernels when torch has CUDA and nvcc is found (auto), always (1), never (0)
  LGC_FAST_CUDNN_GRAPHS=0|auto|1  in a CUDA build, the cuDNN conv graphs of conv_stack
                           (csrc/cuda/cudnn_conv_graphs.cpp): never (0, the default: on an H100 with cuDNN 9.19 no
                           graph built), when cuDNN's headers and libcudnn.so.9 are found (auto: $CUDNN_ROOT, else
                           torch's nvidia.cudnn package, else /usr), always (1)
  LGC_FAST_NO_EXT=1        skip the native extension entirely (pure Python install; the ops fall back)
  LGC_FAST_NVCC_FLAGS="..." extra nvcc flags of a CUDA build, e.g. the epilogue's tuning macros
                           (-DLGC_EPILOGUE_MIN_BLOCKS=3: csrc/cuda/bn_relu_dropout.cu, bench/gpu_session.sh epilogue)
"""
import glob
import importlib.util
import os
import shlex
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("LGC_FAST_CUDA", "auto").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"LGC_FAST_CUDA must be auto, 1 or 0, not {mode!r}")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not possible:
        raise SystemExit("LGC_FAST_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    return mode == "1" or (mode == "auto" and possible)


def _cudnn_graphs():
    """(include dir, lib dir) of cuDNN for the conv graphs, or None where they are not built."""
    mode = os.environ.get("LGC_FAST_CUDNN_GRAPHS", "0").lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"LGC_FAST_CUDNN_GRAPHS must be auto, 1 or 0, not {mode!r}")
    if mode == "0":
        return None
    # lgc_fast/cudnn_location.py by path: importing the package here would import what is being built
    spec = importlib.util.spec_from_file_location("cudnn_location", os.path.join(ROOT, "lgc_fast", "cudnn_location.py"))
    location = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(location)
    try:
        include, lib = location.cudnn_paths()
    except location.CudnnNotFound as exc:
        if mode == "1":
            raise SystemExit(f"LGC_FAST_CUDNN_GRAPHS=1 but {exc}")
        return None
    if lib is None:
        if mode == "1":
            raise SystemExit(f"LGC_FAST_CUDNN_GRAPHS=1 but no libcudnn.so.9 beside {include.parent} or torch's package")
        return None
    return str(include), str(lib)


def _shared_libstdcxx() -> list:
    """The link argument that binds the extension to the shared libstdc++.so.6, the one torch and Python load.

    The GPU machine's CXX (/opt/gcc/bin/g++, session 29) linked libstdc++ into the extension statically: the extension
    then carried its own copy of the iostream and locale code, which formats c10's error messages against locale
    facets it never initialised, and every TORCH_CHECK that prints a number crashed the process. The library's path, as
    the compiler names it, makes the link take the shared one; nothing is added where the compiler names none.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        compiler = shlex.split(os.environ.get("CXX", "c++"))  # CXX may carry a launcher: "ccache g++"
        found = subprocess.run(compiler + ["-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    return [os.path.realpath(found)] if os.path.isabs(found) and os.path.exists(found) else []


def ext_modules():
    if os.environ.get("LGC_FAST_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC may not turn
    # `cond ? x * y : 0` into a vector select (it will not speculate a multiply that could raise a flag).
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"] + _shared_libstdcxx())
    if _cuda_wanted():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17", "-lineinfo"] + shlex.split(os.environ.get("LGC_FAST_NVCC_FLAGS", ""))
        if arch is None:
            nvcc += ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
        macros = [("LGC_WITH_CUDA", "1")]
        cudnn = _cudnn_graphs()
        if cudnn is not None:
            include, lib = cudnn
            sources.append("csrc/cuda/cudnn_conv_graphs.cpp")
            macros.append(("LGC_WITH_CUDNN_GRAPHS", "1"))
            kwargs["include_dirs"].append(include)
            # torch has loaded this libcudnn.so.9 already when lgc_fast._C is imported: the soname resolves to it
            kwargs["extra_link_args"] += [f"-L{lib}", "-l:libcudnn.so.9", f"-Wl,-rpath,{lib}"]
        ext = CUDAExtension(
            "lgc_fast._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
    else:
        ext = CppExtension("lgc_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext, cmdclass = ext_modules()

setup(
    name="lgc_fast",
    version="0.1.0",
    description="Fast Local-Global Context Network for facial landmarks (CUDA, Triton and C++ kernels)",
    python_requires=">=3.9",
    packages=find_packages(include=["lgc_fast", "lgc_fast.*"]) + ["lgc_fast.kernels"],
    package_dir={"lgc_fast.kernels": "kernels"},
    package_data={"lgc_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "scipy",
        "opencv-python-headless",
        "pybind11",
    ],
    extras_require={"test": ["pytest"], "plot": ["matplotlib"], "onnx": ["onnx", "onnxruntime"]},
    entry_points={"console_scripts": ["lgc-fast=lgc_fast.cli:main"]},
    ext_modules=ext,
    cmdclass=cmdclass,
)
