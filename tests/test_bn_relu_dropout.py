"""bn_relu_dropout: the reference against torch's modules, every backend against the reference (forward, gradients,
running statistics), op registration, odd layouts and errors.

Triton runs in the interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1), so shapes stay small. The
interpreter rounds float32 -> bfloat16 stores toward zero (CUDA rounds to nearest): bfloat16 tolerances allow two
units in the last place.
"""
import pytest
import torch
import torch.nn as nn

from conftest import available_backends, devices
from lgc_fast import _backend
from lgc_fast.ops.bn_relu_dropout import (
    SEEDED_LIMIT, bn_relu_dropout, bn_relu_dropout_drawn, bn_relu_dropout_ref, dropout_keep_mask, fused_backend,
    pack_keep_mask, random_keep_bits, random_keep_mask, unpack_keep_bits,
)
from lgc_fast.ops.dilated_block import draw_dropout_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
P = 0.3  # larger than the release's 0.1 so that small tests drop plenty of values


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny shapes: threads only add barrier waits


def kernel_backends(device, dtype=None):
    """The op's kernel backends that run on `device` (in `dtype`) here: the compiled C++ ("cpu") or CUDA ("cuda")
    kernels and Triton (on the CPU in the interpreter)."""
    return [name for name in available_backends(device, dtype) if name in ("cuda", "cpu", "triton")]


def _tol(dtype):
    return {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
            torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}[dtype]


def _inputs(shape, dtype, device, seed, channels_last=False):
    """z (scaled and shifted per channel, so the statistics matter), weight, bias, running stats and a keep mask."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    z = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(c, 1, 1, generator=g, dtype=torch.float64)
                                                                 + 0.5) + torch.randn(c, 1, 1, generator=g,
                                                                                      dtype=torch.float64)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=stat_dtype)
    bias = (torch.randn(c, generator=g, dtype=torch.float64) * 0.3).to(device=device, dtype=stat_dtype)
    running_mean = (torch.randn(c, generator=g, dtype=torch.float64) * 0.2).to(device=device, dtype=stat_dtype)
    running_var = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=stat_dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    z = z.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    mask = draw_dropout_mask(shape, P, generator=g, memory_format=memory_format).to(device)
    return z, weight, bias, running_mean, running_var, mask


def _run_both(backend, z, weight, bias, running_mean, running_var, mask, training, **kwargs):
    """(y, grads, running stats) of the backend and of the reference, with the same output gradient."""
    results = []
    for fn in (lambda *a, **k: bn_relu_dropout(*a, **k, backend=backend), bn_relu_dropout_ref):
        leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
        stats = [t.clone() for t in (running_mean, running_var)]
        y = fn(leaves[0], *stats, leaves[1], leaves[2], mask, training=training, dropout_p=P, **kwargs)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (y.double() * grad_out.to(y.device)).sum().backward()
        results.append((y, [t.grad for t in leaves], stats))
    return results


def test_reference_equals_batchnorm_relu_dropout_modules():
    z, weight, bias, running_mean, running_var, mask = _inputs((3, 5, 6, 7), torch.float64, "cpu", 1)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.copy_(running_mean)
        bn.running_var.copy_(running_var)
    for training in (True, False):
        bn.train(training)
        rm, rv = running_mean.clone(), running_var.clone()
        got = bn_relu_dropout_ref(z, rm, rv, weight, bias, mask, training=training, dropout_p=P)
        expected = 0.1 * torch.relu(bn(z)) * mask / (1 - P)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-12, atol=1e-14)
        running_mean, running_var = rm, rv


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(device, dtype, channels_last, training):
    for backend in kernel_backends(device, dtype):
        z, weight, bias, rm, rv, mask = _inputs((2, 6, 5, 7), dtype, device, 2, channels_last)
        (y, grads, stats), (y_ref, grads_ref, stats_ref) = _run_both(backend, z, weight, bias, rm, rv,
                                                                     mask if training else None, training)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(y, y_ref, **_tol(dtype))
        for got, want in zip(grads, grads_ref):
            scale = want.abs().max().item() + 1.0
            torch.testing.assert_close(got.double() / scale, want.double() / scale, **_tol(dtype))
        for got, want in zip(stats, stats_ref):
            torch.testing.assert_close(got, want, **_tol(torch.float32 if dtype != torch.float64 else dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,channels_last", [
    ((1, 130, 3, 3), True),   # two channel blocks of a channels_last tile
    ((2, 3, 40, 30), False),  # two pixel blocks per image, the second partial: counts of the moments' combination
    ((1, 1, 1, 5), False),
    ((4, 2, 1, 1), True),
])
def test_tile_edges(device, shape, channels_last):
    for backend in kernel_backends(device, torch.float64):
        z, weight, bias, rm, rv, mask = _inputs(shape, torch.float64, device, 4, channels_last)
        (y, grads, stats), (y_ref, grads_ref, stats_ref) = _run_both(backend, z, weight, bias, rm, rv, mask, True)
        torch.testing.assert_close(y, y_ref, **_tol(torch.float64))
        for got, want in zip(grads + stats, grads_ref + stats_ref):
            torch.testing.assert_close(got, want, **_tol(torch.float64))


@pytest.mark.parametrize("device", devices())
def test_strided_inputs_and_expanded_gradient(device):
    for backend in kernel_backends(device, torch.float64):
        z, weight, bias, rm, rv, mask = _inputs((2, 4, 6, 10), torch.float64, device, 5)
        z_view, mask_view = z[:, :, :, ::2], mask[:, :, :, 1::2]  # H and W strides that do not merge
        results = []
        for fn in (lambda *a, **k: bn_relu_dropout(*a, **k, backend=backend), bn_relu_dropout_ref):
            leaf = z_view.detach().requires_grad_()
            y = fn(leaf, None, None, weight, bias, mask_view, training=True, dropout_p=P)
            y.sum().backward()  # the output gradient is one value expanded: all strides 0
            results.append((y, leaf.grad))
        (y, grad), (y_ref, grad_ref) = results
        torch.testing.assert_close(y, y_ref, **_tol(torch.float64))
        torch.testing.assert_close(grad, grad_ref, **_tol(torch.float64))


@pytest.mark.parametrize("device", devices())
def test_mask_forms_nan_and_scales(device):
    for backend in kernel_backends(device):
        z, weight, bias, rm, rv, mask = _inputs((2, 4, 5, 5), torch.float32, device, 6)
        run = lambda *a, **k: bn_relu_dropout(*a, **k, backend=backend)  # noqa: E731
        torch.testing.assert_close(run(z, rm, rv, weight, bias, mask.to(torch.uint8) * 7, training=False, dropout_p=P),
                                   run(z, rm, rv, weight, bias, mask, training=False, dropout_p=P))
        for scale in (-0.5, 0.0, 2.0):
            torch.testing.assert_close(
                run(z, rm, rv, None, None, mask, training=True, dropout_p=P, activation_scale=scale),
                bn_relu_dropout_ref(z, rm.clone(), rv.clone(), None, None, mask, training=True, dropout_p=P,
                                    activation_scale=scale), rtol=1e-5, atol=1e-6)
        z[0, 1, 2, 3] = z[1, 2, 0, 0] = float("nan")
        mask[0, 1, 2, 3], mask[1, 2, 0, 0] = True, False  # a kept and a dropped NaN: both stay NaN
        got = run(z, rm, rv, weight, bias, mask, training=False, dropout_p=P)
        want = bn_relu_dropout_ref(z, rm, rv, weight, bias, mask, training=False, dropout_p=P)
        assert got.isnan().sum() == 2 and torch.equal(got.isnan(), want.isnan())


def _bits(mask, z):
    """mask's keep bits for z (in z's memory format, as the op numbers them)."""
    fmt = torch.channels_last if z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous() \
        else torch.contiguous_format
    return pack_keep_mask(mask, memory_format=fmt)


def test_keep_bits_format():
    """Bit e % 8 (least significant first) of byte e // 8 is the flag of the value at offset e of z's memory format,
    the last byte's spare bits 0; unpacking gives the mask back in that format."""
    mask = torch.zeros(1, 2, 1, 5, dtype=torch.bool)
    mask[0, 0, 0, 1] = mask[0, 1, 0, 0] = mask[0, 1, 0, 4] = True
    # contiguous offsets: (c, w) -> 5 c + w: 1, 5, 9; channels_last: 2 w + c: 2, 1, 9
    assert pack_keep_mask(mask, memory_format=torch.contiguous_format).tolist() == [0b00100010, 0b00000010]
    assert pack_keep_mask(mask, memory_format=torch.channels_last).tolist() == [0b00000110, 0b00000010]
    for fmt in (torch.contiguous_format, torch.channels_last):
        g = torch.Generator().manual_seed(1)
        big = torch.rand(3, 5, 7, 9, generator=g) > 0.4  # 945 values: a partial last byte
        bits = pack_keep_mask(big.contiguous(memory_format=fmt), memory_format=fmt)
        assert bits.dtype == torch.uint8 and bits.shape == (119,) and bits[-1] >> 1 == 0
        back = unpack_keep_bits(bits, big.shape, memory_format=fmt)
        assert torch.equal(back, big) and back.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match=r"keep_bits must be uint8 of shape \(2,\)"):
        unpack_keep_bits(torch.zeros(3, dtype=torch.uint8), (1, 2, 1, 5), memory_format=torch.contiguous_format)
    with pytest.raises(ValueError, match="memory_format must be"):
        pack_keep_mask(mask, memory_format=torch.preserve_format)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_keep_bits_equal_the_mask(device, channels_last, training):
    """Keep bits drop what their mask drops: the same outputs, gradients and running statistics bit for bit, on
    every backend (the reference unpacks them); 420 values, so the last byte is partial. Compiled Triton (on CUDA) is
    free to sum the gradients' per-channel reductions in another order in each kernel variant, so there the gradients
    agree within rounding (seen on an H100: channels_last, up to 1e-13 relative in float64)."""
    for backend in kernel_backends(device) + ["ref"]:
        exact_grads = not (backend == "triton" and device == "cuda")
        for dtype in (torch.float64, torch.bfloat16):
            z, weight, bias, rm, rv, mask = _inputs((2, 6, 5, 7), dtype, device, 14, channels_last)
            results = []
            for keep in (dict(keep_mask=mask), dict(keep_bits=_bits(mask, z))):
                leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
                stats = [t.clone() for t in (rm, rv)]
                y = bn_relu_dropout(leaves[0], *stats, leaves[1], leaves[2], training=training, dropout_p=P,
                                    backend=backend, **keep)
                (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=device).view_as(y)
                 ).sum().backward()
                results.append([y] + [t.grad for t in leaves] + stats)
            for name, got, want in zip(("y", "dz", "dweight", "dbias", "running_mean", "running_var"), *results):
                if exact_grads or not name.startswith("d"):
                    assert torch.equal(got, want), (backend, dtype, name)
                else:
                    torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda m: f"{backend} {dtype} {name}: {m}")


def test_compiled_bit_draw_as_a_process_s_first_call():
    """random_keep_bits(z, p, "cpu") before any op has loaded the extension: it loads it and draws the byte draw's
    flags, packed."""
    import subprocess
    import sys

    if "cpu" not in available_backends("cpu"):
        pytest.skip("the compiled C++ kernels are not built here")
    code = ("import torch\n"
            "from lgc_fast.ops.bn_relu_dropout import pack_keep_mask, random_keep_bits, random_keep_mask\n"
            "z = torch.zeros(2, 3, 5, 7)\n"
            "torch.manual_seed(3); bits = random_keep_bits(z, 0.3, 'cpu')\n"
            "torch.manual_seed(3); mask = random_keep_mask(z, 0.3, 'cpu')\n"
            "assert torch.equal(bits, pack_keep_mask(mask, memory_format=torch.contiguous_format))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("device", devices())
def test_keep_bits_of_a_strided_z(device):
    """A z whose H and W strides do not merge is copied densely (contiguous): its bits number that layout."""
    for backend in kernel_backends(device, torch.float64):
        z, weight, bias, rm, rv, mask = _inputs((2, 4, 6, 10), torch.float64, device, 15, channels_last=True)
        z_view, mask_view = z[:, :, :, ::2], mask[:, :, :, 1::2]
        bits = pack_keep_mask(mask_view, memory_format=torch.contiguous_format)
        got = bn_relu_dropout(z_view, None, None, weight, bias, training=True, dropout_p=P, keep_bits=bits,
                              backend=backend)
        want = bn_relu_dropout_ref(z_view, None, None, weight, bias, mask_view, training=True, dropout_p=P)
        torch.testing.assert_close(got, want, **_tol(torch.float64))


@pytest.mark.parametrize("device", devices())
def test_gradcheck_float64(device):
    for backend in kernel_backends(device) + ["ref"]:
        z, weight, bias, rm, rv, mask = _inputs((2, 3, 4, 5), torch.float64, device, 7, channels_last=True)
        args = tuple(t.detach().clone().requires_grad_() for t in (z, weight, bias))
        # fast_mode checks a random projection of the Jacobian: a handful of interpreter launches, not hundreds.
        assert torch.autograd.gradcheck(
            lambda a, w, b: bn_relu_dropout(a, None, None, w, b, mask, training=True, dropout_p=P, backend=backend),
            args, fast_mode=True)
        assert torch.autograd.gradcheck(
            lambda a, w, b: bn_relu_dropout(a, rm, rv, w, b, mask, training=False, dropout_p=P, backend=backend),
            args, fast_mode=True)
        bits = _bits(mask, z)
        assert torch.autograd.gradcheck(
            lambda a, w, b: bn_relu_dropout(a, None, None, w, b, training=True, dropout_p=P, keep_bits=bits,
                                            backend=backend), args, fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for backend in kernel_backends(device):
        z, weight, bias, rm, rv, mask = _inputs((2, 3, 4, 5), torch.float32, device, 8, channels_last=True)
        z.requires_grad_()
        weight.requires_grad_()
        seed = torch.tensor([5], device=device)
        ops = torch.ops.lgc_fast
        mean, var = z.detach().mean(dim=(0, 2, 3)), z.detach().var(dim=(0, 2, 3), unbiased=False)
        grad = torch.randn_like(z)
        # Training: the Python custom ops over the Triton passes, or the compiled kernels' C++ op (autograd in C++).
        train_ops = torch.ops.lgc_fast if backend == "triton" else torch.ops.lgc_fast_C
        for keep, seeded in ((mask, None), (None, seed), (_bits(mask, z), None)):
            if backend == "triton":
                train_args = (z, weight, bias, keep, seeded, P, 1e-5, 0.1 / (1 - P))
            else:  # the C++ op updates the running statistics in place
                train_args = (z, weight, bias, keep, seeded, rm, rv, 0.1, P, 1e-5, 0.1 / (1 - P))
            torch.library.opcheck(train_ops.bn_relu_dropout_train.default, train_args)
            torch.library.opcheck(ops.scale_shift_relu_dropout.default,
                                  (z, weight, bias, keep, seeded, P, 0.1, backend))
            torch.library.opcheck(train_ops.bn_relu_dropout_train_backward.default,
                                  (grad, z.detach(), weight.detach(), bias, mean, var, keep, seeded, P, 1e-5, 0.1))
            torch.library.opcheck(ops.scale_shift_relu_dropout_backward.default,
                                  (grad, z.detach(), weight.detach(), bias, keep, seeded, P, 0.1, backend))


def test_compile_dynamic_fullgraph():
    """torch.compile(dynamic=True) makes float arguments symbolic: the argument checks must trace (comparisons become
    guards) instead of breaking the graph, training and inference, at two batch sizes from one compilation."""
    backends = [name for name in ("cpu", "ref") if name in available_backends(torch.device("cpu"))]

    def step(z, weight, bias, running_mean, running_var, mask, backend):
        y = bn_relu_dropout(z, running_mean, running_var, weight, bias, mask, training=True, momentum=0.2, eps=1e-4,
                            dropout_p=P, activation_scale=0.5, backend=backend)
        return bn_relu_dropout(y, running_mean, running_var, None, None, training=False, eps=1e-4, backend=backend)

    for backend in backends:
        torch._dynamo.reset()
        compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
        for n in (2, 3):
            z, weight, bias, running_mean, running_var, mask = _inputs((n, 3, 4, 5), torch.float32, "cpu", n)
            state = [running_mean.clone(), running_var.clone()]
            want = step(z, weight, bias, *state, mask, backend)
            got = compiled(z, weight, bias, running_mean, running_var, mask, backend)
            torch.testing.assert_close(got, want, msg=backend)
            torch.testing.assert_close([running_mean, running_var], state, msg=backend)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("training", [True, False])
def test_seeded_dropout_is_the_mask_of_its_seed(device, training):
    for backend in kernel_backends(device, torch.float64):
        z, weight, bias, rm, rv, _ = _inputs((2, 6, 5, 7), torch.float64, device, 12, channels_last=True)
        seed = torch.tensor([2024], device=device)
        mask = dropout_keep_mask(seed, z.shape, P)
        assert mask.dtype == torch.bool and mask.shape == z.shape
        results = []
        for fn, kwargs in ((lambda *a, **k: bn_relu_dropout(*a, **k, backend=backend), dict(dropout_seed=seed)),
                           (bn_relu_dropout_ref, dict(keep_mask=mask))):
            leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
            y = fn(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training=training, dropout_p=P, **kwargs)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)).sum().backward()
            results.append([y] + [t.grad for t in leaves])
        for got, want in zip(*results):  # the backward drew the forward's mask again
            torch.testing.assert_close(got, want, **_tol(torch.float64))


@pytest.mark.parametrize("device", devices())
def test_seeded_draws(device):
    backends = kernel_backends(device)
    if not backends:
        pytest.skip("needs a kernel backend (the compiled extension or Triton)")
    shape = (3, 8, 20, 24)
    seed = torch.tensor([7], device=device)
    for backend in backends:
        mask = dropout_keep_mask(seed, shape, P, backend)
        assert torch.equal(dropout_keep_mask(seed, shape, P, backend), mask)  # deterministic
        assert abs(mask.float().mean().item() - (1 - P)) < 0.02  # 11520 draws: 4.5 standard deviations
        assert not torch.equal(dropout_keep_mask(torch.tensor([8], device=device), shape, P, backend), mask)
        assert dropout_keep_mask(seed, shape, 0.0, backend).all()
        in_channels_last = dropout_keep_mask(seed, shape, P, backend, memory_format=torch.channels_last)
        assert in_channels_last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(in_channels_last, mask)
        # The mask follows the logical (N, C, H, W) index: the same seed drops the same values in either memory
        # format.
        z, weight, bias, rm, rv, _ = _inputs(shape, torch.float32, device, 13)
        outputs = [bn_relu_dropout(z.contiguous(memory_format=fmt), None, None, weight, bias, training=True,
                                   dropout_p=P, dropout_seed=seed, backend=backend)
                   for fmt in (torch.contiguous_format, torch.channels_last)]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-7)


def test_every_kernel_backend_draws_the_same_masks():
    """The C++ and CUDA Philox are Triton's tl.rand bit for bit: a seed drops the same values on every backend and
    device, whatever the seed's high and low words, the shape or the dropout rate."""
    draws = [(device, backend) for device in devices() for backend in kernel_backends(device)]
    if len(draws) < 2:
        pytest.skip(f"needs two kernel backends, has {draws}")
    for seed, shape, p in ((0, (1, 1, 3, 5), 0.5), (2024, (2, 6, 5, 7), P), (2**62 - 12345, (3, 8, 20, 24), 0.1),
                           (2**32 + 1, (2, 3, 17, 9), 0.9), (5, (2, 300, 3, 4), 0.2)):
        masks = [dropout_keep_mask(torch.tensor([seed], device=device), shape, p, backend).cpu()
                 for device, backend in draws]
        for (device, backend), mask in zip(draws[1:], masks[1:]):
            assert torch.equal(mask, masks[0]), f"{backend} on {device} differs from {draws[0]}"
        assert 0 < masks[0].sum() < masks[0].numel()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_random_keep_mask(device, channels_last):
    """ConvBlock's byte masks: z's shape and layout, reproducible from torch's generator, the right rate (every
    backend's own draw: the compiled kernels' four flags per Philox counter, with a partial last group here)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.empty(4, 16, 32, 33, device=device).contiguous(memory_format=fmt)  # 67584 values
    odd = torch.empty(3, 5, 7, 9, device=device).contiguous(memory_format=fmt)  # 945 = 4 * 236 + 1
    for backend in kernel_backends(device) + ["ref"]:
        torch.manual_seed(0)
        mask = random_keep_mask(z, P, backend)
        torch.manual_seed(0)
        assert torch.equal(random_keep_mask(z, P, backend), mask)
        assert mask.dtype == torch.bool and mask.shape == z.shape and mask.is_contiguous(memory_format=fmt)
        assert mask.device == z.device
        assert not torch.equal(random_keep_mask(z, P, backend), mask)  # the generator moved on
        assert abs(mask.float().mean().item() - (1 - P)) < 0.01  # 5.7 standard deviations
        assert random_keep_mask(z, 0.0, backend).all()
        tail = random_keep_mask(odd, 0.5, backend)
        assert 0 < tail.sum() < tail.numel() and tail.shape == odd.shape


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("channels_last", [False, True])
def test_random_keep_bits(device, channels_last):
    """ConvBlock's keep bits: from the same generator state, the compiled kernels' draw is their byte mask packed
    (partial last bytes included); elsewhere bernoulli_ packed; reproducible, at the right rate."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for shape in ((4, 16, 32, 33), (3, 5, 7, 9), (1, 1, 1, 3)):  # 67584 values; 945 = 8 * 118 + 1; 3
        z = torch.empty(shape, device=device).contiguous(memory_format=fmt)
        for backend in kernel_backends(device) + ["ref"]:
            torch.manual_seed(0)
            bits = random_keep_bits(z, P, backend)
            assert bits.dtype == torch.uint8 and bits.shape == ((z.numel() + 7) // 8,) and bits.device == z.device
            torch.manual_seed(0)
            assert torch.equal(random_keep_bits(z, P, backend), bits)
            torch.manual_seed(0)
            compiled = backend == z.device.type
            mask = random_keep_mask(z, P, backend if compiled else None)
            assert torch.equal(bits, _bits(mask, z)), backend
            if z.numel() > 10000:
                assert abs(unpack_keep_bits(bits, shape, memory_format=fmt).float().mean().item() - (1 - P)) < 0.01
                assert not torch.equal(random_keep_bits(z, P, backend), bits)  # the generator moved on
            assert unpack_keep_bits(random_keep_bits(z, 0.0, backend), shape, memory_format=fmt).all()


@pytest.mark.parametrize("device", devices())
def test_drawn_keep_bits_are_random_keep_bits(device):
    """bn_relu_dropout_drawn draws in its forward pass what random_keep_bits draws from the same generator state, and
    gives bn_relu_dropout's outputs, gradients and running statistics with those bits, bit for bit, on every backend.
    The shapes take both CUDA paths: the draw inside the apply kernel (bfloat16/float16 with C or H * W a multiple of
    8) and the bits kernel first (float32, float64, C = 5, 945 values: a partial last byte)."""
    cases = [((2, 16, 3, 5), torch.bfloat16, True), ((2, 4, 4, 6), torch.float16, False),
             ((3, 5, 7, 9), torch.bfloat16, True), ((2, 6, 5, 7), torch.float32, False),
             ((2, 3, 4, 5), torch.float64, True)]
    for backend in kernel_backends(device) + ["ref"]:
        for shape, dtype, channels_last in cases:
            z, weight, bias, rm, rv, _ = _inputs(shape, dtype, device, 21, channels_last)
            results = []
            for drawn in (False, True):
                leaves = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
                stats = [t.clone() for t in (rm, rv)]
                torch.manual_seed(5)
                if drawn:
                    y, bits = bn_relu_dropout_drawn(leaves[0], *stats, leaves[1], leaves[2], momentum=0.2,
                                                    dropout_p=P, backend=backend)
                else:
                    bits = random_keep_bits(leaves[0], P, backend)
                    y = bn_relu_dropout(leaves[0], *stats, leaves[1], leaves[2], training=True, momentum=0.2,
                                        dropout_p=P, keep_bits=bits, backend=backend)
                (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64, device=device).view_as(y)
                 ).sum().backward()
                results.append([y, bits] + [t.grad for t in leaves] + stats)
            assert results[1][0].is_contiguous(memory_format=torch.channels_last if channels_last else
                                               torch.contiguous_format)
            for name, got, want in zip(("y", "bits", "dz", "dweight", "dbias", "running_mean", "running_var"),
                                       *results):
                assert torch.equal(got, want), (backend, shape, dtype, name)
            kept = unpack_keep_bits(results[1][1], shape, memory_format=_memory_format_of(z)).float().mean().item()
            assert 0.4 < kept < 0.95, (backend, shape, kept)  # drops values at about the rate P


def _memory_format_of(z):
    return torch.channels_last if z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last) \
        and not z.is_contiguous() else torch.contiguous_format


@pytest.mark.parametrize("device", devices())
def test_drawn_op_opcheck_and_gradcheck(device):
    """The compiled kernels' training op that draws its bits: registration (fake tensors, autograd) and float64
    gradients."""
    if device not in kernel_backends(device):
        pytest.skip(f"the compiled {device} kernels are not built here")
    z, weight, bias, rm, rv, _ = _inputs((2, 8, 4, 5), torch.float64, device, 9, channels_last=True)
    seed = torch.tensor([11], device=device)
    args = [t.detach().clone().requires_grad_() for t in (z, weight, bias)]
    for running in ((None, None), (rm, rv)):
        torch.library.opcheck(torch.ops.lgc_fast_C.bn_relu_dropout_train_drawn.default,
                              (*args, seed, *running, 0.1, P, 1e-5, 0.1 / (1 - P)))

    def fresh_draw(a, w, b):
        torch.manual_seed(2)  # the same bits on every evaluation
        return bn_relu_dropout_drawn(a, None, None, w, b, dropout_p=P, backend=device)[0]

    assert torch.autograd.gradcheck(fresh_draw, tuple(args), fast_mode=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bernoulli_keep_bits_cuda_equals_cpu():
    """The CUDA keep-bit draw (32 flags a thread, one 4-byte store) gives the C++ CPU draw's bits, partial last
    groups and bytes included."""
    if "cuda" not in kernel_backends("cuda") or "cpu" not in kernel_backends("cpu"):
        pytest.skip("needs the compiled CPU and CUDA kernels")
    draw = torch.ops.lgc_fast_C.bernoulli_keep_bits
    for seed, count, p in ((0, 1, 0.5), (2**62 - 7, 420, P), (2**32 + 1, 11520, 0.1), (11, 33, 0.9),
                           (12, 64 * 128 * 96 * 96 + 5, 0.1)):
        cpu = draw(torch.tensor([seed]), count, p)
        cuda = draw(torch.tensor([seed], device="cuda"), count, p)
        assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu), (seed, count)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bernoulli_keep_mask_cuda_equals_cpu():
    """The CUDA byte-mask draw (16 flags a thread, one 16-byte store) gives the C++ CPU draw's flags bit for bit,
    partial last groups of 1-15 flags included."""
    if "cuda" not in kernel_backends("cuda") or "cpu" not in kernel_backends("cpu"):
        pytest.skip("needs the compiled CPU and CUDA kernels")
    draw = torch.ops.lgc_fast_C.bernoulli_keep_mask
    for seed, shape, p, channels_last in ((0, [1, 1, 3, 5], 0.5, False), (2**62 - 7, [2, 6, 5, 7], P, True),
                                          (2**32 + 1, [3, 8, 20, 24], 0.1, False), (11, [2, 3, 17, 9], 0.9, True),
                                          (12, [64, 128, 96, 96], 0.1, True)):
        cpu = draw(torch.tensor([seed]), shape, p, channels_last)
        cuda = draw(torch.tensor([seed], device="cuda"), shape, p, channels_last)
        assert cuda.device.type == "cuda" and cuda.stride() == cpu.stride()
        assert torch.equal(cuda.cpu(), cpu), (seed, shape)


@pytest.mark.parametrize("device", devices())
def test_keep_mask_ops_opcheck(device):
    """The compiled mask draws (a seed in, a mask out, deterministic in the seed) against their Meta kernels, which
    torch.compile traces them with: schema, fake tensors, AOT dispatch."""
    ext = [name for name in kernel_backends(device) if name in ("cpu", "cuda")]
    if not ext:
        pytest.skip(f"no compiled kernels on {device} here")
    seed = torch.tensor([7], device=device)
    for op in (torch.ops.lgc_fast_C.bernoulli_keep_mask, torch.ops.lgc_fast_C.dropout_keep_mask):
        for channels_last in (False, True):
            torch.library.opcheck(op.default, (seed, [2, 3, 4, 5], 0.3, channels_last))
    for count in (0, 5, 120):
        torch.library.opcheck(torch.ops.lgc_fast_C.bernoulli_keep_bits.default, (seed, count, 0.3))


def test_dropout_keep_mask_backends(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of cpu, cuda, triton, not 'ref'"):
        dropout_keep_mask(torch.tensor([1]), (1, 2, 3, 3), P, "ref")
    with pytest.raises(ValueError, match="memory_format must be"):
        dropout_keep_mask(torch.tensor([1]), (1, 2, 3, 3), P, memory_format=torch.preserve_format)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton is usable on this machine")
    with pytest.raises(ValueError, match="draws with the compiled or the Triton kernels, not usable here"):
        dropout_keep_mask(torch.tensor([1]), (1, 2, 3, 3), P, "triton")


def test_cpu_default(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    expected = "cpu" if "cpu" in available_backends("cpu") else "ref"
    assert _backend.choose("bn_relu_dropout", cpu, None, ("cpu", "triton", "ref")) == expected
    assert fused_backend(cpu) == (None if expected == "ref" else "cpu")
    monkeypatch.setenv(_backend.ENV_VAR, "ref")  # the reference is no faster than torch's modules: no fused path
    assert fused_backend(cpu) is None
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")  # a backend that cannot run on the CPU: no fused path, no error
    assert fused_backend(cpu) is None


@pytest.mark.parametrize("device", devices())
def test_empty_batch_in_eval(device):
    for backend in kernel_backends(device) + ["ref"]:
        z, weight, bias, rm, rv, _ = _inputs((0, 3, 4, 4), torch.float32, device, 9)
        y = bn_relu_dropout(z, rm, rv, weight, bias, training=False, backend=backend)
        assert y.shape == z.shape


@pytest.mark.parametrize("device", devices())
def test_running_update_forms(device):
    """The compiled kernels update the running statistics inside their training op (in the per-channel step where the
    buffers are dense in the accumulation dtype, else in torch ops): nn.BatchNorm2d's update for every buffer dtype,
    a strided buffer, and momenta on both sides of lerp's switch at 0.5, plain and drawing its keep bits."""
    backends = [name for name in kernel_backends(device) if name in ("cpu", "cuda")]
    if not backends:
        pytest.skip(f"the compiled {device} kernels are not built here")
    z, weight, bias, rm, rv, mask = _inputs((2, 5, 4, 3), torch.float32, device, 12)
    for backend in backends:
        for stat_dtype, strided in ((torch.float32, False), (torch.float32, True), (torch.float64, False),
                                    (torch.float16, False)):
            for momentum in (0.1, 0.75, 1.0):
                def buffers(v):
                    if not strided:
                        return v.to(stat_dtype).clone()
                    return torch.stack([v, torch.full_like(v, 7.0)], 1).to(stat_dtype)[:, 0]
                want, got, drawn = [buffers(rm), buffers(rv)], [buffers(rm), buffers(rv)], [buffers(rm), buffers(rv)]
                bn_relu_dropout_ref(z, *want, weight, bias, mask, training=True, momentum=momentum, dropout_p=P)
                bn_relu_dropout(z, *got, weight, bias, mask, training=True, momentum=momentum, dropout_p=P,
                                backend=backend)
                bn_relu_dropout_drawn(z, *drawn, weight, bias, momentum=momentum, dropout_p=P, backend=backend)
                tol = dict(rtol=1e-3, atol=1e-3) if stat_dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
                for stats in (got, drawn):
                    assert [t.dtype for t in stats] == [stat_dtype] * 2
                    torch.testing.assert_close(stats, want, **tol, msg=f"{backend} {stat_dtype} {strided} {momentum}")
                if strided:  # updated through the view: the base's other column stays as it was
                    assert bool((got[0]._base[:, 1] == 7.0).all()) and bool((drawn[1]._base[:, 1] == 7.0).all())


def test_training_op_rejects_bad_running_statistics():
    """The C++ training op checks the running statistics itself (it writes them): one-line errors naming them."""
    if "cpu" not in kernel_backends("cpu"):
        pytest.skip("the compiled CPU kernels are not built here")
    z, weight, bias, rm, rv, _ = _inputs((1, 6, 5, 5), torch.float32, "cpu", 10)
    op = torch.ops.lgc_fast_C.bn_relu_dropout_train
    one_pixel = z[:, :, :1, :1]
    for x, running, momentum, match in ((z, (rm, None), 0.1, "both be tensors or both be None"),
                                        (z, (rm, rv), 1.5, r"momentum must be in \[0, 1\]"),
                                        (z, (rm[:5], rv), 0.1, r"running_mean must be a floating-point .* \(C=6,\)"),
                                        (z, (rm, rv.to(torch.int64)), 0.1, "running_var must be a floating-point"),
                                        (one_pixel, (rm, rv), 0.1, r"N\*H\*W >= 2")):
        with pytest.raises(RuntimeError, match=match):
            op(x, weight, bias, None, None, *running, momentum, 0.0, 1e-5, 0.1)


def _bad(**overrides):
    z, weight, bias, rm, rv, mask = _inputs((1, 6, 5, 5), torch.float32, "cpu", 10)
    args = dict(z=z, running_mean=rm, running_var=rv, weight=weight, bias=bias, keep_mask=mask, training=True)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(z=torch.ones(6, 5, 5)), ValueError, "z must have shape"),
    (dict(z=torch.ones(1, 6, 5, 5, dtype=torch.int32)), TypeError, "z must be float32"),
    (dict(running_var=None), ValueError, "both be tensors or both be None"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "training=False normalises"),
    (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(C=6,\)"),
    (dict(bias=torch.ones(6, dtype=torch.int64)), TypeError, "bias must be a floating-point"),
    (dict(z=torch.ones(1, 6, 1, 1), keep_mask=None), ValueError, "more than one value per channel"),
    (dict(keep_mask=torch.ones(1, 6, 5, 5)), TypeError, "keep_mask must be a bool or uint8"),
    (dict(keep_mask=torch.ones(1, 6, 5, 4, dtype=torch.bool)), ValueError, "keep_mask must have z's shape"),
    (dict(momentum=1.5), ValueError, "momentum must be"),
    (dict(eps=0.0), ValueError, "eps must be"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be"),
    (dict(activation_scale=float("nan")), ValueError, "activation_scale must be"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is not usable here"),
    (dict(dropout_seed=torch.tensor([1])), ValueError, "keep_mask or dropout_seed, not both"),
    (dict(keep_bits=torch.zeros(19, dtype=torch.uint8)), ValueError, "one of keep_mask, keep_bits and dropout_seed"),
    (dict(keep_mask=None, keep_bits=torch.zeros(19, dtype=torch.bool)), TypeError, "keep_bits must be a uint8"),
    (dict(keep_mask=None, keep_bits=torch.zeros(20, dtype=torch.uint8)), ValueError,
     r"keep_bits must have shape \(\(N\*C\*H\*W \+ 7\) // 8,\) = \(19,\)"),
    (dict(keep_mask=None, dropout_seed=torch.tensor([1.0])), TypeError, "dropout_seed must be an int64 tensor"),
    (dict(keep_mask=None, dropout_seed=torch.tensor([1, 2])), TypeError, "dropout_seed must be an int64 tensor"),
    (dict(z=torch.ones(1, 1, 1, 1).expand(2**16, 2**15, 1, 1), keep_mask=None, running_mean=None, running_var=None,
          weight=None, bias=None, dropout_seed=torch.tensor([1])), ValueError, "dropout_seed draws for at most"),
])
def test_bad_inputs(overrides, exc, match):
    with pytest.raises(exc, match=match):
        bn_relu_dropout(**_bad(**overrides))


def test_seed_limit_is_the_kernels():
    kernels = pytest.importorskip("lgc_fast.kernels.bn_relu_dropout")
    assert SEEDED_LIMIT == kernels.SEEDED_LIMIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_release_shape(backend, dtype, channels_last):
    if backend not in kernel_backends("cuda"):
        pytest.skip(f"backend {backend} not available: {_backend.backends()[backend][1]}")
    z, weight, bias, rm, rv, mask = _inputs((8, 128, 96, 96), dtype, "cuda", 11, channels_last=channels_last)
    (y, grads, stats), (y_ref, grads_ref, stats_ref) = _run_both(backend, z, weight, bias, rm, rv, mask, True)
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    # Among 9.4M values a few sit so close to the ReLU's kink that rounding puts them on the other side than in the
    # reference; their dz is 0 in one and not in the other. Compare dz away from the kink (float64 pre-activation).
    z64 = z.double()
    mean, var = z64.mean((0, 2, 3), keepdim=True), z64.var((0, 2, 3), unbiased=False, keepdim=True)
    pre = (z64 - mean) / torch.sqrt(var + 1e-5) * weight.double()[:, None, None] + bias.double()[:, None, None]
    clear = pre.abs() > (1e-2 if dtype == torch.bfloat16 else 1e-4)
    assert clear.double().mean() > 0.99
    for got, want in zip(grads, grads_ref):
        scale = want.abs().max().item() + 1.0
        if got.shape == z.shape:
            got, want = got[clear], want[clear]
        torch.testing.assert_close(got.double() / scale, want.double() / scale, rtol=1e-2, atol=1e-3)
    for got, want in zip(stats, stats_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
