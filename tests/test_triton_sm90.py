"""Every Triton kernel compiles for sm_90 (H100/H200) as its launcher specialises it: Triton's own front end, its
NVIDIA backend and the ptxas it ships, no GPU needed. The interpreter that runs the kernels elsewhere in the tests
never invokes that compiler, so this is the check that a kernel still builds for the GPUs it is written for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("sm90_compile.py")
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90


def _pythons() -> list:
    """This interpreter, and those $LGC_FAST_SM90_PYTHONS names (os.pathsep-separated): environments with another
    Triton, such as the GPU machines' (CI makes one with their version), whose compiler can differ."""
    extra = os.environ.get("LGC_FAST_SM90_PYTHONS", "")
    return [sys.executable, *(p for p in extra.split(os.pathsep) if p)]


@pytest.mark.parametrize("python", _pythons(), ids=lambda p: "this-python" if p == sys.executable else p)
def test_every_kernel_compiles_for_sm90(python):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([python, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    header, *compiled = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    if header["skip"]:
        pytest.skip(f"{python}: {header['skip']}")
    kernels = {"_kernel_conv_tile", "_lgc_loss_fwd_kernel", "_lgc_loss_bwd_kernel", "_fit_shape_stats_kernel",
               "dilated_conv_kernel", "_moments_kernel", "_apply_kernel", "_grad_sums_kernel", "_grad_apply_kernel",
               "_keep_mask_kernel"}
    count = 8 + 8 + 9 + 8 + 25  # kernel_conv, lgc_loss, fit_shape, dilated_conv, bn_relu_dropout
    if header["tensor_descriptors"]:
        kernels |= {"fused_conv_kernel", "fused_conv_wgrad_kernel"}
        # four dtypes, two configs: the forward plain, with the prologue and with it stored, the input gradient with
        # and without storing dz, the filter gradient plain, with one and with both prologues (float64's with both
        # keeps one config within the shared memory); in bfloat16 the two stored modes again with partial chunks
        count += 67
    assert {c["kernel"] for c in compiled} == kernels
    assert len(compiled) == count
    for c in compiled:
        assert c["cubin_bytes"] > 0
        assert c["shared_bytes"] <= SHARED_LIMIT, f"{c['kernel']} ({c['case']}) needs {c['shared_bytes']} B of shared"
        assert c["shared_bytes"] <= c.get("shared_bound_bytes", SHARED_LIMIT), f"{c['case']}: above the pruning bound"
        if c["kernel"].startswith("fused_conv") and "float64" not in c["case"]:
            # the point of the kernel: Hopper's asynchronous matrix products on tensor-memory loads
            assert c["wgmma"] > 0 and c["tma_loads"] > 0, c
            # ... issued back to back: ptxas serialises them where Triton keeps a prologue's operand in registers as
            # the A operand, stores a descriptor after a loop whose wgmmas stay in flight, or cannot tell that the
            # loop runs at least once (kernels/fused_conv.py, kernels/fused_conv_wgrad.py)
            assert not c["wgmma_serialized"], f"{c['case']}: ptxas serialises its wgmmas (C7515)"
