"""conv_stack on lgc_fast's Triton pieces (TritonGraphs, lgc_fast/ops/conv_stack_triton.py): each piece against the
torch pieces (its oracle), the filter-gradient kernel alone (split K, partial tiles, channels past a block), the whole
stack against conv_stack_ref (values, every gradient, running statistics) with the masks conv_stack_ref draws,
gradcheck, the fresh masks, and the reasons it refuses.

On CPU-only machines the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): small shapes. The
interpreter rounds float32 -> bfloat16 toward zero, so bfloat16 is checked against the torch pieces' own error.
"""
import pytest
import torch
import torch.nn.functional as F

import lgc_fast
from conftest import devices, skip_without_float64, triton_backends
from lgc_fast.kernels.fused_conv import TensorDescriptor
from lgc_fast.ops.bn_relu_dropout import pack_keep_mask, unpack_keep_bits
from lgc_fast.ops.conv_stack import conv_stack, conv_stack_ref, stack_graphs
from lgc_fast.ops.conv_stack_graphs import BnTerms, KeepSpec, TorchGraphs, apply_prologue, stack_keep_mask
from lgc_fast.ops.conv_stack_triton import TritonGraphs, triton_unusable

pytestmark = [pytest.mark.usefixtures("one_thread_per_module", "full_float32"),
              pytest.mark.skipif(TensorDescriptor is None, reason="this Triton has no host tensor descriptors "
                                                                  "(Triton 3.4 or later)")]

CL = torch.channels_last
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _triton_devices(dtype=None):
    return [d for d in devices() if triton_backends(d, dtype) or d == "cuda"]


def _triton_device():
    """The device the stack tests run on: CUDA where there is one, else the CPU's interpreter; skips where neither."""
    found = _triton_devices()
    if not found:
        pytest.skip(f"the triton backend does not run here: {lgc_fast.backends()['triton'][1]}")
    return found[-1]


def _skip_float64(device, dtype):
    if dtype == torch.float64:
        skip_without_float64(device, "triton")


def _map(shape, dtype, device, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.to(dtype).contiguous(memory_format=CL).to(device)


def _terms(c, seed, device, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean, invstd = torch.randn(c, generator=g, dtype=torch.float64) * 0.2, torch.rand(c, generator=g,
                                                                                      dtype=torch.float64) + 0.5
    gamma, beta = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g,
                                                                                    dtype=torch.float64) * 0.3
    return BnTerms(*(t.to(device, dtype) for t in (mean, invstd, gamma, gamma * invstd, beta - mean * gamma * invstd)))


def _pieces_inputs(dtype, device, c_in=24, c_out=16, h=10, w=9, n=2, r=3):
    """A block's input map with its BatchNorm terms and keep mask, the filter, and the next block's (g, z, eq)."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    x = _map((n, c_in, h, w), dtype, device, 1)
    weight = (_map((c_out, c_in, r, r), torch.float64, device, 2) / (r * c_in**0.5)).to(dtype).contiguous()
    keep = torch.rand(n, c_in, h, w, generator=torch.Generator().manual_seed(3)) >= 0.3
    terms = _terms(c_in, 4, device, ct)
    g, z = _map((n, c_out, h, w), dtype, device, 5), _map((n, c_out, h, w), dtype, device, 6)
    eq = [v.to(device, ct) for v in torch.randn(3, c_out, generator=torch.Generator().manual_seed(8),
                                                dtype=torch.float64)]
    return x, weight, keep.to(device), terms, (g, z, *eq)


def _close(got, want, dtype):
    torch.testing.assert_close(got.to(want.dtype), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", _triton_devices())
def test_pieces_match_the_torch_pieces(device, dtype):
    _skip_float64(device, dtype)
    x, weight, keep, terms, dy = _pieces_inputs(dtype, device)
    torch_pieces, triton_pieces = TorchGraphs(), TritonGraphs(dtype, "seeded")
    bits = pack_keep_mask(keep, memory_format=CL)
    for prologue_t, prologue_k in ((None, None), ((terms, keep.to(x.dtype)), (terms, bits))):
        for a, b in zip(triton_pieces.fprop(x, weight, 2, prologue_k), torch_pieces.fprop(x, weight, 2, prologue_t)):
            _close(a, b, dtype)
        for grad in (dy, dy[0]):  # with BatchNorm backward's apply, and a plain gradient
            _close(triton_pieces.wgrad(x, weight.shape, grad, 2, prologue_k),
                   torch_pieces.wgrad(x, weight.shape, grad, 2, prologue_t), dtype)
    # the stored operands: the activation as fprop writes it, dz as dgrad writes it (with and without an epilogue)
    made = triton_pieces.new_map(x)
    triton_pieces.fprop(x, weight, 2, (terms, bits), made_out=made)
    assert made.is_contiguous(memory_format=CL)
    _close(made, apply_prologue(x, terms, keep.to(x.dtype)), dtype)
    g, z, eq_dy, eq_x, eq_b = dy
    dz_want = (g * eq_dy[:, None, None] + z * eq_x[:, None, None] + eq_b[:, None, None]).to(dtype)
    for epilogue in (None, (x, terms, bits, True)):
        dz = triton_pieces.new_map(dy[0])
        triton_pieces.dgrad(dy, weight, x.shape, 2, epilogue, made_out=dz)
        _close(dz, dz_want, dtype)
    for grad in (dy, dy[0]):
        _close(triton_pieces.dgrad(grad, weight, x.shape, 2), torch_pieces.dgrad(grad, weight, x.shape, 2), dtype)
        for batch_stats in (True, False):
            got = triton_pieces.dgrad(grad, weight, x.shape, 2, (x, terms, bits, batch_stats))
            want = torch_pieces.dgrad(grad, weight, x.shape, 2, (x, terms, keep.to(x.dtype), batch_stats))
            assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=CL)
            for a, b in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):
                _close(a, b, dtype)


@pytest.mark.parametrize("splits", [1, 3, 50])
@pytest.mark.parametrize("r, dilation", [(3, 4), (5, 1), (1, 1)])
@pytest.mark.parametrize("device", _triton_devices())
def test_filter_gradient_kernel(device, r, dilation, splits):
    """Split K adds up to the whole sum (3 shares of 4 tiles; 50 asked for, as many as there are tiles);
    Cin = 40 ends inside a 32-channel block; 11 x 7 pixels end inside tiles."""
    from lgc_fast.kernels import fused_conv as kernels
    from lgc_fast.kernels.fused_conv_wgrad import fused_conv_wgrad_triton

    x, weight, keep, terms, (g, z, *eq) = _pieces_inputs(torch.float32, device, c_in=40, c_out=24, h=11, w=7, r=r)
    a = torch.relu(x * terms.s[:, None, None] + terms.b[:, None, None]) * keep
    dz = g * eq[0][:, None, None] + z * eq[1][:, None, None] + eq[2][:, None, None]
    pad = dilation * (r // 2)
    bits = pack_keep_mask(keep, memory_format=CL)
    cases = [(kernels.BnPrologue(terms.s, terms.b, bits), kernels.DbnPrologue(z, *eq), a, dz),
             (None, None, x, g)]
    for prologue, dbn, a_want, dz_want in cases:
        want = torch.nn.grad.conv2d_weight(a_want, weight.shape, dz_want, padding=pad, dilation=dilation)
        got = fused_conv_wgrad_triton(x, g, r, dilation, prologue=prologue, dbn=dbn, splits=splits)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("r, dilation", [(3, 2), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stack_matches_the_plain_definition(dtype, r, dilation, training, dropout_p):
    device = _triton_device()
    _skip_float64(device, dtype)
    channels = [8, 16, 8, 16]
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(co, ci, r, r, generator=g, dtype=torch.float64) / (r * ci**0.5)).to(device, dtype)
               for ci, co in zip(channels[:-1], channels[1:])]
    gammas = [(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device) for c in channels[1:]]
    betas = [(torch.randn(c, generator=g, dtype=torch.float64) * 0.3).to(device) for c in channels[1:]]
    x = _map((2, channels[0], 9, 8), dtype, device, 1)
    grad_out = _map((2, channels[-1], 9, 8), dtype, device, 2)
    kwargs = dict(training=training, dropout_p=dropout_p, dilation=dilation, dropout_seed=11, momentum=0.2)
    results = []
    for fn, graphs in ((conv_stack, TritonGraphs(dtype, "seeded")), (conv_stack_ref, None)):
        leaves = [t.detach().clone().requires_grad_() for t in [x, *weights, *gammas, *betas]]
        running = ([torch.zeros(c, dtype=dtype, device=device) for c in channels[1:]],
                   [torch.ones(c, dtype=dtype, device=device) for c in channels[1:]])
        extra = {} if graphs is None else dict(graphs=graphs)
        out = fn(leaves[0], leaves[1:4], leaves[4:7], leaves[7:], *running, **kwargs, **extra)
        results.append((out, torch.autograd.grad(out, leaves, grad_out), running[0] + running[1]))
    (out, grads, running), (out_ref, grads_ref, running_ref) = results
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, out_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(running, running_ref):
        torch.testing.assert_close(got, want, **tol)


def test_stored_operands_reach_the_filter_gradient_and_change_nothing():
    """TritonGraphs' default stores the activations and dz: every filter gradient but the first block's reads plain
    operands (the first has no dgrad to write its dz when x needs no gradient: it makes dz itself); the
    gradients are those of operands="remade" (the prologues made again in the filter gradient)."""
    device = _triton_device()
    _skip_float64(device, torch.float64)
    channels = [8, 16, 8, 16]
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci**0.5)).to(device)
               for ci, co in zip(channels[:-1], channels[1:])]
    gammas = [(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device) for c in channels[1:]]
    betas = [(torch.randn(c, generator=g, dtype=torch.float64) * 0.3).to(device) for c in channels[1:]]
    x = _map((2, channels[0], 9, 8), torch.float64, device, 1)

    class Recording(TritonGraphs):
        def wgrad(self, inp, w_shape, dy, dilation, prologue=None):
            self.wgrad_operands.append((prologue is None, isinstance(dy, torch.Tensor)))
            return super().wgrad(inp, w_shape, dy, dilation, prologue)

    grads = {}
    for operands in ("stored", "remade"):
        pieces = Recording(torch.float64, "seeded", operands)
        pieces.wgrad_operands = []
        leaves = [t.detach().clone().requires_grad_() for t in [*weights, *gammas, *betas]]
        out = conv_stack(x, leaves[:3], leaves[3:6], leaves[6:], dilation=2, dropout_p=0.3, dropout_seed=4,
                         graphs=pieces)
        grads[operands] = torch.autograd.grad(out.square().sum(), leaves)
        # blocks top-down: (plain a, plain dz)
        want = [(True, True), (True, True), (True, False)] if operands == "stored" else \
            [(False, True), (False, False), (True, False)]
        assert pieces.wgrad_operands == want
    for got, want in zip(grads["stored"], grads["remade"]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stack_in_16_bits_is_as_close_as_the_torch_pieces(dtype):
    """Against the float64 definition: within 3x the error of the plain definition (conv_stack_ref) computed in the
    same 16-bit dtype (the interpreter's bfloat16 also rounds toward zero)."""
    device = _triton_device()
    channels = [8, 16, 16]
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64) / (3 * ci**0.5)
               for ci, co in zip(channels[:-1], channels[1:])]
    gammas = [torch.rand(c, generator=g, dtype=torch.float64) + 0.5 for c in channels[1:]]
    betas = [torch.randn(c, generator=g, dtype=torch.float64) * 0.3 for c in channels[1:]]
    x = torch.randn(2, channels[0], 10, 9, generator=g, dtype=torch.float64)
    grad_out = torch.randn(2, channels[-1], 10, 9, generator=g, dtype=torch.float64)

    def run(map_dtype, graphs=None):
        leaves = [t.to(device, map_dtype).requires_grad_() for t in [x, *weights, *gammas, *betas]]
        leaves[0] = leaves[0].detach().contiguous(memory_format=CL).requires_grad_()
        fn, extra = (conv_stack_ref, {}) if graphs is None else (conv_stack, dict(graphs=graphs))
        out = fn(leaves[0], leaves[1:3], leaves[3:5], leaves[5:], dilation=2, dropout_seed=3, **extra)
        grads = torch.autograd.grad(out, leaves, grad_out.to(device, out.dtype))
        return [t.double().cpu() for t in (out, *grads)]

    exact = run(torch.float64)
    plain_err = [(a - b).abs().max() for a, b in zip(run(dtype), exact)]
    triton_err = [(a - b).abs().max() for a, b in zip(run(dtype, TritonGraphs(dtype, "seeded")), exact)]
    for name, got, bound in zip(["out", "x", "w0", "w1", "gamma0", "gamma1", "beta0", "beta1"], triton_err,
                                plain_err):
        assert got <= 3 * bound + 1e-3, f"{name}: {got} vs the plain definition's {bound}"


def test_gradcheck():
    device = _triton_device()
    _skip_float64(device, torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 8, 4, 5, generator=g, dtype=torch.float64).contiguous(memory_format=CL).to(device)
    weights = [torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64).to(device) / 8 for _ in range(2)]
    gammas = [torch.rand(8, generator=g, dtype=torch.float64).to(device) + 0.5 for _ in range(2)]
    betas = [torch.randn(8, generator=g, dtype=torch.float64).to(device) * 0.3 for _ in range(2)]
    x.requires_grad_()
    gammas[0].requires_grad_()
    betas[0].requires_grad_()

    def fn(x, gamma0, beta0):
        return conv_stack(x, weights, [gamma0, gammas[1]], [beta0, betas[1]], dropout_p=0.3, dropout_seed=9,
                          graphs=TritonGraphs(torch.float64, "seeded"))
    assert torch.autograd.gradcheck(fn, (x, gammas[0], betas[0]), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", _triton_devices())
def test_fresh_masks_are_keep_bits_from_torchs_generator(device):
    pieces = TritonGraphs(torch.float32)
    like = _map((4, 16, 12, 10), torch.float32, device, 0)
    torch.manual_seed(5)
    bits = pieces.keep_mask(KeepSpec(1, 0, 0.25), like)
    torch.manual_seed(5)
    assert torch.equal(bits, pieces.keep_mask(KeepSpec(2, 0, 0.25), like))  # the generator's, not the spec's
    assert bits.dtype == torch.uint8 and bits.shape == ((like.numel() + 7) // 8,)
    kept = unpack_keep_bits(bits, like.shape, memory_format=CL).float().mean().item()
    assert abs(kept - 0.75) < 0.03
    seeded = TritonGraphs(torch.float32, "seeded").keep_mask(KeepSpec(1, 0, 0.25), like)
    want = stack_keep_mask(1, 0, like.shape, 0.25, like.device)
    assert torch.equal(unpack_keep_bits(seeded, like.shape, memory_format=CL), want.bool())
    assert pieces.fresh_top_mask and not TritonGraphs(torch.float32, "seeded").fresh_top_mask


def test_stack_with_fresh_masks_drops_and_trains():
    """graphs="triton" draws its own masks: every output is finite, some are dropped, and the gradients flow."""
    device = _triton_device()
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(16, 8 if i == 0 else 16, 3, 3, generator=g) / 12).to(device).requires_grad_()
               for i in range(2)]
    gammas = [torch.ones(16, device=device, requires_grad=True) for _ in range(2)]
    betas = [torch.full((16,), 0.5, device=device, requires_grad=True) for _ in range(2)]
    x = _map((2, 8, 9, 8), torch.float32, device, 1)
    out = conv_stack(x, weights, gammas, betas, dropout_p=0.5, dilation=2, graphs="triton")
    assert torch.isfinite(out).all() and 0.3 < (out == 0).float().mean().item() < 0.8
    out.square().sum().backward()
    for t in (*weights, *gammas, *betas):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("graphs, dropout_p", [("torch", 0.1), ("triton", 0.0), ("seeded", 0.1)])
def test_stack_under_torch_compile(graphs, dropout_p):
    """torch.compile runs a function around conv_stack: the torch pieces traced; the Triton pieces as one registered
    op, a node of one graph (fullgraph: no graph break) with their own masks, or with the seeded masks (the top one
    drawn from a generator of the seed's, which ends a graph). The output, every gradient and the running statistics
    are the eager run's (the torch pieces' masks come from torch's generator, seeded alike before both; with the
    Triton pieces' own masks only the order of the draws might differ, so those run without dropout)."""
    device = _triton_device()
    g = torch.Generator().manual_seed(2)
    weights = [(torch.randn(8, 8, 3, 3, generator=g) / 9).to(device) for _ in range(3)]
    gammas = [(torch.rand(8, generator=g) + 0.5).to(device) for _ in range(3)]
    betas = [(torch.randn(8, generator=g) * 0.3).to(device) for _ in range(3)]
    x = _map((2, 8, 8, 8), torch.float32, device, 3)
    pieces = TritonGraphs(torch.float32, "seeded") if graphs == "seeded" else graphs
    seed = {"seeded": 7}.get(graphs)

    def stack(leaves, running):
        out = conv_stack(leaves[0], leaves[1:4], leaves[4:7], leaves[7:], *running, dilation=2, dropout_p=dropout_p,
                         graphs=pieces, dropout_seed=seed)
        return out.square().sum()

    results = []
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (stack, torch.compile(stack, fullgraph=graphs == "triton")):
            leaves = [t.clone().requires_grad_() for t in (x, *weights, *gammas, *betas)]
            running = ([torch.zeros(8, device=device) for _ in range(3)],
                       [torch.ones(8, device=device) for _ in range(3)])
            torch.manual_seed(5)
            loss = fn(leaves, running)
            results.append([loss, *torch.autograd.grad(loss, leaves), *running[0], *running[1]])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training, running, dtype", [(True, True, torch.float32), (True, False, torch.float32),
                                                     (False, True, torch.float64)])
def test_opcheck(training, running, dtype, monkeypatch):
    """The registered ops lgc_fast::conv_stack_triton and its backward (schema, fake tensors, autograd, AOT dispatch),
    on the seeded masks so that two runs agree; float64 eval with the plain-torch finalize, whose mean is then the
    running mean itself: the op returns a copy (an op's outputs may not alias its inputs)."""
    device = _triton_device()
    _skip_float64(device, dtype)
    if dtype == torch.float64:
        monkeypatch.setenv("LGC_FAST_BACKEND", "ref")
    g = torch.Generator().manual_seed(6)
    x = _map((1, 8, 5, 4), dtype, device, 0).requires_grad_()
    weights = [(torch.randn(8, 8, 3, 3, generator=g, dtype=torch.float64) / 9).to(device, dtype).requires_grad_()
               for _ in range(3)]
    gammas = [(torch.rand(8, generator=g, dtype=torch.float64) + 0.5).to(device, dtype).requires_grad_()
              for _ in range(2)]
    betas = [torch.randn(8, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for _ in range(2)]
    means = [torch.zeros(8, device=device, dtype=dtype) for _ in range(2)] if running else []
    variances = [torch.ones(8, device=device, dtype=dtype) for _ in range(2)] if running else []
    needs = [True] * 8
    args = (x, weights, gammas, betas, means, variances, dtype, "seeded", "stored", 2, training, 0.2, 0.1, 0.1,
            1e-5, 3, needs)
    torch.library.opcheck(torch.ops.lgc_fast.conv_stack_triton.default, args)
    outs = torch.ops.lgc_fast.conv_stack_triton(*args)
    state = [t.detach() for t in outs[1:len(outs) - (4 if training and running else 0)]]
    grad_z = _map((1, 8, 5, 4), dtype, device, 1)
    torch.library.opcheck(torch.ops.lgc_fast.conv_stack_triton_backward.default,
                          (grad_z, x.detach(), [w.detach() for w in weights], [t.detach() for t in gammas],
                           [t.detach() for t in betas], state, dtype, "seeded", "stored", 2, training, 0.2, 0.1,
                           running, needs))


def test_reasons_and_refusal():
    x = torch.randn(2, 12, 6, 6, dtype=torch.bfloat16)
    weights = [torch.randn(20, 12, 3, 3, dtype=torch.bfloat16)]
    reasons = triton_unusable(x, weights)
    if triton_backends("cpu"):
        assert reasons == ["x's channels = 12 is not a multiple of 8 (torch.bfloat16 rows of 16-byte multiples)",
                           "weights[0]'s Cout = 20 is not a multiple of 8 (torch.bfloat16 rows of 16-byte multiples)"]
    else:
        assert reasons == [lgc_fast.backends()["triton"][1]]
    with pytest.raises(ValueError, match="graphs='triton' is not usable here: .*x's channels = 12"
                                         if triton_backends("cpu") else "graphs='triton' is not usable here"):
        stack_graphs(x, weights, 1, 0.1, True, "triton")
    with pytest.raises(ValueError, match="masks must be one of fresh, seeded"):
        TritonGraphs(torch.float32, "bytes")
    with pytest.raises(ValueError, match="operands must be one of stored, remade"):
        TritonGraphs(torch.float32, operands="kept")
    if triton_backends("cpu"):
        assert triton_unusable(torch.randn(1, 4, 4, 4), [torch.randn(8, 4, 3, 3)]) == []  # float32: rows of 4
    assert isinstance(stack_graphs(x, weights, 1, 0.1, True, TorchGraphs()), TorchGraphs)


def test_kernel_input_gradient_is_conv_transpose():
    """The input gradient as the fused kernel computes it (rotated filter, no prologue) against F.conv_transpose2d."""
    from lgc_fast.kernels import fused_conv as kernels

    device = _triton_device()
    dy = _map((2, 16, 7, 10), torch.float32, device, 3)
    weight = _map((16, 24, 5, 5), torch.float32, device, 4).contiguous() / 20
    out = torch.empty(2, 24, 7, 10, device=device).contiguous(memory_format=CL)
    kernels.fused_conv_triton(dy, kernels.pack_filter(weight, transposed=True), 5, 2, out)
    torch.testing.assert_close(out, F.conv_transpose2d(dy, weight, padding=4, dilation=2), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="prologue_out needs a prologue"):
        kernels.fused_conv_triton(dy, kernels.pack_filter(weight, transposed=True), 5, 2, out,
                                  prologue_out=torch.empty_like(dy))


def test_model_runs_like_blocks_as_triton_stacks(monkeypatch):
    """LGCN.use_conv_stacks(graphs="triton") / run_blocks: runs of like ConvBlocks go through conv_stack on the Triton
    pieces, a 1-channel first block (rows of 8 bytes in float64) runs as its module; outputs, gradients and running
    statistics as the modules give them (no dropout: the Triton pieces draw masks of their own)."""
    import copy
    import sys

    from lgc_fast.model import LGCN, ConvBlock, run_blocks

    device = _triton_device()
    _skip_float64(device, torch.float64)
    module = sys.modules["lgc_fast.ops.conv_stack"]
    asked = []
    real = module.stack_graphs
    monkeypatch.setattr(module, "stack_graphs", lambda x, weights, *args: asked.append((len(weights), args[3]))
                        or real(x, weights, *args))
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(ConvBlock(1, 8, 3, dropout=0.0), ConvBlock(8, 8, 3, dropout=0.0),
                                 ConvBlock(8, 8, 3, dropout=0.0)).double().to(device)
    for block in blocks:
        torch.nn.init.uniform_(block.bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(block.bn.bias, std=0.3)
    twin = copy.deepcopy(blocks)
    x = torch.randn(2, 1, 9, 8, dtype=torch.float64, device=device, requires_grad=True)
    out = run_blocks(blocks, x, conv_stacks=True, graphs="triton")
    want = twin(x)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), [x, *blocks.parameters()])
    for got, expected in zip(grads, torch.autograd.grad(want.sum(), [x, *twin.parameters()])):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(blocks.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(got, expected)
    assert asked == [(2, "triton")]  # the two 8-channel blocks, without the 1-channel first one
    model = LGCN(width=8, local_layers=(3, 3)).use_conv_stacks(graphs="triton")
    assert model.stack_graphs == "triton"
    with pytest.raises(ValueError, match="graphs must be 'cudnn' or 'triton'"):
        model.use_conv_stacks(graphs="torch")


def test_compiled_training_loss_with_triton_stacks_is_one_graph(monkeypatch):
    """The training step's forward and loss (lgc_fast.train.forward_loss) on a model whose blocks run as Triton
    stacks: torch.compile traces it as one graph, without a break (the stacks are registered ops)."""
    import sys

    from lgc_fast.model import LGCN
    from lgc_fast.train import forward_loss

    device = _triton_device()
    module = sys.modules["lgc_fast.ops.conv_stack"]
    stacks, real = [], module._run_triton_stack
    monkeypatch.setattr(module, "_run_triton_stack", lambda config, pieces, x, weights, *rest: stacks.append(
        len(weights)) or real(config, pieces, x, weights, *rest))
    torch.manual_seed(0)
    model = LGCN(width=8, local_layers=(3, 3)).to(device, memory_format=CL).train()
    model.fuse_epilogues(True).use_conv_stacks(graphs="triton")
    images = (torch.rand(2, 1, 16, 16) * 255).to(device).contiguous(memory_format=CL)
    points = torch.rand(2, 68, 2, device=device) * 8 + 4
    labelled = torch.ones(2, 68, dtype=torch.bool, device=device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward_loss)(model, images, points, labelled, False)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert sum(stacks) >= 7, stacks  # the global subnet's seven blocks at least ran as Triton stacks
