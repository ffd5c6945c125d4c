"""The layout ops (channels_last_cat, planar_split, pointwise_conv_planar) against their references, gradients
(gradcheck, opcheck), torch.compile, bad input, and the network's planar heads: the same outputs and gradients as
channels_last heads, with every kernel_conv and lgc_loss call reading planar maps."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends, devices
from lgc_fast.model import LGCN, PointwiseConv
from lgc_fast.ops.layout import (_cat_op, _split_op, channels_last_cat, channels_last_cat_ref, channels_last_strided,
                                 planar_split, planar_split_ref, pointwise_conv_planar, pointwise_conv_planar_ref)
from lgc_fast.train import forward_loss

kernel_conv_module = importlib.import_module("lgc_fast.ops.kernel_conv")
lgc_loss_module = importlib.import_module("lgc_fast.ops.lgc_loss")

CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, H, W) and the parts' channels: the network's two maps, one map, a channel of one, sides of one, empty
CASES = [((2, 5, 7), (3, 4)), ((1, 6, 6), (5,)), ((2, 4, 3), (1, 3, 2)), ((3, 1, 5), (2, 2)), ((2, 4, 1), (3, 1)),
         ((0, 4, 4), (2, 3)), ((2, 4, 4), (0, 3))]


def _layout_cases():
    return [(device, backend) for device in devices() for backend in available_backends(device)
            if backend in ("cuda", "ref")]


def _parts(nhw, channels, dtype, device, layout):
    n, h, w = nhw
    parts = [torch.randn(n, c, h, w, dtype=torch.float64).to(device=device, dtype=dtype) for c in channels]
    if layout == "channels_last":
        return [p.contiguous(memory_format=CL) for p in parts]
    if layout == "strided":  # every other column of a wider map
        return [torch.randn(n, c, h, 2 * w, dtype=torch.float64).to(device=device, dtype=dtype)[..., ::2]
                for c in channels]
    return parts


@pytest.mark.parametrize("device,backend", _layout_cases())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nhw,channels", CASES)
@pytest.mark.parametrize("layout", ["planar", "channels_last", "strided"])
def test_cat_and_split_equal_torch(device, backend, dtype, nhw, channels, layout):
    parts = _parts(nhw, channels, dtype, device, layout)
    out = channels_last_cat(parts, backend=backend)
    expected = torch.cat(parts, 1)
    assert out.dtype == dtype and out.shape == expected.shape and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=CL)
    for x in (out, expected):  # a channels_last map and a planar one
        split = planar_split(x, channels, backend=backend)
        assert len(split) == len(parts)
        for got, want in zip(split, parts):
            assert got.is_contiguous() and torch.equal(got, want)
            if got.numel():
                assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize("device,backend", _layout_cases())
def test_split_of_a_single_planar_map_is_a_copy(device, backend):
    x = torch.randn(2, 3, 4, 5, device=device)
    (part,) = planar_split(x, [3], backend=backend)
    part.add_(1)
    assert not torch.equal(part, x)


@pytest.mark.parametrize("device,backend", _layout_cases())
def test_gradients_gradcheck_and_opcheck(device, backend):
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=device).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: channels_last_cat([a, b], backend=backend), (a, b))
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, device=device).contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: planar_split(x, [2, 3], backend=backend), (x,))
    # one part's gradient missing: it counts as zero
    assert torch.autograd.gradcheck(lambda x: planar_split(x, [2, 3], backend=backend)[1], (x,))
    out = channels_last_cat([a, b], backend=backend)
    assert all(g.is_contiguous() for g in torch.autograd.grad(out, (a, b), torch.ones_like(out)))
    torch.library.opcheck(_cat_op, ([a, b], backend))
    torch.library.opcheck(_split_op, (x, [2, 3], backend))


def test_compile_keeps_the_layout_ops():
    a = torch.randn(2, 3, 6, 6, requires_grad=True)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(3, 8, 1, 1, requires_grad=True)

    def graph(a, x, weight):
        head = pointwise_conv_planar(x, weight)
        return channels_last_cat([a, head]) * 2

    compiled = torch.compile(graph, fullgraph=True)
    eager_out = graph(a, x, weight)
    out = compiled(a, x, weight)
    torch.testing.assert_close(out, eager_out)
    grads = torch.autograd.grad(out.square().sum(), (a, x, weight))
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (a, x, weight))
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_cat_and_split_refuse_bad_input():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="parts must hold at least one map"):
        channels_last_cat([])
    with pytest.raises(ValueError, match=r"parts\[1\] must have parts\[0\]'s N, H and W"):
        channels_last_cat([a, torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match=r"parts\[1\] must have parts\[0\]'s dtype"):
        channels_last_cat([a, a.double()])
    with pytest.raises(ValueError, match=r"parts\[0\] must have 4 dimensions"):
        channels_last_cat([a[0]])
    with pytest.raises(ValueError, match="sizes must be >= 0 and add up to x's 3 channels"):
        planar_split(a, [1, 1])
    with pytest.raises(ValueError, match="not implemented for this op"):
        channels_last_cat([a], backend="cpu")
    assert torch.equal(channels_last_cat_ref([a]), a) and torch.equal(planar_split_ref(a, [3])[0], a)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_planar_is_the_convolution(device, bias):
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64, device=device).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(4, 6, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True) if bias else None
    out = pointwise_conv_planar(x, weight, b)
    expected = F.conv2d(x, weight, b)
    assert out.is_contiguous() and torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    inputs = (x, weight) + ((b,) if bias else ())
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    assert got[0].is_contiguous(memory_format=CL) and not got[0].is_contiguous()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.allclose(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(pointwise_conv_planar, (x, weight, b))
    planar_x = x.detach().contiguous()  # other layouts: the convolution itself, made planar
    torch.testing.assert_close(pointwise_conv_planar(planar_x, weight, b), pointwise_conv_planar_ref(planar_x, weight, b))


def test_pointwise_conv_planar_under_autocast_computes_as_the_convolution():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(5, 8, 1, 1, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pointwise_conv_planar(x, weight, bias)
        expected = F.conv2d(x, weight, bias)
    assert out.dtype == expected.dtype == torch.bfloat16 and out.is_contiguous()
    torch.testing.assert_close(out, expected.contiguous(), rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (x, weight, bias))
    assert [g.dtype for g in grads] == [torch.float32] * 3


def test_pointwise_conv_planar_refuses_bad_weights():
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, 4, 1, 1\)"):
        pointwise_conv_planar(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        pointwise_conv_planar(x, torch.randn(2, 4, 1, 1), torch.randn(3))


def _run_step(variant, planar, record=None):
    torch.manual_seed(0)
    model = LGCN(variant, 8, dropout=0.0, local_layers=(3, 3)).double().to(memory_format=CL).train()
    model.use_planar_heads(planar)
    images = (torch.rand(2, 1, 24, 24, dtype=torch.float64) * 255).contiguous(memory_format=CL)
    points = torch.rand(2, 68, 2, dtype=torch.float64) * 12 + 6
    labelled = torch.ones(2, 68, dtype=torch.bool)
    local, omega = model(images)
    loss = forward_loss(model, images, points, labelled, False)
    loss.backward()
    return (local, omega), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["release", "paper"])
def test_planar_heads_give_the_channels_last_heads_results_without_layout_changes(variant, monkeypatch):
    seen = []

    def recording(table, key):
        inner = table[key]

        def wrapped(*maps, **kwargs):
            seen.extend(m.is_contiguous() for m in maps if isinstance(m, torch.Tensor) and m.dim() == 4)
            return inner(*maps, **kwargs)
        monkeypatch.setitem(table, key, wrapped)

    for table in (kernel_conv_module._IMPLS, lgc_loss_module._FORWARD, lgc_loss_module._BACKWARD):
        for key in list(table):
            recording(table, key)
    outputs, grads = _run_step(variant, planar=True)
    kernel_calls = 4 if variant == "release" else 2  # forward and backward of K * O_l (and of K * B)
    assert len(seen) >= kernel_calls + 5 and all(seen)
    assert all(o.is_contiguous() for o in outputs)
    seen.clear()
    old_outputs, old_grads = _run_step(variant, planar=False)
    assert not any(seen)  # the channels_last heads: every map those ops read needs a layout change
    for got, want in zip(outputs, old_outputs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], old_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_folded_network_keeps_planar_heads():
    model = LGCN("release", 8, local_layers=(3,)).eval()
    folded = model.folded()
    assert isinstance(folded.branch.conv, PointwiseConv) and folded.branch.conv.planar_output
    x = (torch.rand(1, 1, 16, 16) * 255).contiguous(memory_format=CL)
    channels_last = folded.to(memory_format=CL)
    with torch.no_grad():
        for got, want in zip(channels_last(x), model.to(memory_format=CL)(x)):
            assert got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not model.use_planar_heads(False).folded().branch.conv.planar_output


def test_network_with_planar_heads_compiles_fullgraph():
    torch.manual_seed(0)
    model = LGCN("release", 8, local_layers=(3,)).to(memory_format=CL).train().fuse_epilogues()
    images = (torch.rand(2, 1, 24, 24) * 255).contiguous(memory_format=CL)
    points = torch.rand(2, 68, 2) * 12 + 6
    labelled = torch.ones(2, 68, dtype=torch.bool)
    compiled = torch.compile(forward_loss, fullgraph=True)
    loss = compiled(model, images, points, labelled, False)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("shape", [(2, 1, 5, 6), (2, 3, 5, 6), (1, 4, 1, 1)])
def test_channels_last_strided_gives_channel_stride_one(shape):
    x = torch.randn(shape)
    y = channels_last_strided(x)
    n, c, h, w = shape
    assert y.stride() == (h * w * c, 1, w * c, c) and torch.equal(y, x)
    assert channels_last_strided(y) is y
    # what it is for: a 1-channel map that .contiguous(memory_format=channels_last) leaves planar
    if c == 1:
        assert x.contiguous(memory_format=torch.channels_last).stride() == x.stride() != y.stride()
        weight = torch.randn(3, 1, 3, 3)
        assert F.conv2d(y, weight, padding=1).stride(1) == 1 and F.conv2d(x, weight, padding=1).stride(1) != 1
