"""Shared test set-up. Triton kernels run in the interpreter on machines without CUDA, so this must be set before
any Triton kernel module is imported."""
import contextlib
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lgc_fast import _backend  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ytf68" / "trainset"


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run on `device` here, reference included."""
    return [name for name in _backend.BACKENDS if _backend._usable(name, torch.device(device))[0]]


def triton_backends(device: str = "cpu") -> list[str]:
    """["triton"] where the Triton backend runs on `device` here (on the CPU: in the interpreter), else []."""
    return [name for name in available_backends(device) if name == "triton"]


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture
def trainset_dir() -> Path:
    """The real ytf68 trainset beside the checkout (../shared/data/ytf68/trainset); skips where it is absent."""
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


@pytest.fixture(scope="module")
def one_thread_per_module():
    """one_thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``)."""
    with one_intra_op_thread():
        yield
