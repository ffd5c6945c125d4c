"""kernel_conv: every available backend (cpu, triton, cuda, ref) against kernel_conv_ref. Shapes from empty to
2160x3840, all dtypes, channels_last and strided inputs, gradients (gradcheck, opcheck), torch.compile, backend
selection and bad input. Triton on the CPU runs in the interpreter, so it only gets small shapes."""
import importlib
import os
import re

import numpy as np
import pytest
import torch

import lgc_fast
from lgc_fast import _backend
from conftest import available_backends, devices, skip_without_float64
from lgc_fast.ops.kernel_conv import RADIUS, WEIGHT, kernel_conv, kernel_conv_ref, kernel_taps

# The module, not the function that lgc_fast.ops re-exports under the same name.
kernel_conv_module = importlib.import_module("lgc_fast.ops.kernel_conv")

# Pointwise bound: |y - ref| <= rtol * (K * |x|) + atol. K * |x| is the scale of any rounding error of the sum, so
# this is tight where the output is small next to large inputs too. float32: a few float32 roundings of both the
# backend and the (float32) reference; half types: one rounding of the result each, which may land one ulp apart.
TOLERANCES = {
    torch.float64: (1e-12, 0.0),
    torch.float32: (1e-5, 0.0),
    torch.float16: (2e-3, 1e-7),  # 1e-7 covers float16's subnormal spacing (6e-8)
    torch.bfloat16: (1e-2, 0.0),
}
SHAPES = [(0, 3, 8, 8), (1, 1, 1, 1), (1, 1, 5, 7), (2, 3, 50, 61), (1, 2, 300, 17), (1, 1, 70, 300),
          (2, 68, 96, 96), (1, 1, 2160, 3840)]
SMALL_SHAPES = [(0, 3, 8, 8), (1, 1, 1, 1), (1, 1, 5, 7), (2, 3, 40, 40)]  # for the Triton interpreter
FULL_CHECK_NUMEL = 100_000  # above this, check sampled planes or windows against the (slow, dense) reference


@pytest.fixture(autouse=True)
def _exact_cuda_reference():
    # On CUDA the reference is cuDNN's conv2d: with TF32 it would be the least accurate result in the comparison.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _interpreted(device: str, backend: str) -> bool:
    return backend == "triton" and device == "cpu"


def _cases():
    """(device, backend) for every backend that runs here; triton on the CPU only in the interpreter."""
    cases = []
    for device in devices():
        for backend in available_backends(device):
            if _interpreted(device, backend) and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            cases.append(pytest.param(device, backend, id=f"{device}-{backend}"))
    return cases


CASES = _cases()


def _shape_cases():
    params = []
    for case in CASES:
        device, backend = case.values
        for shape in SMALL_SHAPES if _interpreted(device, backend) else SHAPES:
            # ref is the oracle itself (a dense conv2d, seconds on large maps): only the op's plumbing is tested.
            if backend == "ref" and shape not in SMALL_SHAPES:
                continue
            params.append(pytest.param(device, backend, shape, id=f"{device}-{backend}-{'x'.join(map(str, shape))}"))
    return params


def _small(device: str, backend: str, shape=(2, 3, 50, 61), interpreter_shape=(1, 2, 17, 23)):
    return interpreter_shape if _interpreted(device, backend) else shape


def _random(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A wide dynamic range: small outputs next to large ones must come out right too.
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.exp2(
        torch.randint(-6, 4, shape, generator=gen).double())
    return x.to(device=device, dtype=dtype)


def _assert_matches(y: torch.Tensor, x: torch.Tensor, out_scale: float = 1.0) -> None:
    """y == kernel_conv_ref(x, out_scale) within the dtype's pointwise tolerance; y has x's dtype, shape and empty_like
    strides."""
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    assert y.stride() == torch.empty_like(x).stride()
    if x.numel() == 0:
        return
    rtol, atol = TOLERANCES[x.dtype]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    ref = kernel_conv_ref(x, out_scale).double()
    scale = kernel_conv_ref(x.abs().to(compute), abs(out_scale)).double()
    err = (y.double() - ref).abs()
    bound = rtol * scale + atol
    assert torch.isfinite(y).all(), "non-finite output"
    worst = int((err - bound).flatten().argmax())
    assert (err <= bound).all(), (f"{int((err > bound).sum())} values off; worst at flat index {worst}: "
                                  f"got {y.flatten()[worst].item():.9g}, want {ref.flatten()[worst].item():.9g}, "
                                  f"bound {bound.flatten()[worst].item():.3g}")


def _plane_sums(x: torch.Tensor) -> torch.Tensor:
    """(N, C) sums of each output plane, from x alone: sum_p y(p) = sum_q x(q) S(q) with the separable
    S(i, j) = WEIGHT * sum_s A_s(i) B_s(j), A_s(i) = sum of g_s over the taps that land inside the map."""
    h, w = x.shape[-2:]
    g = kernel_taps(torch.float64, x.device)[:, None, :]  # (5, 1, 45)

    def coverage(n):
        ones = torch.ones(1, 1, n, dtype=torch.float64, device=x.device)
        return torch.nn.functional.conv1d(ones, g, padding=RADIUS)[0]  # (5, n)

    rows, cols = coverage(h), coverage(w)  # (5, H), (5, W)
    return WEIGHT * torch.einsum("nchw,sh,sw->nc", x.double(), rows, cols)


def _assert_plane_sums(y: torch.Tensor, x: torch.Tensor) -> None:
    err = (y.double().sum(dim=(2, 3)) - _plane_sums(x)).abs()
    assert (err <= 1e-5 * _plane_sums(x.abs())).all(), f"plane sums off by up to {err.max():.3g}"


def _check_large(y: torch.Tensor, x: torch.Tensor) -> None:
    """Checks for maps too large for the dense reference as a whole."""
    n, c, h, w = x.shape
    if h * w <= FULL_CHECK_NUMEL:
        # Many planes: eight of them (first, last and spread) pointwise, every plane's sum against _plane_sums.
        flat_x, flat_y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
        picks = torch.linspace(0, n * c - 1, 8).round().long().unique()
        _assert_matches(flat_y[picks].contiguous(), flat_x[picks].contiguous())
        _assert_plane_sums(y, x)
        return
    # One big map: its sum against _plane_sums, and windows of the output (corners, random spots, across the
    # 128-pixel work tiles of the cpu backend) against the reference on the window plus its 22-pixel halo, which
    # sees exactly what every output in the window sees.
    _assert_plane_sums(y, x)
    gen = torch.Generator().manual_seed(1)
    windows = [(0, 0), (h - 40, w - 40), (0, w - 40), (h - 40, 0), (108, 108), (236, w // 2 + 12)]
    for _ in range(4):
        windows.append((int(torch.randint(0, h - 40, (1,), generator=gen)),
                        int(torch.randint(0, w - 40, (1,), generator=gen))))
    for i, j in windows:
        i0, j0 = max(0, i - RADIUS), max(0, j - RADIUS)
        crop = x[:, :, i0:i + 40 + RADIUS, j0:j + 40 + RADIUS].contiguous()
        ref = kernel_conv_ref(crop).double()[:, :, i - i0:i - i0 + 40, j - j0:j - j0 + 40]
        scale = kernel_conv_ref(crop.abs()).double()[:, :, i - i0:i - i0 + 40, j - j0:j - j0 + 40]
        err = (y[:, :, i:i + 40, j:j + 40].double() - ref).abs()
        assert (err <= TOLERANCES[x.dtype][0] * scale).all(), f"window at {(i, j)}: max error {err.max():.3g}"


@pytest.mark.parametrize("device,backend,shape", _shape_cases())
def test_shapes_float32(device, backend, shape):
    x = _random(shape, device=device)
    y = kernel_conv(x, backend=backend)
    if x.numel() <= FULL_CHECK_NUMEL:
        _assert_matches(y, x)
    else:
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        _check_large(y, x)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_dtypes(device, backend, dtype):
    if dtype == torch.float64:
        skip_without_float64(device, backend)
    x = _random(_small(device, backend), dtype=dtype, device=device)
    _assert_matches(kernel_conv(x, backend=backend), x)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "row_slice", "column_step", "transpose", "channels_last_half"])
def test_layouts(device, backend, layout):
    n, c, h, w = _small(device, backend)
    dtype = torch.float16 if layout == "channels_last_half" else torch.float32
    base = _random((n, c, h + 6, 2 * w + 4), dtype=dtype, device=device, seed=3)
    if layout.startswith("channels_last"):
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "row_slice":  # a contiguous-looking window of a larger map: row stride != width
        x = base[:, :, 3:3 + h, 1:1 + w]
    elif layout == "column_step":  # not dense: empty_like gives a contiguous output
        x = base[:, :, :h, ::2]
    else:
        x = base[:, :, :w, :h].transpose(2, 3)
    assert not x.is_contiguous()
    _assert_matches(kernel_conv(x, backend=backend), x)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("out_scale", [0.01, -3.5, 0.0])
def test_scale(device, backend, dtype, out_scale):
    """scale * (K * x), the scale applied before the one rounding: for half types that is closer to the exact
    product than rounding K * x and then multiplying."""
    if dtype == torch.float64:
        skip_without_float64(device, backend)
    x = _random(_small(device, backend), dtype=dtype, device=device, seed=11)
    y = kernel_conv(x, backend=backend, scale=out_scale)
    _assert_matches(y, x, out_scale)
    if out_scale == 0.0:
        assert not y.abs().max()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("out_scale", [1.0, -0.01])
def test_gradcheck(device, backend, out_scale):
    skip_without_float64(device, backend)
    shape = (1, 1, 3, 4) if _interpreted(device, backend) else (1, 2, 3, 4)
    x = _random(shape, dtype=torch.float64, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kernel_conv(t, backend=backend, scale=out_scale), (x,))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("out_scale", [1.0, 0.01])
def test_backward_matches_reference(device, backend, out_scale):
    x = _random(_small(device, backend), device=device, seed=5).requires_grad_()
    grad = _random(x.shape, device=device, seed=6)
    kernel_conv(x, backend=backend, scale=out_scale).backward(grad)
    # K is symmetric, so the input gradient is the (scaled) convolution of the output gradient.
    _assert_matches(x.grad, grad, out_scale)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("out_scale", [1.0, 0.01])
def test_opcheck(device, backend, out_scale):
    x = _random((1, 2, 5, 6) if _interpreted(device, backend) else (2, 3, 9, 11), device=device)
    torch.library.opcheck(torch.ops.lgc_fast.kernel_conv.default, (x.requires_grad_(), out_scale, backend))


class _Blur(torch.nn.Module):
    def forward(self, x):
        return torch.relu(kernel_conv(x, scale=0.5)) * 4.0


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    x = _random((2, 3, 17, 19), seed=7)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(_Blur(), fullgraph=True, backend=compiler)
    y = compiled(x_compiled)
    expected = _Blur()(x_eager)
    assert torch.equal(y, expected)  # the same kernels run, in the same order
    y.sum().backward()
    expected.sum().backward()
    assert torch.equal(x_compiled.grad, x_eager.grad)
    err = (y.detach() / 2.0 - torch.relu(kernel_conv_ref(x))).abs()  # 4 * relu(0.5 K * x) = 2 relu(K * x)
    assert (err <= TOLERANCES[torch.float32][0] * kernel_conv_ref(x.abs())).all()


def _spy(monkeypatch):
    calls = []
    for name, impl in list(kernel_conv_module._IMPLS.items()):
        def record(x, scale, _name=name, _impl=impl):
            calls.append(_name)
            return _impl(x, scale)
        monkeypatch.setitem(kernel_conv_module._IMPLS, name, record)
    return calls


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("LGC_FAST_BACKEND", raising=False)
    calls = _spy(monkeypatch)
    x = _random((1, 2, 9, 8))
    kernel_conv(x)
    automatic = "cpu" if lgc_fast.backends()["cpu"][0] else "ref"
    assert calls == [automatic]
    kernel_conv(x, backend="ref")
    assert calls[-1] == "ref"
    monkeypatch.setenv("LGC_FAST_BACKEND", "ref")
    kernel_conv(x)
    assert calls[-1] == "ref"
    if lgc_fast.backends()["cpu"][0]:
        kernel_conv(x, backend="cpu")  # the argument beats the environment
        assert calls[-1] == "cpu"


def test_invalid_backend(monkeypatch):
    monkeypatch.delenv("LGC_FAST_BACKEND", raising=False)
    x = _random((1, 1, 4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel_conv(x, backend="gpu")
    with pytest.raises(ValueError, match="backend='cuda' is not usable"):
        kernel_conv(x, backend="cuda")
    monkeypatch.setenv("LGC_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="LGC_FAST_BACKEND must be one of"):
        kernel_conv(x)


@pytest.mark.parametrize("triton_version, numpy_version, refuses, why, fixes", [
    # Triton 3.0's interpreter under NumPy 2 returns unwritten outputs without an error
    ("3.0.0", "2.2.6", False, "triton 3.0.0's interpreter drops", [("numpy", "1.26.4")]),
    # Triton 3.4-3.6's takes int() of one-element arrays, which NumPy 2.4 refuses: every kernel with a loop over a
    # runtime bound fails (3.7 on take the element)
    ("3.6.0", "2.4.6", True, "triton 3.6.0's interpreter converts loop bounds with int(), which NumPy 2.4.6 refuses",
     [("triton", "3.7.0"), ("refuses", False)]),
], ids=["stores-dropped", "loop-bounds"])
def test_triton_interpreter_refused_where_it_fails(monkeypatch, triton_version, numpy_version, refuses, why, fixes):
    """The backend is refused, with the reason, where this Triton's interpreter fails with this NumPy; each fix alone
    (another Triton or NumPy) makes it usable."""
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the Triton backend compiles its kernels; the interpreter is not used")
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def setup(triton_v, numpy_v, refuses_v):
        monkeypatch.setattr(triton, "__version__", triton_v)
        monkeypatch.setattr(np, "__version__", numpy_v)
        monkeypatch.setattr(_backend, "_numpy_refuses_sized_scalars", lambda: refuses_v)

    setup(triton_version, numpy_version, refuses)
    ok, reason = lgc_fast.backends()["triton"]
    assert not ok and why in reason
    with pytest.raises(ValueError, match=re.escape(f"backend='triton' is not usable here: {why}")):
        kernel_conv(_random((1, 1, 4, 4)), backend="triton")
    for name, value in fixes:
        versions = {"triton": triton_version, "numpy": numpy_version, "refuses": refuses, name: value}
        setup(versions["triton"], versions["numpy"], versions["refuses"])
        assert lgc_fast.backends()["triton"][0], name


def test_numpy_probe_matches_this_numpy():
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        assert _backend._numpy_refuses_sized_scalars()
    elif major < 2:
        assert not _backend._numpy_refuses_sized_scalars()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "0.01", None])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number, got"):
        kernel_conv(_random((1, 1, 4, 4)), scale=scale)


@pytest.mark.parametrize("bad,error,message", [
    (torch.zeros(3, 8, 8), ValueError, "x must have 4 dimensions"),
    (torch.zeros(1, 1, 1, 8, 8), ValueError, "x must have 4 dimensions"),
    (torch.zeros(1, 2, 8, 8, dtype=torch.int32), TypeError, "x must be float32, float16, bfloat16 or float64"),
    (torch.zeros(1, 0, 8, 8), ValueError, r"x must have at least one channel \(C >= 1\)"),
    ([[[[1.0]]]], TypeError, "x must be a torch.Tensor"),
], ids=["rank3", "rank5", "int32", "no-channels", "list"])
def test_bad_input(bad, error, message):
    with pytest.raises(error, match=message):
        kernel_conv(bad)


@pytest.mark.skipif(not lgc_fast.backends()["cpu"][0], reason="compiled extension not available")
@pytest.mark.parametrize("bad,message", [
    (torch.zeros(3, 8, 8), "kernel_conv: x must have 4 dimensions"),
    (torch.zeros(1, 2, 8, 8, dtype=torch.int64), "kernel_conv: x must be float32, float16, bfloat16 or float64"),
    (torch.zeros(1, 0, 8, 8), "kernel_conv: x must have at least one channel"),
], ids=["rank3", "int64", "no-channels"])
def test_native_op_bad_input(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lgc_fast_C.kernel_conv(bad)


@pytest.mark.skipif(not lgc_fast.backends()["cpu"][0], reason="compiled extension not available")
def test_native_op_bad_scale():
    with pytest.raises(RuntimeError, match="kernel_conv: scale must be a finite number"):
        torch.ops.lgc_fast_C.kernel_conv(torch.zeros(1, 1, 8, 8), float("nan"))
