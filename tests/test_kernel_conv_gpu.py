"""GPU-only checks of the cuda and triton backends of kernel_conv: the target shapes, half types, layouts, shapes that
exercise the CUDA kernel's strips / row chunks / plane packing, and gradients. Skipped without CUDA; each backend
test also skips when that backend is not available (extension built without CUDA, triton missing)."""
import pytest
import torch

import lgc_fast
from lgc_fast.ops.kernel_conv import kernel_conv, kernel_conv_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ("cuda", "triton")
REL_TOL = 1e-5  # max |y - ref| <= 1e-5 * max |ref| (float32)


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    ok, why = lgc_fast.backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param} not available: {why}")
    return request.param


@pytest.fixture(autouse=True)
def _exact_reference():
    # The reference is cuDNN conv2d: TF32 there would make it the least accurate of the three.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        yield


def _reference(x: torch.Tensor) -> torch.Tensor:
    """kernel_conv_ref in chunks of planes, so the oracle's workspace stays small at 256x68x96^2."""
    n = x.shape[0]
    step = max(1, n // 8)
    return torch.cat([kernel_conv_ref(x[i:i + step]) for i in range(0, n, step)])


def _assert_close_to_max(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y).all(), "non-finite output"
    err = (y.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * max |ref| = {rel * scale:.3g}"


@pytest.mark.parametrize("shape", [(256, 68, 96, 96), (1, 68, 1024, 1024), (1, 1, 2160, 3840)],
                         ids=["256x68x96^2", "1x68x1024^2", "1x1x2160x3840"])
def test_target_shapes_float32(backend, shape):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=gen)
    y = kernel_conv(x, backend=backend)
    _assert_close_to_max(y, _reference(x), REL_TOL)
    # Heat-map-like input: non-negative, so the output maximum is large and errors cannot hide behind cancellation.
    x = torch.rand(shape, device="cuda", generator=gen)
    _assert_close_to_max(kernel_conv(x, backend=backend), _reference(x), REL_TOL)
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.parametrize("shape", [
    (3, 5, 1, 1), (2, 3, 5, 7), (1, 2, 45, 47), (2, 3, 40, 40), (4, 7, 17, 3),
    (2, 2, 130, 257), (1, 1, 300, 23), (1, 1, 2000, 50), (1, 2, 64, 700), (2, 1, 1, 5000), (1, 1, 23, 129),
])
def test_odd_and_small_shapes(backend, shape):
    x = torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    _assert_close_to_max(kernel_conv(x, backend=backend), kernel_conv_ref(x), REL_TOL)


def test_repeatable(backend):
    x = torch.randn(8, 68, 96, 96, device="cuda")
    assert torch.equal(kernel_conv(x, backend=backend), kernel_conv(x, backend=backend))


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)])
@pytest.mark.parametrize("shape", [(4, 68, 96, 96), (1, 3, 300, 517)])
def test_half_types(backend, dtype, rel, shape):
    # The oracle accumulates in float32 and rounds once; so do the backends: one rounding step of the output type.
    x = torch.randn(shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(dtype)
    _assert_close_to_max(kernel_conv(x, backend=backend), kernel_conv_ref(x), rel)


def test_float64(backend):
    x = torch.randn(2, 3, 70, 150, device="cuda", dtype=torch.float64)
    _assert_close_to_max(kernel_conv(x, backend=backend), kernel_conv_ref(x), 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_and_strided(backend, dtype):
    base = torch.randn(4, 6, 96, 96, device="cuda").to(dtype)
    x = base.to(memory_format=torch.channels_last)
    y = kernel_conv(x, backend=backend)
    assert y.stride() == torch.empty_like(x).stride()
    rel = REL_TOL if dtype == torch.float32 else 2.0**-10
    _assert_close_to_max(y, kernel_conv_ref(x), rel)
    sliced = base[:, 1:5, 3:90, ::2]
    _assert_close_to_max(kernel_conv(sliced, backend=backend), kernel_conv_ref(sliced), rel)
    channel_slice = x[:, 1:5]  # NHWC-ordered but not dense, as the training step's local maps
    y = kernel_conv(channel_slice, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_close_to_max(y, kernel_conv_ref(channel_slice), rel)


def test_gradient_is_the_same_convolution(backend):
    x = torch.randn(2, 68, 96, 96, device="cuda", requires_grad=True)
    grad_out = torch.randn(2, 68, 96, 96, device="cuda")
    kernel_conv(x, backend=backend).backward(grad_out)
    _assert_close_to_max(x.grad, kernel_conv_ref(grad_out), REL_TOL)


def test_gradcheck_float64(backend):
    x = torch.randn(1, 2, 9, 11, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernel_conv(t, backend=backend), (x,))
