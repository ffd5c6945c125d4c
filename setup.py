"""Build lgc_fast: the Python package, the Triton kernels (as ``lgc_fast.kernels``) and the native extension.

Environment switches:
  LGC_FAST_CUDA=auto|1|0   build the CUDA kernels when torch has CUDA and nvcc is found (auto), always (1), never (0)
  LGC_FAST_NO_EXT=1        skip the native extension entirely (pure Python install; the ops fall back)
"""
import glob
import os

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


def ext_modules():
    if os.environ.get("LGC_FAST_NO_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC may not turn
    # `cond ? x * y : 0` into a vector select (it will not speculate a multiply that could raise a flag).
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if _cuda_wanted():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        if arch is None:
            nvcc += ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
        ext = CUDAExtension(
            "lgc_fast._C",
            sources,
            define_macros=[("LGC_WITH_CUDA", "1")],
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
