"""The CUDA half of every op's torch glue (the LGC_WITH_CUDA parts of csrc/<op>.cpp) compiles and links, checked without
a GPU or a CUDA build of torch: the host compiler builds each glue file with LGC_WITH_CUDA defined, against torch's
headers and the CUDA toolkit's (warnings as errors for our code), and every lgc:: function the glue calls must be
defined by the kernels' objects (csrc/cuda/*.cu by nvcc, csrc/cpu/*.cpp) or another glue file. A launcher whose
definition drifted from its declaration compiles on both sides and only fails when a CUDA build of the extension is
imported ("undefined symbol"), on a GPU machine. A CPU build of torch ships c10/cuda without its generated
c10/cuda/impl/cuda_cmake_macros.h; the tests supply an empty one after torch's own include directories, so a CUDA
build's real header still wins. Skip where the compilers or the CUDA headers are missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
GLUE = sorted(p for p in (ROOT / "csrc").glob("*.cpp") if "LGC_WITH_CUDA" in p.read_text())


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory: $CUDA_HOME's, nvcc's, or /usr/local/cuda's."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parents[1]))
        # a wrapper script (exec /path/to/nvcc "$@") resolves to itself: read the path it runs
        if real.stat().st_size < 4096 and real.read_bytes().startswith(b"#!"):
            words = real.read_text().split()
            candidates += [str(Path(w).parents[1]) for w in words if w.endswith("/nvcc")]
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


def test_every_op_with_cuda_glue_is_checked():
    assert {p.name for p in GLUE} >= {"bn_relu_dropout.cpp", "bn_relu_dropout_train.cpp", "fit_shape.cpp",
                                      "kernel_conv.cpp", "layout.cpp", "lgc_loss.cpp"}


def _compile_all(commands: dict[str, list[str]]) -> dict[str, str]:
    """Run the compile commands in parallel: {name: output} of those that failed."""
    runs = {name: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, command in commands.items()}
    failed = {}
    for name, run in runs.items():
        output, _ = run.communicate(timeout=900)
        if run.returncode != 0:
            failed[name] = output[-3000:]
    return failed


def _report(failed: dict[str, str]) -> str:
    return "\n".join(f"--- {name}\n{output}" for name, output in failed.items())


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    """(objects of the glue files compiled with LGC_WITH_CUDA, {file: compiler output} of those that failed)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ / c++) on PATH")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("CUDA headers not found (set CUDA_HOME)")
    out = tmp_path_factory.mktemp("glue")
    stub = out / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    system = [*include_paths(), str(cuda_include), sysconfig.get_paths()["include"], str(out)]
    command = [compiler, "-std=c++17", "-c", "-O0", "-Wall", "-Wextra", "-Werror", "-DLGC_WITH_CUDA",
               f"-I{ROOT / 'csrc'}", *[arg for path in system for arg in ("-isystem", path)]]
    objects = [out / f"{p.stem}.o" for p in GLUE]
    failed = _compile_all({p.name: [*command, str(p), "-o", str(o)] for p, o in zip(GLUE, objects)})
    return objects, failed


def test_cuda_glue_compiles(glue):
    _, failed = glue
    assert not failed, _report(failed)


def _symbols(objects, *flags) -> set[str]:
    """The demangled names in namespace lgc that `nm` lists for the objects with `flags`."""
    listing = subprocess.run(["nm", "-C", *flags, *map(str, objects)], capture_output=True, text=True, check=True)
    names = set()
    for line in listing.stdout.splitlines():
        parts = line.split(maxsplit=2) if not line.startswith(" ") else line.split(maxsplit=1)
        if len(parts) >= 2 and parts[-1].startswith("lgc::") and parts[-2] in ("U", "T", "W"):
            names.add(parts[-1])
    return names


def test_cuda_glue_links(glue, tmp_path):
    objects, failed = glue
    if failed:
        pytest.skip("the glue does not compile (test_cuda_glue_compiles says why)")
    nvcc = shutil.which("nvcc")
    if nvcc is None or shutil.which("nm") is None:
        pytest.skip("nvcc or nm not on PATH")
    # PTX for one architecture: the host side of every launcher, without ptxas's work for each real architecture.
    commands = {p.name: [nvcc, "-std=c++17", "-O0", f"-I{ROOT / 'csrc'}", "-gencode=arch=compute_90,code=compute_90",
                         "-c", str(p), "-o", str(tmp_path / f"{p.name}.o")]
                for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))}
    commands.update({p.name: ["g++", "-std=c++17", "-O0", "-fopenmp", f"-I{ROOT / 'csrc'}", "-c", str(p), "-o",
                              str(tmp_path / f"{p.name}.o")] for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))})
    failed = _compile_all(commands)
    assert not failed, _report(failed)
    needed = _symbols(objects, "--undefined-only")
    # an op's glue may be split over files that share functions (csrc/bn_relu_dropout_glue.h)
    defined = _symbols([*sorted(tmp_path.glob("*.o")), *objects], "--defined-only")
    assert needed, "nm found no lgc:: function that the glue calls"
    missing = sorted(needed - defined)
    assert not missing, "the glue calls lgc:: functions that no kernel or glue object defines:\n" + "\n".join(missing)


def test_cudnn_graph_glue_compiles_and_links(tmp_path):
    """The cuDNN conv graphs (LGC_WITH_CUDNN_GRAPHS: csrc/cudnn_conv_graphs.cpp, module.cpp's registration, the
    executor csrc/cuda/cudnn_conv_graphs.cpp) compile with cuDNN's headers, and the executor defines every lgc::
    function the glue calls. cuDNN's headers as setup.py finds them ($CUDNN_ROOT in CI)."""
    from lgc_fast.cudnn_location import CudnnNotFound, cudnn_paths

    compiler = shutil.which("g++")
    cuda_include = _cuda_include()
    if compiler is None or cuda_include is None or shutil.which("nm") is None:
        pytest.skip("needs g++, nm and the CUDA headers")
    try:
        cudnn_include, _ = cudnn_paths()
    except CudnnNotFound as exc:
        pytest.skip(str(exc))
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    system = [*include_paths(), str(cuda_include), str(cudnn_include), sysconfig.get_paths()["include"], str(tmp_path)]
    command = [compiler, "-std=c++17", "-c", "-O0", "-Wall", "-Wextra", "-Werror", "-DLGC_WITH_CUDA",
               "-DLGC_WITH_CUDNN_GRAPHS", f"-I{ROOT / 'csrc'}", *[arg for path in system for arg in ("-isystem", path)]]
    sources = {"glue": ROOT / "csrc" / "cudnn_conv_graphs.cpp", "module": ROOT / "csrc" / "module.cpp",
               "executor": ROOT / "csrc" / "cuda" / "cudnn_conv_graphs.cpp"}
    failed = _compile_all({name: [*command, str(src), "-o", str(tmp_path / f"{name}.o")]
                           for name, src in sources.items()})
    assert not failed, _report(failed)
    needed = _symbols([tmp_path / "glue.o", tmp_path / "module.o"], "--undefined-only")
    defined = _symbols([tmp_path / f"{name}.o" for name in sources], "--defined-only")
    assert {"lgc::register_cudnn_conv_graphs(pybind11::module_&)"} <= needed and needed
    missing = sorted(needed - defined)
    assert not missing, "the cuDNN graph glue calls undefined lgc:: functions:\n" + "\n".join(missing)
