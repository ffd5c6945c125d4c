"""Shared test set-up. Triton kernels run in the interpreter on machines without CUDA, so this must be set before
any Triton kernel module is imported."""
import contextlib
import functools
import os
from pathlib import Path
from typing import Optional

import cv2
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # one config per new shape for the fused_conv kernels; tests/test_fused_conv_configs.py runs every config
    os.environ.setdefault("LGC_FAST_TRITON_AUTOTUNE", "0")

from lgc_fast import _backend  # noqa: E402

# How far cv2.warpAffine's bilinear sampling position can be from the exact one, in pixels: OpenCV 4 rounds it to
# 1/32 px; OpenCV 5 does not round it.
CV2_WARP_ROUNDING_PX = 1 / 64 if int(cv2.__version__.split(".")[0]) < 5 else 0.0

# The ytf68 trainset beside the checkout, or where $LGC_FAST_TEST_DATA says (for a test run from a second checkout).
DATA_DIR = Path(os.environ.get("LGC_FAST_TEST_DATA")
                or Path(__file__).resolve().parents[2] / "shared" / "data" / "ytf68" / "trainset")


def available_backends(device: str = "cpu", dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that can run on `device` here, reference included; for a float64 `dtype`, without a Triton
    interpreter that cannot compute in float64 (``interpreter_float64_gap``)."""
    names = [name for name in _backend.BACKENDS if _backend._usable(name, torch.device(device))[0]]
    if dtype == torch.float64 and "triton" in names and interpreter_float64_gap(device, "triton"):
        names = [name for name in names if name != "triton"]
    return names


@functools.cache
def _interpreter_float64_gap() -> Optional[str]:
    """Why this Triton's interpreter cannot run the kernels in float64, or None where it can: Triton 3.0's (torch
    2.4's) has no float64 tl.dot and passes a float argument annotated tl.float64 as float32."""
    import triton

    from float64_probe import dot_and_gain

    a = torch.rand(16, 16, dtype=torch.float64)
    dot, scaled = torch.zeros_like(a), torch.zeros_like(a)
    try:
        dot_and_gain[(1,)](a, dot, scaled, 0.1, BLOCK=16)
    except Exception as error:  # the interpreter's own error, whatever its type
        return f"triton {triton.__version__}'s interpreter fails on float64 ({error})"
    if not (torch.allclose(dot, a @ a, rtol=1e-13, atol=0) and torch.equal(scaled, a * 0.1)):
        return f"triton {triton.__version__}'s interpreter does not compute in float64"
    return None


def interpreter_float64_gap(device: str, backend: str) -> Optional[str]:
    """The reason a float64 case of `backend` on `device` cannot run here, or None: only Triton in the
    interpreter (on the CPU) can lack float64."""
    if backend != "triton" or device != "cpu" or not _backend.triton_interpret():
        return None
    return _interpreter_float64_gap()


def skip_without_float64(device: str, backend: str) -> None:
    """Skip a float64 case that this Triton interpreter cannot run."""
    reason = interpreter_float64_gap(device, backend)
    if reason:
        pytest.skip(reason)


def triton_backends(device: str = "cpu", dtype: Optional[torch.dtype] = None) -> list[str]:
    """["triton"] where the Triton backend runs on `device` (in `dtype`) here (on the CPU: in the interpreter),
    else []."""
    return [name for name in available_backends(device, dtype) if name == "triton"]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture
def trainset_dir() -> Path:
    """The real ytf68 trainset (../shared/data/ytf68/trainset or $LGC_FAST_TEST_DATA); skips where it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (the ytf68 trainset is not redistributed with lgc_fast)")
    return DATA_DIR


@contextlib.contextmanager
def one_intra_op_thread():
    """One intra-op thread: on a small shared CPU, OpenMP threads that wait for each other on tiny shapes cost more
    than they gain (tens of ms per barrier on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with one_intra_op_thread():
        yield


@pytest.fixture
def full_float32():
    """Full-precision float32 products on a GPU: TF32 would round a Triton kernel's operands and cuDNN's (a
    reference's) differently (lgc_fast's kernels take cuDNN's allow_tf32 setting)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def one_thread_per_module():
    """one_thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``)."""
    with one_intra_op_thread():
        yield
