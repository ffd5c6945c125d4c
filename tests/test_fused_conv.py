"""fused_conv: the reference against the pieces it fuses, the Triton kernel against the reference (values, the
statistics, partial tiles, Cin past the last chunk, 1x1 / 3x3 dilated / 5x5 filters), gradients, op registration,
backend choice and errors.

Triton runs in the interpreter on CPU-only machines (conftest sets TRITON_INTERPRET=1), so shapes stay small. The
interpreter rounds float32 -> bfloat16 stores toward zero (CUDA rounds to nearest), so bfloat16 z may differ from the
reference's by a unit in the last place; the statistics are then checked against the kernel's own z.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends, devices, skip_without_float64, triton_backends
from lgc_fast.ops.bn_relu_dropout import pack_keep_mask
from lgc_fast.ops.conv_stack_graphs import BnTerms, TorchGraphs
from lgc_fast.kernels import fused_conv as kernels
from lgc_fast.kernels.fused_conv import TensorDescriptor
from lgc_fast.ops.fused_conv import fused_conv, fused_conv_ref, triton_unusable

# tiny shapes: threads only add barrier waits
pytestmark = pytest.mark.usefixtures("one_thread_per_module", "full_float32")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (filter size, dilation, Cin, Cout, H, W): H, W not multiples of the 8x8 tile; Cin = 24 ends inside a 32-wide chunk
SHAPES = [(3, 4, 16, 32, 10, 9), (5, 1, 24, 16, 9, 8), (1, 1, 8, 16, 8, 8)]


def _backends(device="cpu", dtype=None) -> list[str]:
    """This op's backends that run here: triton needs host tensor descriptors (Triton 3.4 on; torch 2.4 has 3.0)."""
    names = [b for b in available_backends(device, dtype) if b in ("triton", "ref")]
    return [b for b in names if b != "triton" or TensorDescriptor is not None]


def _inputs(k, c_in, c_out, h, w, dtype, device, seed, n=2, p=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / (k * c_in**0.5)
    scale = torch.rand(c_in, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c_in, generator=g, dtype=torch.float64) * 0.5
    keep = torch.rand(n, c_in, h, w, generator=g) >= p
    x = x.to(dtype).contiguous(memory_format=torch.channels_last).to(device)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    bits = pack_keep_mask(keep, memory_format=torch.channels_last).to(device)
    return x, weight.to(device=device, dtype=dtype), scale.to(device, ct), shift.to(device, ct), keep.to(device), bits


def test_reference_is_conv_of_the_activation_and_its_sums():
    x, weight, scale, shift, keep, bits = _inputs(3, 6, 5, 7, 6, torch.float64, "cpu", 1)
    a = torch.relu(x * scale[:, None, None] + shift[:, None, None]) * keep
    expected = F.conv2d(a, weight, padding=4, dilation=4)
    z, total, sq_total = fused_conv_ref(x, weight, scale, shift, bits, dilation=4)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, expected.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sq_total, (expected**2).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert z.is_contiguous(memory_format=torch.channels_last)
    plain = fused_conv_ref(x, weight, dilation=4)[0]
    torch.testing.assert_close(plain, F.conv2d(x, weight, padding=4, dilation=4), rtol=1e-12, atol=1e-12)


def test_reference_matches_conv_stack_forward_piece():
    """The fused forward piece conv_stack's torch graphs compute, with the prologue's BatchNorm terms."""
    x, weight, scale, shift, keep, bits = _inputs(3, 8, 4, 6, 6, torch.float64, "cpu", 2)
    terms = BnTerms(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64),
                    torch.ones(8, dtype=torch.float64), scale, shift)
    z, total, sq_total = TorchGraphs().fprop(x, weight, 1, (terms, keep.double()))
    got = fused_conv_ref(x, weight, scale, shift, bits)
    for a, b in zip(got, (z, total, sq_total)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _check_against_reference(got, expected, dtype):
    z, total, sq_total = got
    z_ref = expected[0]
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(z, z_ref, **tol)
    else:
        # the rounding of the activation and of z: a unit of the last place or two, of the map's size near zero
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        torch.testing.assert_close(z.float(), z_ref.float(), rtol=2 * ulp, atol=2 * ulp * z_ref.abs().max().item())
    # The sums are those of the kernel's own z, as stored (z's own rounding, and the order in which the GEMM added
    # its products, is the check above), added a tile at a time in the compute type.
    zd = z.double()
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(total.double(), zd.sum((0, 2, 3)), **tol)
    torch.testing.assert_close(sq_total.double(), (zd * zd).sum((0, 2, 3)), **tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["3x3d4", "5x5", "1x1"])
@pytest.mark.parametrize("prologue", ["none", "bn_relu", "bn_relu_dropout"])
def test_triton_matches_reference(device, dtype, shape, prologue):
    if not triton_backends(device):
        pytest.skip("the triton backend is not usable here")
    skip_without_float64(device, "triton")
    k, dil, c_in, c_out, h, w = shape
    x, weight, scale, shift, _, bits = _inputs(k, c_in, c_out, h, w, dtype, device, 3)
    why = triton_unusable(x, weight)
    if why:
        pytest.skip("; ".join(why))
    args = {"none": (None, None, None), "bn_relu": (scale, shift, None), "bn_relu_dropout": (scale, shift, bits)}
    got = fused_conv(x, weight, *args[prologue], dilation=dil, backend="triton")
    _check_against_reference(got, fused_conv_ref(x, weight, *args[prologue], dilation=dil), dtype)


@pytest.mark.parametrize("device", devices())
def test_triton_reads_any_layout_and_gives_channels_last(device):
    if "triton" not in _backends(device):
        pytest.skip("the triton backend, with tensor descriptors, is not usable here")
    x, weight, scale, shift, _, bits = _inputs(3, 8, 8, 8, 8, torch.float32, device, 4)
    planar = x.contiguous()
    got = fused_conv(planar, weight, scale, shift, bits, backend="triton")
    _check_against_reference(got, fused_conv_ref(x, weight, scale, shift, bits), torch.float32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c_in", [16, 8], ids=["a-word-a-row", "a-word-a-value"])
def test_triton_reads_keep_bits_of_part_words_at_any_offset(device, dtype, c_in):
    """The kernels read keep bits as 64-bit words: 30 bytes (not whole words), once at an odd address."""
    if "triton" not in _backends(device):
        pytest.skip("the triton backend, with tensor descriptors, is not usable here")
    skip_without_float64(device, "triton")
    x, weight, scale, shift, _, bits = _inputs(3, c_in, 8, 3, 80 // c_in, dtype, device, 5, n=1)
    assert bits.numel() % 8 != 0
    odd = torch.zeros(bits.numel() + 1, dtype=torch.uint8, device=device)[1:]
    odd.copy_(bits)
    assert odd.data_ptr() % 2 == 1
    expected = fused_conv_ref(x, weight, scale, shift, bits)
    for keep_bits in (bits, odd):
        _check_against_reference(fused_conv(x, weight, scale, shift, keep_bits, backend="triton"), expected, dtype)


def test_word_keep_bits_pads_only_what_is_not_whole_aligned_words():
    whole = torch.arange(16, dtype=torch.uint8)
    assert kernels.word_keep_bits(whole) is whole
    part = kernels.word_keep_bits(whole[:13])
    assert part.numel() == 16 and part.data_ptr() % 8 == 0
    assert part[:13].tolist() == list(range(13)) and part[13:].tolist() == [0, 0, 0]
    shifted = kernels.word_keep_bits(whole[1:9])
    assert shifted.data_ptr() != whole.data_ptr() + 1 and shifted.tolist() == list(range(1, 9))
    assert kernels.word_keep_bits(None) is None


def test_prologue_zero_pads_the_activation_not_x():
    """relu(0 * s + b) > 0 where b > 0: the padding must still read 0."""
    x = torch.zeros(1, 8, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.ones(8, 8, 3, 3, dtype=torch.float64)
    scale, shift = torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    for backend in _backends("cpu", torch.float64):
        z = fused_conv(x, weight, scale, shift, backend=backend)[0]
        assert z[0, 0, 0, 0].item() == 8 * 4  # the corner sees 2x2 pixels of a = 1 in each of 8 channels
        assert z[0, 0, 1, 1].item() == 8 * 9


@pytest.mark.parametrize("prologue", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", devices())
def test_triton_gradients_match_reference(device, shape, prologue):
    """The Triton backward (conv_stack's gradient kernels) against the reference's, for z's and both sums'
    gradients at once, in float32."""
    if "triton" not in _backends(device):
        pytest.skip("no triton backend here")
    k, dil, c_in, c_out, h, w = shape
    x, weight, scale, shift, _, bits = _inputs(k, c_in, c_out, h, w, torch.float32, device, 11)
    args = (scale, shift, bits) if prologue else ()
    cotangents = [torch.randn(shape_, generator=torch.Generator().manual_seed(i)).to(device) * scale_
                  for i, (shape_, scale_) in enumerate((((2, c_out, h, w), 1.0), ((c_out,), 1.0), ((c_out,), 0.01)))]
    grads = []
    for backend in ("triton", "ref"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, *args[:2])]
        outputs = fused_conv(*leaves, *args[2:], dilation=dil, backend=backend)
        grads.append(torch.autograd.grad(outputs, leaves, cotangents))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", devices())
def test_triton_filter_gradient_alone_makes_dz_itself(device):
    """Only the filter asks for a gradient: no input gradient runs to write z's total gradient, so the filter
    gradient makes it in its own prologue (from z and the sums' gradients)."""
    if "triton" not in _backends(device):
        pytest.skip("no triton backend here")
    x, weight, scale, shift, _, bits = _inputs(3, 16, 32, 10, 9, torch.float32, device, 12)
    cotangents = [torch.randn(shape_, generator=torch.Generator().manual_seed(i)).to(device)
                  for i, shape_ in enumerate(((2, 32, 10, 9), (32,), (32,)))]
    grads = []
    for backend in ("triton", "ref"):
        w = weight.detach().clone().requires_grad_()
        grads.append(torch.autograd.grad(fused_conv(x, w, scale, shift, bits, dilation=4, backend=backend), w,
                                         cotangents)[0])
    torch.testing.assert_close(*grads, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_gradcheck(backend):
    """Float64, small; gradcheck's fast mode (one random direction per input) for the interpreted kernel."""
    if backend not in _backends("cpu", torch.float64):
        pytest.skip(f"{backend} cannot run float64 on the CPU here (or has no tensor descriptors)")
    x, weight, scale, shift, _, bits = _inputs(3, 4, 2, 5, 4, torch.float64, "cpu", 5, n=1)
    for t in (x, weight, scale, shift):
        t.requires_grad_()

    def outputs(*inputs):
        z, total, sq_total = fused_conv(*inputs, bits, dilation=2, backend=backend)
        return z, total, sq_total * 0.01  # all three outputs, so the sums' gradients through z are checked too

    fast = backend == "triton"
    assert torch.autograd.gradcheck(outputs, (x, weight, scale, shift), eps=1e-6, atol=1e-7, fast_mode=fast)
    plain = lambda x_, w_: fused_conv(x_, w_, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(plain, (x, weight), eps=1e-6, atol=1e-7, fast_mode=fast)


def test_opcheck():
    for backend in _backends("cpu", torch.float64):
        x, weight, scale, shift, _, bits = _inputs(3, 8, 8, 5, 6, torch.float32, "cpu", 6, n=1)
        x.requires_grad_()
        weight.requires_grad_()
        scale.requires_grad_()
        torch.library.opcheck(torch.ops.lgc_fast.fused_conv.default, (x, weight, scale, shift, bits, 1, backend))
        torch.library.opcheck(torch.ops.lgc_fast.fused_conv.default, (x, weight, None, None, None, 2, backend))
        if backend == "triton":  # its backward is an op of its own
            z = fused_conv(x, weight, scale, shift, bits, backend=backend)[0].detach()
            sums = torch.randn(2, 8)
            torch.library.opcheck(torch.ops.lgc_fast.fused_conv_backward.default,
                                  (torch.randn_like(z), sums[0], sums[1], x.detach(), weight.detach(),
                                   scale.detach(), shift, bits, z, 1, True, True, True))


def test_compiles_fullgraph():
    x, weight, scale, shift, _, bits = _inputs(3, 8, 8, 6, 6, torch.float32, "cpu", 7, n=1)
    compiled = torch.compile(lambda *a: fused_conv(*a, backend="ref"), fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, weight, scale, shift, bits), fused_conv_ref(x, weight, scale, shift, bits)):
        torch.testing.assert_close(got, want)


def test_empty_batch():
    x, weight, scale, shift, _, bits = _inputs(3, 8, 8, 6, 6, torch.float32, "cpu", 8, n=0)
    z, total, sq_total = fused_conv(x, weight, scale, shift, bits)
    assert z.shape == (0, 8, 6, 6) and total.abs().sum() == 0 and sq_total.abs().sum() == 0


def test_automatic_choice_falls_back_where_the_descriptors_cannot_load(monkeypatch):
    """Cin = 3 bfloat16 rows are 6 bytes: not a TMA row. Asked for by name, triton refuses with the reason."""
    x, weight, scale, shift, _, _ = _inputs(3, 3, 8, 6, 6, torch.bfloat16, "cpu", 9)
    if TensorDescriptor is not None:
        assert any("Cin = 3" in why for why in triton_unusable(x, weight))
    if "triton" in _backends("cpu"):
        with pytest.raises(ValueError, match="Cin = 3 is not a multiple of 8"):
            fused_conv(x, weight, scale, shift, backend="triton")
    monkeypatch.delenv("LGC_FAST_BACKEND", raising=False)
    z = fused_conv(x, weight, scale, shift)[0]
    torch.testing.assert_close(z, fused_conv_ref(x, weight, scale, shift)[0])


@pytest.mark.parametrize("case, error, match", [
    ("even_filter", ValueError, r"weight must be \(Cout, Cin=8, r, r\) with r odd"),
    ("weight_dtype", TypeError, "weight must have x's dtype"),
    ("scale_alone", ValueError, "scale and shift must be given together"),
    ("scale_shape", ValueError, r"scale must be a floating-point \(8,\) tensor"),
    ("bits_size", ValueError, r"keep_bits must be uint8 of shape \(72,\)"),
    ("bits_without_prologue", ValueError, "keep_bits needs the prologue"),
    ("dilation", ValueError, "dilation must be an int >= 1"),
    ("x_dims", ValueError, "x must be a 4-dimensional tensor"),
])
def test_errors_name_the_argument(case, error, match):
    x, weight, scale, shift, _, bits = _inputs(3, 8, 8, 6, 6, torch.float32, "cpu", 10, n=2)
    args, kwargs = [x, weight, scale, shift, bits], {}
    if case == "even_filter":
        args[1] = torch.zeros(8, 8, 2, 2)
    elif case == "weight_dtype":
        args[1] = weight.double()
    elif case == "scale_alone":
        args[3] = None
    elif case == "scale_shape":
        args[2] = scale[:4]
    elif case == "bits_size":
        args[4] = bits[:-1]
    elif case == "bits_without_prologue":
        args[2] = args[3] = None
    elif case == "dilation":
        kwargs["dilation"] = 0
    elif case == "x_dims":
        args[0] = x[0]
    with pytest.raises(error, match=match):
        fused_conv(*args, **kwargs)
