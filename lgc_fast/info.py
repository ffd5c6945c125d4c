"""``lgc-fast info``: versions and backends, so a bug report says what ran."""
from __future__ import annotations

import platform

import torch

import lgc_fast
from lgc_fast._backend import native_bf16_cpu


def add_arguments(parser) -> None:
    del parser  # no options


def run(args) -> int:
    del args
    print(f"lgc_fast {lgc_fast.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        print(f"device {torch.cuda.get_device_name()}")
    print("backends:")
    for name, (ok, why) in lgc_fast.backends().items():
        print(f"  {name:7s} {'yes' if ok else 'no ':3s}  {why}")
    from lgc_fast.detect import resolve_precision  # the model and OpenCV: only when asked
    from lgc_fast.train import default_amp

    native, found = native_bf16_cpu()
    training = "bfloat16 autocast" if default_amp(torch.device("cpu")) else "float32"
    print(f"CPU bfloat16 in hardware: {'yes' if native else 'no'} ({found}); the networks' precision \"auto\" runs "
          f"{resolve_precision('auto', 'cpu')} on the CPU, lgc-fast train {training}")
    return 0
