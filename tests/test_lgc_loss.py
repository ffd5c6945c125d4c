"""The fused training-loss backends (cpu, cuda, triton) against lgc_loss_ref: forward, backward, gradcheck, opcheck,
edge cases (border points, NaN coordinates of unlabelled points, empty shapes, mixed dtypes, layouts) and bad input."""
import os

import pytest
import torch

from conftest import available_backends, devices, skip_without_float64
from lgc_fast.ops import lgc_loss, lgc_loss_ref, target_maps_ref
from lgc_fast.ops.lgc_loss import _lgc_loss_backward_op, _lgc_loss_op


def _fast_cases():
    """(device, backend) for every fused backend that runs here; Triton on the CPU only in the interpreter."""
    cases = []
    for device in devices():
        for backend in available_backends(device):
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
            if backend == "ref" or (backend == "triton" and device == "cpu" and not interpreted):
                continue
            cases.append(pytest.param(device, backend, id=f"{device}-{backend}"))
    return cases


FAST = _fast_cases()


def _shape(backend, big=(3, 8, 36, 40), small=(3, 6, 17, 19)):
    """The interpreter runs one Triton program at a time (tens of ms each): keep Triton's planes few and small."""
    return small if backend == "triton" else big


def make_case(n, c, h, w, dtype=torch.float32, device="cpu", seed=0):
    """Random maps and points, then as many of these special points as the faces before the last have slots: within
    1 px outside the grid (partial targets), between the last two pixels, on the border, exact integer positions,
    far outside (no target but a weight), and off the grid by 1e6 px. Landmark c-1 of face 0 is unlabelled with NaN
    coordinates (as are random others), and for n >= 2 the last face has no labelled point at all."""
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 0.3
    omega = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 0.3
    points = torch.rand(n, c, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1.0, h - 1.0])
    labelled = torch.rand(n, c, generator=g) > 0.2
    special = [(-0.5, h / 2), (w - 1.5, h - 1.25), (w - 0.25, 3.75), (-1.0, -1.0), (w / 2, -0.999), (3.0, 4.0),
               (w - 1.0, h - 1.0), (0.0, 0.0), (-10.0, h / 2), (w + 15.5, -3.0), (2.5, h - 0.5), (1e6, -1e6)]
    slots = [(i, k) for i in range(max(1, n - 1)) for k in range(c - 1)]
    for (i, k), xy in zip(slots, special):
        points[i, k] = torch.tensor(xy, dtype=torch.float64)
        labelled[i, k] = True
    labelled[0, c - 1] = False
    if n >= 2:
        labelled[n - 1] = False
    points[~labelled] = float("nan")
    return (local.to(device=device, dtype=dtype), omega.to(device=device, dtype=dtype), points.to(device),
            labelled.to(device))


def _ref_grads(local, omega, points, labelled, grad_out):
    l_ref = local.detach().clone().requires_grad_()
    o_ref = omega.detach().clone().requires_grad_()
    loss = lgc_loss_ref(l_ref, o_ref, points, labelled)
    loss.backward(grad_out)
    return loss.detach(), l_ref.grad, o_ref.grad


def _run(local, omega, points, labelled, backend, grad_out):
    l_fast = local.detach().clone().requires_grad_()
    o_fast = omega.detach().clone().requires_grad_()
    loss = lgc_loss(l_fast, o_fast, points, labelled, backend=backend)
    loss.backward(grad_out)
    return loss.detach(), l_fast.grad, o_fast.grad


# (loss rtol, loss atol, grad rtol, grad atol relative to the largest gradient). Half-precision gradients are rounded
# from float32 values that may differ in the last float32 bit, so they can differ by one half-precision ulp.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12, 1e-12, 1e-14),
    torch.float32: (1e-5, 1e-5, 1e-5, 1e-6),
    torch.float16: (1e-5, 1e-5, 1e-3, 1e-3),
    torch.bfloat16: (1e-5, 1e-5, 8e-3, 8e-3),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("device,backend", FAST)
def test_matches_reference_forward_and_backward(device, backend, dtype):
    if dtype == torch.float64:
        skip_without_float64(device, backend)
    local, omega, points, labelled = make_case(*_shape(backend), dtype=dtype, device=device)
    n = local.shape[0]
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_out = torch.linspace(0.5, 2.0, n, dtype=loss_dtype, device=device)
    ref, gl_ref, go_ref = _ref_grads(local, omega, points, labelled, grad_out)
    out, gl, go = _run(local, omega, points, labelled, backend, grad_out)
    rtol, atol, grtol, gatol = TOLERANCES[dtype]
    assert out.dtype == loss_dtype and out.shape == (n,)
    assert ref[-1] == 0 and out[-1] == 0  # the face without labelled points
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for got, want in ((gl, gl_ref), (go, go_ref)):
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().float().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=grtol, atol=gatol * scale)
    assert torch.count_nonzero(gl[-1]) == 0 and torch.count_nonzero(go[-1]) == 0


@pytest.mark.parametrize("device,backend", FAST)
def test_targets_are_rendered_exactly(device, backend):
    """Maps equal to the reference targets give a loss of ~0 and zero gradients: T itself is right, not only the
    loss's large terms far from the points."""
    skip_without_float64(device, backend)
    local, _, points, labelled = make_case(*_shape(backend), dtype=torch.float64, device=device, seed=3)
    n, c, h, w = local.shape
    target = target_maps_ref(points, labelled, h, w)
    assert target.abs().sum() > 10
    out, gl, go = _run(target, target, points, labelled, backend, torch.ones(n, dtype=torch.float64, device=device))
    assert out.abs().max() < 1e-20
    assert gl.abs().max() < 1e-14 and go.abs().max() < 1e-14


@pytest.mark.parametrize("device,backend", FAST)
def test_long_sums_are_accurate(device, backend):
    """A float32 sum over a large plane stays within a few float32 ulps of the exact one. The point lies far outside
    the grid (T = 0, w = 1/10), so the float64 oracle needs no convolution; the offset makes naive sums drift."""
    h, w = (192, 256) if backend == "triton" else (768, 1024)
    g = torch.Generator().manual_seed(5)
    local = (torch.randn(1, 1, h, w, generator=g) + 3.0).to(device)
    omega = (torch.randn(1, 1, h, w, generator=g) - 2.0).to(device)
    points = torch.tensor([[[-30.0, h / 2]]], device=device)
    labelled = torch.ones(1, 1, dtype=torch.bool, device=device)
    exact = 0.1 * (local.double() ** 2 + omega.double() ** 2).sum().reshape(1)
    out = lgc_loss(local, omega, points, labelled, backend=backend)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_channel_slice_of_channels_last(dtype):
    """The training step's maps: local a channel slice of a channels_last map (the kernel convolution's output),
    omega channels_last. The CUDA glue changes their layout with its batched transpose, in and out."""
    if "cuda" not in available_backends("cuda"):
        pytest.skip("needs the compiled CUDA kernels")
    local, omega, points, labelled = make_case(2, 6, 29, 31, device="cuda", seed=11)
    wide = torch.cat((local, torch.randn_like(local)), 1).to(dtype).contiguous(memory_format=torch.channels_last)
    wide.requires_grad_()
    omega = omega.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.tensor([1.0, -0.5], device="cuda")
    out = lgc_loss(wide[:, :6], omega, points, labelled, backend="cuda")
    out.backward(grad_out)
    ref, gl_ref, go_ref = _ref_grads(wide[:, :6], omega, points, labelled, grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(wide.grad[:, :6].double(), gl_ref.double(), **tol)
    torch.testing.assert_close(omega.grad.double(), go_ref.double(), **tol)
    assert not wide.grad[:, 6:].any()
    assert omega.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", FAST)
def test_mixed_map_dtypes_and_channels_last(device, backend):
    local, omega, points, labelled = make_case(*_shape(backend, big=(2, 6, 29, 31), small=(2, 4, 21, 19)),
                                               device=device, seed=7)
    local = local.to(memory_format=torch.channels_last)
    for l_dtype, o_dtype in ((torch.float32, torch.float64), (torch.float64, torch.float32),
                             (torch.bfloat16, torch.float32)):
        l_in, o_in = local.to(l_dtype), omega.to(o_dtype)
        loss_dtype = torch.float64 if l_dtype == torch.float64 else torch.float32
        grad_out = torch.tensor([1.0, -0.5], dtype=loss_dtype, device=device)
        ref, gl_ref, go_ref = _ref_grads(l_in, o_in, points, labelled, grad_out)
        out, gl, go = _run(l_in, o_in, points, labelled, backend, grad_out)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert gl.dtype == l_dtype and go.dtype == o_dtype
        assert gl.stride() == torch.empty_like(l_in).stride()
        torch.testing.assert_close(gl.double(), gl_ref.double(), rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(go.double(), go_ref.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", FAST)
def test_results_are_deterministic(device, backend):
    """Bitwise equal across runs and (on the CPU) thread counts: fixed-order reductions, no atomics."""
    local, omega, points, labelled = make_case(*_shape(backend), device=device, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lgc_loss(local, omega, points, labelled, backend=backend)
        torch.set_num_threads(max(2, threads))
        many = lgc_loss(local, omega, points, labelled, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device,backend", FAST)
@pytest.mark.parametrize("shape", [(0, 68, 12, 12), (2, 0, 12, 12), (2, 3, 0, 5), (2, 3, 4, 0)], ids=str)
def test_empty_shapes(device, backend, shape):
    n, c, h, w = shape
    local = torch.randn(shape, device=device, requires_grad=True)
    omega = torch.randn(shape, device=device, requires_grad=True)
    points = torch.full((n, c, 2), 1.0, device=device)
    labelled = torch.ones(n, c, dtype=torch.bool, device=device)
    out = lgc_loss(local, omega, points, labelled, backend=backend)
    assert out.shape == (n,) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert local.grad.shape == shape and omega.grad.shape == shape


@pytest.mark.parametrize("device,backend", FAST)
def test_gradcheck_float64(device, backend):
    shape = _shape(backend, big=(2, 4, 9, 11), small=(2, 3, 7, 8))
    local, omega, points, labelled = make_case(*shape, dtype=torch.float64, device=device, seed=13)
    local.requires_grad_()
    omega.requires_grad_()
    assert torch.autograd.gradcheck(lambda l, o: lgc_loss(l, o, points, labelled, backend=backend), (local, omega),
                                    fast_mode=True)


@pytest.mark.parametrize("device,backend", FAST + [pytest.param("cpu", "ref", id="cpu-ref")])
def test_opcheck(device, backend):
    shape = _shape(backend, big=(2, 4, 10, 12), small=(2, 2, 6, 7))
    local, omega, points, labelled = make_case(*shape, device=device, seed=17)
    local.requires_grad_()
    omega.requires_grad_()
    torch.library.opcheck(_lgc_loss_op, (local, omega, points, labelled, backend))
    grad = torch.tensor([1.0, 0.25], device=device)
    torch.library.opcheck(_lgc_loss_backward_op, (grad, local.detach(), omega.detach(), points, labelled, backend))
    channels_last = local.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(_lgc_loss_backward_op, (grad, channels_last, omega.detach(), points, labelled, backend),
                          test_utils=("test_schema", "test_faketensor"))


def _good_inputs():
    return make_case(2, 3, 8, 9)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(omega=a["omega"][:, :2]), ValueError, "omega must have the shape of local"),
    (lambda a: a.update(local=a["local"][0]), ValueError, r"local must have shape \(N, C, H, W\)"),
    (lambda a: a.update(points=a["points"][..., :1]), ValueError, r"points must have shape \(N, C, 2\)"),
    (lambda a: a.update(labelled=a["labelled"][:, :2]), ValueError, r"labelled must have shape \(N, C\)"),
    (lambda a: a.update(labelled=a["labelled"].to(torch.uint8)), TypeError, "labelled must be a bool tensor"),
    (lambda a: a.update(local=a["local"].to(torch.int32)), TypeError, "local must be a floating-point tensor"),
    (lambda a: a.update(points=a["points"].to(torch.int64)), TypeError, "points must be a floating-point tensor"),
    (lambda a: a.update(points=a["points"].to("meta")), ValueError, "must be on one device"),
    (lambda a: a.update(omega=a["omega"].numpy()), TypeError, "omega must be a torch.Tensor"),
], ids=["omega-shape", "local-dims", "points-shape", "labelled-shape", "labelled-dtype", "local-dtype",
        "points-dtype", "devices", "omega-type"])
def test_bad_input_is_rejected_with_the_argument_named(mutate, error, match):
    local, omega, points, labelled = _good_inputs()
    args = dict(local=local, omega=omega, points=points, labelled=labelled)
    mutate(args)
    with pytest.raises(error, match=match):
        lgc_loss(**args)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        lgc_loss(*_good_inputs(), backend="tpu")


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="compiled extension not built")
def test_native_op_checks_its_arguments():
    local, omega, points, labelled = _good_inputs()
    ops = torch.ops.lgc_fast_C
    with pytest.raises(RuntimeError, match="omega must have the shape of local"):
        ops.lgc_loss(local, omega[:, :1], points, labelled)
    with pytest.raises(RuntimeError, match="points must have shape"):
        ops.lgc_loss(local, omega, points[:, :, :1], labelled)
    with pytest.raises(RuntimeError, match="labelled must be bool"):
        ops.lgc_loss(local, omega, points, labelled.float())
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.lgc_loss_backward(torch.ones(3), local, omega, points, labelled)
