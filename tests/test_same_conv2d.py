"""lgc_fast.ops.same_conv2d: both kernel families against the reference (values, gradients, autocast, layouts), the
choice that via="auto" records and follows, and the model's use of it."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from lgc_fast.model import LGCN, ConvBlock, FoldedConvBlock
from lgc_fast.ops.layout import channels_last_strided
from lgc_fast.ops.same_conv2d import (
    NATIVE,
    TUNE_MARGIN,
    clear_same_conv2d_choices,
    same_conv2d,
    same_conv2d_choices,
    same_conv2d_ref,
    tune_same_conv2d,
)

module = importlib.import_module("lgc_fast.ops.same_conv2d")  # lgc_fast.ops.same_conv2d is also the function
CUDA = torch.cuda.is_available()
SHAPES = [(5, 1), (3, 1), (3, 4), (3, 2)]  # (k, dilation): the network's, and one more dilation


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv("LGC_FAST_BACKEND", raising=False)
    clear_same_conv2d_choices()
    yield
    clear_same_conv2d_choices()


def naive_same_conv(x, weight, bias, dilation):
    """The defining sum, one filter offset at a time, on a zero-padded copy of x (float64)."""
    k = weight.shape[-1]
    pad = dilation * (k // 2)
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    out = torch.zeros(n, weight.shape[0], h, w, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            window = padded[:, :, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
            out += torch.einsum("oc,nchw->nohw", weight[:, :, i, j], window)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def operands(k, c=3, o=4, h=9, w=11, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(o, c, k, k, generator=g, dtype=dtype)
    b = torch.randn(o, generator=g, dtype=dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("k,dilation", SHAPES)
def test_reference_is_the_defining_sum(k, dilation):
    x, weight, bias = operands(k)
    torch.testing.assert_close(same_conv2d_ref(x, weight, bias, dilation), naive_same_conv(x, weight, bias, dilation))


@pytest.mark.parametrize("via", ["fprop", "dgrad"])
@pytest.mark.parametrize("k,dilation", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_both_families_match_the_reference(via, k, dilation, bias):
    x, weight, b = operands(k, bias=bias)
    torch.testing.assert_close(same_conv2d(x, weight, b, dilation, via=via), same_conv2d_ref(x, weight, b, dilation))


@pytest.mark.parametrize("k,dilation", SHAPES)
def test_dgrad_gradcheck(k, dilation):
    x, weight, bias = operands(k, c=2, o=3, h=7, w=6)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: same_conv2d(*a, dilation, via="dgrad"), inputs)


@pytest.mark.parametrize("k,dilation", [(5, 1), (3, 4)])
def test_dgrad_gradients_match_the_reference_channels_last(k, dilation):
    x, weight, bias = operands(k, c=8, o=8, h=12, w=12)
    x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for fn in (lambda *a: same_conv2d(*a, dilation, via="dgrad"), lambda *a: same_conv2d_ref(*a, dilation)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_autocast_runs_in_autocast_dtype():
    x, weight, bias = operands(5, c=16, o=16, h=12, w=12, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = same_conv2d(x, weight, bias, 1, via="dgrad")
        expected = same_conv2d_ref(x, weight, bias, 1)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32


def expected_via(row):
    """The family a measured row must have chosen: its direction's native one unless the other is clearly faster."""
    native = NATIVE[row["direction"] == "input_grad"]
    other = "fprop" if native == "dgrad" else "dgrad"
    return other if row[f"{other}_ms"] < (1 - TUNE_MARGIN) * row[f"{native}_ms"] else native


def test_the_native_families_are_f_conv2d_itself(monkeypatch):
    calls = []
    monkeypatch.setattr(module.F, "conv_transpose2d", lambda *a, **k: calls.append(1) or F.conv_transpose2d(*a, **k))
    x, weight, bias = operands(3)
    y = same_conv2d(x.requires_grad_(), weight, bias, 2)  # auto on the CPU without a recorded choice: native
    assert y.grad_fn.name() == "ConvolutionBackward0"
    y.sum().backward()
    assert not calls


def fake_measure(choices):
    """A stand-in for _measure that returns the given family per direction (transposed: the input gradient)."""
    def measure(x, weight, bias, dilation, transposed):
        return choices["input_grad" if transposed else "forward"], 1.0, 0.5
    return measure


@pytest.mark.parametrize("forward,input_grad", [("dgrad", "fprop"), ("fprop", "fprop"), ("fprop", "dgrad"),
                                               ("dgrad", "dgrad")])
def test_auto_follows_recorded_choices(monkeypatch, forward, input_grad):
    monkeypatch.setattr(module, "_measure", fake_measure({"forward": forward, "input_grad": input_grad}))
    x, weight, _ = operands(5, c=4, o=4)
    assert tune_same_conv2d(x, weight, dilation=1) == {"forward": forward, "input_grad": input_grad}
    transposed = []
    real = F.conv_transpose2d
    monkeypatch.setattr(module.F, "conv_transpose2d", lambda *a, **k: transposed.append(a[0].shape) or real(*a, **k))
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    y = same_conv2d(*leaves, None, 1)
    assert len(transposed) == (forward == "dgrad")
    native = (forward, input_grad) == NATIVE  # F.conv2d, whose backward is one aten call for both gradients
    assert (y.grad_fn.name() == "ConvolutionBackward0") == native
    y.backward(torch.ones_like(y))
    assert len(transposed) == (forward == "dgrad") + (input_grad == "dgrad" and not native)
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, weight))
    same_conv2d_ref(x_ref, w_ref).backward(torch.ones_like(y))
    torch.testing.assert_close(y, same_conv2d_ref(x, weight))
    torch.testing.assert_close(leaves[0].grad, x_ref.grad)
    torch.testing.assert_close(leaves[1].grad, w_ref.grad)
    # another configuration (dilation) has no recorded choice: fprop on the CPU
    transposed.clear()
    same_conv2d(*leaves, None, 2).sum().backward()
    assert not transposed


def test_reference_backend_overrides_recorded_choices(monkeypatch):
    monkeypatch.setattr(module, "_measure", fake_measure({"forward": "dgrad", "input_grad": "dgrad"}))
    x, weight, _ = operands(3)
    tune_same_conv2d(x, weight)
    monkeypatch.setenv("LGC_FAST_BACKEND", "ref")
    assert same_conv2d(x.requires_grad_(), weight).grad_fn.name() == "ConvolutionBackward0"


def test_a_choice_depends_on_dtype_and_layout(monkeypatch):
    monkeypatch.setattr(module, "_measure", fake_measure({"forward": "dgrad", "input_grad": "dgrad"}))
    x, weight, _ = operands(3, dtype=torch.float32)
    tune_same_conv2d(x, weight)
    assert same_conv2d(x, weight).grad_fn is None  # no grad needed; the recorded forward choice ran
    assert same_conv2d(x.requires_grad_(), weight).grad_fn.name() == "_SameConvBackward"
    assert same_conv2d(x.double(), weight.double()).grad_fn.name() == "ConvolutionBackward0"
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert same_conv2d(x_cl, weight).grad_fn.name() == "ConvolutionBackward0"


@pytest.mark.parametrize("transposed,fprop,dgrad,chosen", [
    (False, 10.0, 9.0, "dgrad"), (False, 10.0, 10.0 * (1 - TUNE_MARGIN / 2), "fprop"), (False, 9.0, 10.0, "fprop"),
    (True, 9.0, 10.0, "fprop"), (True, 10.0 * (1 - TUNE_MARGIN / 2), 10.0, "dgrad"), (True, 10.0, 9.0, "dgrad")])
def test_measure_leaves_the_native_family_only_when_the_other_is_clearly_faster(monkeypatch, transposed, fprop, dgrad,
                                                                                 chosen):
    times = iter([fprop, dgrad] * module.TUNE_RUNS)
    monkeypatch.setattr(module, "_timer", lambda device: lambda fn: (fn(), next(times))[1])
    x, weight, _ = operands(3, c=4, o=4)
    assert module._measure(x, weight, None, 1, transposed) == (chosen, fprop, dgrad)


def test_tuning_on_the_cpu_records_real_times():
    x, weight, bias = operands(5, c=8, o=8, h=16, w=16, dtype=torch.float32)
    result = tune_same_conv2d(x, weight, bias, 1)
    rows = same_conv2d_choices()
    assert [r["direction"] for r in rows] == ["forward", "input_grad"]
    for row, direction in zip(rows, ("forward", "input_grad")):
        assert row["via"] == result[direction]
        assert row["fprop_ms"] > 0 and row["dgrad_ms"] > 0
        assert row["via"] == expected_via(row)
    assert rows[0]["bias"] and not rows[1]["bias"]
    assert rows[1]["input"] == [2, 8, 16, 16] and rows[0]["weight"] == [8, 8, 5, 5]


@pytest.mark.parametrize("args,match", [
    (dict(weight=torch.zeros(4, 3, 4, 4)), "weight must have shape"),
    (dict(weight=torch.zeros(4, 2, 3, 3)), "weight must have shape"),
    (dict(weight=torch.zeros(4, 3, 3, 5)), "weight must have shape"),
    (dict(bias=torch.zeros(3)), "bias must have shape"),
    (dict(dilation=0), "dilation must be"),
    (dict(dilation=True), "dilation must be"),
    (dict(dilation=1.0), "dilation must be"),
    (dict(via="winograd"), "via must be one of"),
])
def test_errors_name_the_argument(args, match):
    call = dict(x=torch.zeros(1, 3, 8, 8), weight=torch.zeros(4, 3, 3, 3), bias=None, dilation=1, via="auto")
    call.update(args)
    with pytest.raises(ValueError, match=match):
        same_conv2d(**call)
    with pytest.raises(ValueError, match="x must"):
        same_conv2d(torch.zeros(3, 8, 8), torch.zeros(4, 3, 3, 3))


def test_compiled_dgrad_matches_eager():
    x, weight, bias = operands(3, c=4, o=4, h=8, w=8)
    fn = torch.compile(lambda *a: same_conv2d(*a, 4, via="dgrad"), backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y.sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y_ref = same_conv2d_ref(*ref_leaves, 4)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def small_model():
    torch.manual_seed(0)
    return LGCN(width=8, local_layers=(5, 3)).double()


def test_model_blocks_take_the_family_set(monkeypatch):
    model = small_model()
    assert model.conv_via == "auto"
    assert all(m.conv_via == "auto" for m in model.modules() if isinstance(m, ConvBlock))
    images = torch.rand(2, 1, 24, 24, dtype=torch.float64) * 255
    outputs = {}
    transposed = []
    real = F.conv_transpose2d
    monkeypatch.setattr(module.F, "conv_transpose2d", lambda *a, **k: transposed.append(1) or real(*a, **k))
    for via in ("fprop", "dgrad"):
        model.use_conv_via(via)
        torch.manual_seed(1)  # the same dropout masks
        local, omega = model.train()(images)
        omega.sum().backward()
        outputs[via] = (local, omega, [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
        if via == "fprop":
            assert not transposed
    blocks = [m for m in model.modules() if isinstance(m, ConvBlock)]
    # every block's forward; every block's input gradient but the first's (the image needs none)
    assert len(transposed) == 2 * len(blocks) - 1
    for got, want in zip(outputs["dgrad"][:2], outputs["fprop"][:2]):
        torch.testing.assert_close(got, want)
    for got, want in zip(outputs["dgrad"][2], outputs["fprop"][2]):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="via must be one of"):
        model.use_conv_via("fft")


def test_folded_copy_keeps_the_family():
    model = small_model().use_conv_via("dgrad").eval()
    folded = model.folded()
    assert folded.conv_via == "dgrad"
    assert all(m.conv_via == "dgrad" for m in folded.modules() if isinstance(m, FoldedConvBlock))
    images = torch.rand(2, 1, 20, 20, dtype=torch.float64) * 255
    with torch.no_grad():
        torch.testing.assert_close(folded(images)[1], model(images)[1])
        torch.testing.assert_close(folded(images)[1], model.use_conv_via("fprop")(images)[1])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("k,dilation,c", [(5, 1, 128), (3, 1, 128), (3, 4, 128), (3, 4, 136), (5, 1, 1)])
def test_gpu_auto_measures_and_matches_the_reference(k, dilation, c):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, c, 96, 96, device="cuda", generator=g, dtype=torch.bfloat16)
    # channels_last strides for the 1-channel image too, as LGCN.forward gives it (.contiguous leaves it planar)
    x = channels_last_strided(x).requires_grad_(c > 1)
    weight = (torch.randn(128, c, k, k, device="cuda", generator=g) / (c * k * k) ** 0.5).requires_grad_()
    y = same_conv2d(x, weight.to(torch.bfloat16), None, dilation)
    rows = same_conv2d_choices()
    assert len(rows) == (2 if c > 1 else 1)
    for row in rows:
        assert row["via"] == expected_via(row) and row["device"].startswith("cuda")
    expected = same_conv2d_ref(x.detach().float(), weight.detach().float(), None, dilation)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    assert y.is_contiguous(memory_format=torch.channels_last)
    if c > 1:
        y.float().square().sum().backward()
        x_ref = x.detach().float().requires_grad_()
        same_conv2d_ref(x_ref, weight.detach().float(), None, dilation).square().sum().backward()
        torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=0.05 * x_ref.grad.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("c,k", [(1, 5), (4, 3), (4, 1)])
@pytest.mark.parametrize("x_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("w_format", [torch.channels_last, torch.contiguous_format])
def test_dgrad_keeps_the_layouts_of_f_conv2d(c, k, x_format, w_format):
    """A layout change would send every later layer down another path (on the CPU, 2-3x slower)."""
    x = torch.randn(2, c, 6, 7).contiguous(memory_format=x_format).requires_grad_()
    weight = torch.randn(5, c, k, k).contiguous(memory_format=w_format)
    outputs = [same_conv2d(x, weight, None, 1, via=via) for via in ("fprop", "dgrad")]
    assert outputs[0].stride() == outputs[1].stride()
    grad = torch.randn(outputs[0].shape).contiguous(memory_format=x_format)
    grads = [torch.autograd.grad(y, x, grad)[0] for y in outputs]
    for fmt in (torch.channels_last, torch.contiguous_format):
        assert grads[0].is_contiguous(memory_format=fmt) == grads[1].is_contiguous(memory_format=fmt)


def test_auto_keeps_a_calls_families_except_while_compiling_or_capturing(monkeypatch):
    x, weight, _ = operands(3)
    monkeypatch.setattr(module, "_transient", lambda: True)
    same_conv2d(x, weight)
    assert not module._pairs  # what compilation or capture takes is not kept for the calls after it
    monkeypatch.setattr(module, "_transient", lambda: False)
    same_conv2d(x, weight)
    assert list(module._pairs.values()) == [NATIVE]
    monkeypatch.setattr(module, "_measure", fake_measure({"forward": "dgrad", "input_grad": "fprop"}))
    tune_same_conv2d(x, weight)  # a new record: the kept families are found again
    assert not module._pairs
    # x needs no gradient: the forward's recorded family, the input gradient's native one
    assert same_conv2d(x, weight).grad_fn is None and list(module._pairs.values()) == [("dgrad", "dgrad")]
