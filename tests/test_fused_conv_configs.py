"""Every tile configuration the fused_conv kernels' autotuners keep for the release's 3x3 dilation-4 128 -> 128 layer,
run as given (``config=``) in each of the kernels' modes and checked against float64 torch: the forward with and
without the BatchNorm / ReLU / dropout prologue (and its statistics, the activation stored as conv_stack's training
step has it), the input gradient with BatchNorm backward's apply and the gate epilogue (dz stored), and the filter
gradient with both prologues and on plain operands.

The other tests run one configuration per shape on a GPU (conftest sets $LGC_FAST_TRITON_AUTOTUNE=0, or each of their
shapes would compile and time every configuration) and the interpreter's own tile on the CPU; this file runs each
kept configuration's tile on the CPU too (in the interpreter, where warps and stages mean nothing) and its whole
launch on a GPU. The image, 20 x 24 pixels, ends inside the 16-pixel tiles.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import devices, triton_backends
from lgc_fast.kernels import fused_conv as kernels
from lgc_fast.kernels import fused_conv_wgrad
from lgc_fast.ops.bn_relu_dropout import pack_keep_mask

pytestmark = [pytest.mark.usefixtures("one_thread_per_module", "full_float32"),
              pytest.mark.skipif(kernels.TensorDescriptor is None,
                                 reason="this Triton has no host tensor descriptors (Triton 3.4 or later)")]

CL = torch.channels_last
R, DILATION, C_IN, C_OUT = 3, 4, 128, 128
N, H, W = 1, 20, 24
PAD = DILATION * (R // 2)
MODES = ["forward", "forward+prologue+stats", "input gradient+gate", "filter gradient", "filter gradient plain"]


def _dtypes(device):
    # the interpreter: float32 and the training's bfloat16; a GPU: its three types of wgmma
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float32, torch.bfloat16, torch.float16]


def _cases():
    for device in devices():
        if device == "cpu" and not triton_backends("cpu"):
            continue
        for dtype in _dtypes(device):
            for mode in MODES:
                yield pytest.param(device, dtype, mode, id=f"{device}-{str(dtype)[6:]}-{mode.replace(' ', '_')}")


def _rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _layer(dtype, device):
    """x, weight, the BatchNorm terms (s, b, mean, invstd) over x's channels, x's keep mask and bits, and the next
    block's (g, z, eq_dy, eq_x, eq_b)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    x = _rand((N, C_IN, H, W), 1).to(dtype).to(device).contiguous(memory_format=CL)
    weight = (_rand((C_OUT, C_IN, R, R), 2) / (R * C_IN**0.5)).to(dtype).to(device)
    s, b = (_rand((C_IN,), 3).abs() + 0.5).to(device, ct), (_rand((C_IN,), 4) * 0.3).to(device, ct)
    mean, invstd = (_rand((C_IN,), 5) * 0.2).to(device, ct), (_rand((C_IN,), 6).abs() + 0.5).to(device, ct)
    keep = (torch.rand(N, C_IN, H, W, generator=torch.Generator().manual_seed(7)) >= 0.3).to(device)
    bits = pack_keep_mask(keep, memory_format=CL)
    g = _rand((N, C_OUT, H, W), 8).to(dtype).to(device).contiguous(memory_format=CL)
    z = _rand((N, C_OUT, H, W), 9).to(dtype).to(device).contiguous(memory_format=CL)
    eq = [(_rand((C_OUT,), 10 + i) * 0.5).to(device, ct) for i in range(3)]
    return x, weight, (s, b, mean, invstd), keep, bits, (g, z, *eq)


def _as_operand(values, dtype):
    """What the kernels multiply: a prologue computed in float32 (float64), rounded to the maps' dtype (toward zero in
    the interpreter's bfloat16, which drops the low bits: over the filter gradient's long sums the bias shows)."""
    if dtype == torch.bfloat16 and values.device.type == "cpu":
        bits = values.float().contiguous().view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).double()
    return values.to(dtype).double()


def _close(got, want, dtype, sums=False):
    """16-bit results: rounded once to the dtype (z, the gradient) or summed from such values in float32."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-4 if sums else 2e-5, atol=1e-4 if sums else 2e-5)
        return
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    scale = want.abs().max().item()
    tol = dict(rtol=1e-4, atol=1e-4 * scale) if sums else dict(rtol=2 * ulp, atol=2 * ulp * scale)
    torch.testing.assert_close(got.double(), want, **tol)


def _configs(dtype, mode):
    size = torch.tensor([], dtype=dtype).element_size()
    if mode.startswith("filter gradient"):
        prologues = mode == "filter gradient"
        return fused_conv_wgrad.kept_configs(fused_conv_wgrad.gpu_configs(), C_IN, C_OUT, size, prologues, prologues)
    prologue, epilogue, n_out = {
        "forward": (kernels.PROLOGUE_NONE, kernels.EPILOGUE_STORE, C_OUT),
        "forward+prologue+stats": (kernels.PROLOGUE_BN, kernels.EPILOGUE_STATS, C_OUT),
        "input gradient+gate": (kernels.PROLOGUE_DBN, kernels.EPILOGUE_GATE, C_IN)}[mode]
    return kernels.kept_configs(kernels.gpu_configs(), n_out, size, prologue, epilogue, prologue != 0)


@pytest.mark.parametrize("device, dtype, mode", list(_cases()))
def test_every_kept_config_matches_float64(device, dtype, mode):
    x, weight, (s, b, mean, invstd), keep, bits, (g, z, eq_dy, eq_x, eq_b) = _layer(dtype, device)
    a = _as_operand(torch.relu(x * s[:, None, None] + b[:, None, None]) * keep, dtype)
    dz = _as_operand(g * eq_dy[:, None, None] + z * eq_x[:, None, None] + eq_b[:, None, None], dtype)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    configs = _configs(dtype, mode)
    assert configs
    for config in configs:
        if mode == "filter gradient":
            got = fused_conv_wgrad.fused_conv_wgrad_triton(
                x, g, R, DILATION, prologue=kernels.BnPrologue(s, b, bits),
                dbn=kernels.DbnPrologue(z, eq_dy, eq_x, eq_b), config=config)
            _close(got, torch.nn.grad.conv2d_weight(a, weight.shape, dz, padding=PAD, dilation=DILATION), dtype,
                   sums=True)
            continue
        if mode == "filter gradient plain":
            got = fused_conv_wgrad.fused_conv_wgrad_triton(x, g, R, DILATION, config=config)
            _close(got, torch.nn.grad.conv2d_weight(x.double(), weight.shape, g.double(), padding=PAD,
                                                    dilation=DILATION), dtype, sums=True)
            continue
        if mode == "input gradient+gate":
            out = torch.empty(N, C_IN, H, W, dtype=dtype, device=device).contiguous(memory_format=CL)
            sums = kernels.new_partial_sums(N, H, W, C_IN, ct, device)
            dz_stored = torch.empty_like(g)
            kernels.fused_conv_triton(g, kernels.pack_filter(weight, transposed=True), R, DILATION, out,
                                      prologue=kernels.DbnPrologue(z, eq_dy, eq_x, eq_b),
                                      gate=kernels.Gate(x, s, b, mean, invstd, bits), sums=sums,
                                      prologue_out=dz_stored, config=config)
            assert torch.equal(dz_stored.double(), dz)  # the operand as the product used it
            da = torch.nn.grad.conv2d_input(x.shape, weight.double(), dz, padding=PAD, dilation=DILATION)
            gates = keep * (x.double() * s[:, None, None] + b[:, None, None] > 0)
            _close(out, da * gates, dtype)
            stored = out.double()
            xhat = (x.double() - mean[:, None, None]) * invstd[:, None, None]
            _close(kernels.add_partials(sums[0], ct), (stored * xhat).sum((0, 2, 3)), dtype, sums=True)
            _close(kernels.add_partials(sums[1], ct), stored.sum((0, 2, 3)), dtype, sums=True)
            continue
        prologue = kernels.BnPrologue(s, b, bits) if mode == "forward+prologue+stats" else None
        out = torch.empty(N, C_OUT, H, W, dtype=dtype, device=device).contiguous(memory_format=CL)
        sums = kernels.new_partial_sums(N, H, W, C_OUT, ct, device) if prologue is not None else None
        a_stored = torch.empty_like(x) if prologue is not None else None
        kernels.fused_conv_triton(x, kernels.pack_filter(weight), R, DILATION, out, prologue=prologue, sums=sums,
                                  prologue_out=a_stored, config=config)
        if a_stored is not None:
            assert torch.equal(a_stored.double(), a)
        operand = a if prologue is not None else x.double()
        _close(out, F.conv2d(operand, weight.double(), padding=PAD, dilation=DILATION), dtype)
        if sums is not None:
            stored = out.double()
            _close(kernels.add_partials(sums[0], ct), stored.sum((0, 2, 3)), dtype, sums=True)
            _close(kernels.add_partials(sums[1], ct), (stored * stored).sum((0, 2, 3)), dtype, sums=True)


def test_autotune_switch_keeps_the_first_config(monkeypatch):
    kept = kernels.kept_configs(kernels.gpu_configs(), C_OUT, 2, kernels.PROLOGUE_BN, kernels.EPILOGUE_STATS)
    assert len(kept) > 1
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    assert kernels.tuned(kept) == kept[:1]
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1")
    assert kernels.tuned(kept) == kept
    monkeypatch.delenv(kernels.AUTOTUNE_ENV)
    assert kernels.tuned(kept) == kept
