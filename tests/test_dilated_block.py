"""dilated_block / dilated_conv: every backend against the plain-torch reference, gradients, op registration, errors.

Triton runs in the interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1), so shapes stay small.
The interpreter rounds float32 -> bfloat16 stores toward zero (CUDA rounds to nearest), hence the bfloat16 tolerance
of about two units in the last place.
"""
import pytest
import torch
import torch.nn as nn

from conftest import available_backends, devices, triton_backends
from lgc_fast import _backend
from lgc_fast.ops.dilated_block import (
    dilated_block, dilated_block_ref, dilated_block_train, dilated_conv, dilated_conv_ref, draw_dropout_mask,
    fold_batchnorm,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
P = 0.3  # larger than the release's 0.1 so that small tests drop plenty of values


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny shapes: threads only add barrier waits


def _tol(dtype, device):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    if dtype == torch.float32:
        # CUDA float32 uses TF32 like cuDNN's default; the interpreter multiplies in full float32.
        return dict(rtol=3e-3, atol=3e-4) if device == "cuda" else dict(rtol=1e-5, atol=1e-6)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-4)
    return dict(rtol=1.6e-2, atol=1e-3)


def _inputs(n, c_in, c_out, h, w, dtype, device, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) / (3.0 * c_in**0.5)
    scale = torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c_out, generator=g, dtype=torch.float64) * 0.2
    x, weight = x.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mask = draw_dropout_mask((n, c_out, h, w), P, generator=g).to(device)
    return x, weight, scale.to(device=device, dtype=torch.float32), shift.to(device=device, dtype=torch.float32), mask


def test_reference_equals_conv_batchnorm_relu_dropout_modules():
    x, weight, _, _, mask = _inputs(2, 6, 5, 10, 9, torch.float64, "cpu", 1)
    conv = nn.Conv2d(6, 5, 3, padding=4, dilation=4, bias=False).double()
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    expected = 0.1 * torch.relu(bn(conv(x))) * mask / (1 - P)
    scale, shift = fold_batchnorm(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    got = dilated_block_ref(x, weight, scale, shift, mask, dropout_p=P)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dilated_conv_ref(x, weight), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_matches_reference(device, dtype, channels_last, with_mask):
    for backend in triton_backends(device, dtype):
        x, weight, scale, shift, mask = _inputs(1, 16, 16, 12, 12, dtype, device, 2, channels_last)
        mask = mask if with_mask else None
        got = dilated_block(x, weight, scale, shift, mask, dropout_p=P, backend=backend)
        ref = dilated_block_ref(x, weight, scale, shift, mask, dropout_p=P)
        assert got.dtype == dtype and got.shape == ref.shape
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, ref, **_tol(dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(2, 20, 24, 11, 13, 4), (1, 3, 5, 9, 7, 3), (1, 16, 16, 12, 12, 1)])
def test_odd_shapes_and_dilations(device, shape):
    n, c_in, c_out, h, w, dilation = shape
    for backend in triton_backends(device):
        x, weight, scale, shift, mask = _inputs(n, c_in, c_out, h, w, torch.float32, device, 3)
        # A positive shift keeps almost every output nonzero, so an unwritten element cannot pass as a ReLU zero.
        shift = shift.abs() + 2.0
        got = dilated_block(x, weight, scale, shift, dilation=dilation, backend=backend)
        ref = dilated_block_ref(x, weight, scale, shift, dilation=dilation)
        torch.testing.assert_close(got, ref, **_tol(torch.float32, device))
        got = dilated_block(x, weight, scale, shift, mask, dropout_p=P, dilation=dilation, backend=backend)
        ref = dilated_block_ref(x, weight, scale, shift, mask, dropout_p=P, dilation=dilation)
        torch.testing.assert_close(got, ref, **_tol(torch.float32, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_conv_matches_reference(device, dtype):
    for backend in triton_backends(device, dtype):
        x, weight, *_ = _inputs(2, 16, 24, 9, 10, dtype, device, 4, channels_last=True)
        got = dilated_conv(x, weight, backend=backend)
        assert got.is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32 and device == "cuda":
            # TF32 products (the kernel's and cuDNN's) each round differently; near-zero outputs of a 144-term sum
            # differ by more than an elementwise tolerance allows. Measure the error against float64 instead.
            ref = dilated_conv_ref(x.double(), weight.double())
            assert (got.double() - ref).norm() / ref.norm() < 1e-3
            assert (got.double() - ref).abs().max() < 1e-2 * ref.abs().max()
        else:
            torch.testing.assert_close(got, dilated_conv_ref(x, weight), **_tol(dtype, device))


@pytest.mark.parametrize("device", devices())
def test_uint8_mask_nonzero_keeps_and_nan_propagates(device):
    for backend in triton_backends(device):
        x, weight, scale, shift, mask = _inputs(1, 16, 16, 12, 12, torch.float32, device, 5)
        as_uint8 = mask.to(torch.uint8) * 7
        torch.testing.assert_close(dilated_block(x, weight, scale, shift, as_uint8, dropout_p=P, backend=backend),
                                   dilated_block(x, weight, scale, shift, mask, dropout_p=P, backend=backend))
        x[0, 3, 5, 6] = float("nan")
        got = dilated_block(x, weight, scale, shift, backend=backend)
        ref = dilated_block_ref(x, weight, scale, shift)
        assert got.isnan().any()
        assert torch.equal(got.isnan(), ref.isnan())


@pytest.mark.parametrize("device", devices())
def test_negative_and_zero_activation_scale(device):
    for backend in triton_backends(device):
        x, weight, scale, shift, mask = _inputs(1, 16, 16, 12, 12, torch.float32, device, 17)
        for act in (-0.25, 0.0):
            got = dilated_block(x, weight, scale, shift, mask, dropout_p=P, activation_scale=act, backend=backend)
            ref = dilated_block_ref(x, weight, scale, shift, mask, dropout_p=P, activation_scale=act)
            torch.testing.assert_close(got, ref, **_tol(torch.float32, device))


def _grads(fn, x, weight, scale, shift, mask, backend, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, scale, shift)]
    y = fn(*leaves, mask, dropout_p=P, backend=backend)
    y.backward(grad_out)
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(device, dtype):
    for backend in triton_backends(device):
        x, weight, scale, shift, mask = _inputs(2, 16, 16, 12, 12, dtype, device, 6, channels_last=True)
        grad_out = torch.randn(2, 16, 12, 12, device=device).to(dtype)
        y, got = _grads(dilated_block, x, weight, scale, shift, mask, backend, grad_out)
        y_ref, want = _grads(dilated_block, x, weight, scale, shift, mask, "ref", grad_out)
        torch.testing.assert_close(y, y_ref, **_tol(dtype, device))
        for name, g, r in zip(("x", "weight", "scale", "shift"), got, want):
            assert g is not None and g.dtype == r.dtype, name
            rel = (g.double() - r.double()).norm() / r.double().norm()
            if dtype == torch.float32 and device == "cpu":
                bound = 3e-5
            elif dtype == torch.float32:
                # TF32 moves a few pre-activations across the ReLU's kink; each such value adds or drops a whole
                # term of a sum whose terms mostly cancel (measured on an H100: 0.029 for scale and shift's
                # per-channel sums, 0.027 for x's).
                bound = 5e-2
            else:
                bound = 2e-2
            assert rel < bound, (name, rel.item())


def test_reference_backward_gradcheck():
    x, weight, scale, shift, mask = _inputs(1, 2, 2, 6, 5, torch.float64, "cpu", 7)
    scale, shift = scale.double(), shift.double()
    args = tuple(t.requires_grad_() for t in (x, weight, scale, shift))
    assert torch.autograd.gradcheck(lambda *a: dilated_block(*a, mask, dropout_p=P, dilation=2, backend="ref"), args)
    assert torch.autograd.gradcheck(lambda *a: dilated_conv(*a, dilation=3, backend="ref"), args[:2])


@pytest.mark.parametrize("device", devices())
def test_triton_gradcheck_float64(device):
    # fast_mode checks a random projection of the Jacobian: a handful of interpreter launches instead of hundreds.
    for backend in triton_backends(device, torch.float64):
        x, weight, scale, shift, mask = _inputs(1, 3, 2, 7, 6, torch.float64, device, 8)
        scale, shift = scale.double(), shift.double()
        args = tuple(t.requires_grad_() for t in (x, weight, scale, shift))
        assert torch.autograd.gradcheck(
            lambda *a: dilated_block(*a, mask, dropout_p=P, dilation=2, backend=backend), args, fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda *a: dilated_conv(*a, dilation=2, backend=backend), args[:2], fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for backend in available_backends(device):
        if backend not in ("triton", "ref"):
            continue
        x, weight, scale, shift, mask = _inputs(1, 4, 5, 6, 7, torch.float32, device, 9)
        x.requires_grad_()
        weight.requires_grad_()
        scale.requires_grad_()
        torch.library.opcheck(torch.ops.lgc_fast.dilated_conv_bn_act.default,
                              (x, weight, scale, shift, mask, 0.1 / (1 - P), 4, backend))
        torch.library.opcheck(torch.ops.lgc_fast.dilated_conv.default, (x, weight, 4, None, backend))


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_train_mode_matches_batchnorm_module(backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} not available on the CPU here")
    x, weight, _, _, mask = _inputs(2, 16, 8, 10, 10, torch.float32, "cpu", 10)
    conv = nn.Conv2d(16, 8, 3, padding=4, dilation=4, bias=False)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        conv.weight.copy_(weight)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.train()
    x_mod = x.clone().requires_grad_()
    expected = 0.1 * torch.relu(bn(conv(x_mod))) * mask / (1 - P)
    expected.square().sum().backward()

    bn_weight = bn.weight.detach().clone().requires_grad_()
    w = weight.clone().requires_grad_()
    x_op = x.clone().requires_grad_()
    mean, var = torch.zeros(8), torch.ones(8)
    got = dilated_block_train(x_op, w, bn_weight, bn.bias.detach(), mean, var, mask, dropout_p=P, backend=backend)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, bn.running_mean)
    torch.testing.assert_close(var, bn.running_var)
    torch.testing.assert_close(x_op.grad, x_mod.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, conv.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bn_weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-6)


def test_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.choose("dilated_block", torch.device("cpu"), None, ("triton", "ref")) == "ref"
    x, weight, scale, shift, mask = _inputs(1, 4, 4, 6, 6, torch.float32, "cpu", 11)
    torch.testing.assert_close(dilated_block(x, weight, scale, shift, mask, dropout_p=P),
                               dilated_block_ref(x, weight, scale, shift, mask, dropout_p=P), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", devices())
def test_empty_batch(device):
    for backend in available_backends(device):
        if backend not in ("triton", "ref"):
            continue
        x, weight, scale, shift, _ = _inputs(0, 4, 6, 5, 5, torch.float32, device, 12)
        assert dilated_block(x, weight, scale, shift, backend=backend).shape == (0, 6, 5, 5)


def test_draw_dropout_mask():
    g = torch.Generator().manual_seed(13)
    mask = draw_dropout_mask((4, 8, 32, 32), 0.1, generator=g, memory_format=torch.channels_last)
    assert mask.dtype == torch.bool and mask.shape == (4, 8, 32, 32)
    assert mask.is_contiguous(memory_format=torch.channels_last)
    assert abs(mask.float().mean().item() - 0.9) < 0.01  # 32768 draws: standard error 0.0017
    again = draw_dropout_mask((4, 8, 32, 32), 0.1, generator=torch.Generator().manual_seed(13),
                              memory_format=torch.channels_last)
    assert torch.equal(mask, again)


def _bad(**overrides):
    x, weight, scale, shift, mask = _inputs(1, 4, 6, 5, 5, torch.float32, "cpu", 14)
    args = dict(x=x, weight=weight, scale=scale, shift=shift, dropout_mask=mask)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, exc, match", [
    (dict(x=torch.zeros(4, 5, 5)), ValueError, "x must have 4 dimensions"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(1, 4, 5, 5, dtype=torch.int32)), TypeError, "x must be float32"),
    (dict(weight=torch.zeros(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight must have x's dtype"),
    (dict(weight=torch.zeros(6, 3, 3, 3)), ValueError, "weight must have shape"),
    (dict(weight=torch.zeros(6, 4, 5, 5)), ValueError, "weight must have shape"),
    (dict(scale=torch.ones(5)), ValueError, "scale must have shape"),
    (dict(shift=torch.ones(6, 1)), ValueError, "shift must have 1 dimensions"),
    (dict(shift=torch.ones(6, dtype=torch.int64)), TypeError, "shift must be a floating-point"),
    (dict(dropout_mask=torch.ones(1, 6, 5, 5)), TypeError, "dropout_mask must be bool or uint8"),
    (dict(dropout_mask=torch.ones(1, 6, 5, 4, dtype=torch.bool)), ValueError, "dropout_mask must have shape"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be"),
    (dict(activation_scale=float("inf")), ValueError, "activation_scale must be"),
    (dict(dilation=0), ValueError, "dilation must be"),
    (dict(dilation=2.0), ValueError, "dilation must be"),
    (dict(backend="cpu"), ValueError, "not implemented for this op"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        dilated_block(**_bad(**overrides))


def test_bad_conv_inputs():
    x, weight, *_ = _inputs(1, 4, 6, 5, 5, torch.float32, "cpu", 15)
    with pytest.raises(ValueError, match="weight must have shape"):
        dilated_conv(x, weight[:, :2])
    with pytest.raises(ValueError, match="dilation must be"):
        dilated_conv(x, weight, dilation=-1)
    with pytest.raises(ValueError, match="dropout_mask must be"):
        dilated_block_train(x, weight, torch.ones(6), torch.zeros(6), None, None, torch.ones(1, 6, 5, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_release_shape(dtype):
    x, weight, scale, shift, mask = _inputs(2, 136, 136, 96, 96, dtype, "cuda", 16, channels_last=True)
    got = dilated_block(x, weight, scale, shift, mask, dropout_p=0.1, backend="triton")
    ref = dilated_block_ref(x, weight, scale, shift, mask, dropout_p=0.1)
    rel = (got.double() - ref.double()).norm() / ref.double().norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), rel.item()
