"""Shared test set-up. Triton kernels run in the interpreter on machines without CUDA, so this must be set before
any Triton kernel module is imported."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lgc_fast  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ytf68" / "trainset"


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run on `device` here, reference included."""
    report = lgc_fast.backends()
    names = []
    for name in ("cuda", "triton", "cpu", "ref"):
        ok, _ = report[name]
        if not ok:
            continue
        if name == "cuda" and device != "cuda":
            continue
        if name == "cpu" and device != "cpu":
            continue
        names.append(name)
    return names


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture
def trainset_dir() -> Path:
    """The real ytf68 trainset beside the checkout (../shared/data/ytf68/trainset); skips where it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR} (the ytf68 trainset is not redistributed with lgc_fast)")
    return DATA_DIR
