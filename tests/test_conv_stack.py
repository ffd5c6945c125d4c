"""conv_stack: the fused graphs' decomposition of a conv-block stack (lgc_fast/ops/conv_stack.py) against the plain
definition conv_stack_ref and the model's own ConvBlocks: outputs, every gradient, running statistics; gradcheck."""
import copy
import sys

import pytest
import torch

from lgc_fast.model import LGCN, ConvBlock, run_blocks
from lgc_fast.ops.conv_stack import conv_stack, conv_stack_ref
from lgc_fast.ops.conv_stack_graphs import stack_keep_mask

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _stack(channels, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c_out, c_in, r, r, generator=g, dtype=torch.float64) / (r * c_in**0.5)
               for c_in, c_out in zip(channels[:-1], channels[1:])]
    gammas = [torch.rand(c, generator=g, dtype=torch.float64) + 0.5 for c in channels[1:]]
    betas = [torch.randn(c, generator=g, dtype=torch.float64) * 0.3 for c in channels[1:]]
    running_means = [torch.randn(c, generator=g, dtype=torch.float64) * 0.1 for c in channels[1:]]
    running_vars = [torch.rand(c, generator=g, dtype=torch.float64) + 0.5 for c in channels[1:]]
    return [[t.to(dtype) for t in group] for group in (weights, gammas, betas, running_means, running_vars)]


def _run(fn, x, params, **kwargs):
    """fn's output and gradients (x, weights, gammas, betas) for a fixed random output gradient, on copies."""
    weights, gammas, betas, means, variances = params
    leaves = [t.detach().clone().requires_grad_() for t in [x, *weights, *gammas, *betas]]
    n = len(weights)
    means, variances = [t.clone() for t in means], [t.clone() for t in variances]
    out = fn(leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], leaves[1 + 2 * n:], means, variances, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads, means + variances


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("r, dilation", [(3, 2), (5, 1)])
def test_matches_the_plain_definition_float64(training, dropout_p, r, dilation):
    params = _stack([3, 4, 5, 4], r, torch.float64)
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = dict(training=training, dropout_p=dropout_p, dilation=dilation, dropout_seed=11, momentum=0.2)
    out, grads, running = _run(conv_stack, x, params, **kwargs)
    out_ref, grads_ref, running_ref = _run(conv_stack_ref, x, params, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    for got, want, before in zip(running, running_ref, params[3] + params[4]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        assert torch.equal(got, before) != training  # updated in training only


def test_without_running_statistics_uses_the_batch_in_eval_too():
    weights, gammas, betas, _, _ = _stack([2, 3, 3], 3, torch.float64)
    x = torch.randn(2, 2, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = conv_stack(x, weights, gammas, betas, training=False, dropout_p=0.1)
    torch.testing.assert_close(out, conv_stack_ref(x, weights, gammas, betas, training=True, dropout_p=0.0))


def test_is_the_models_conv_blocks():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(ConvBlock(3, 4, 3, dilation=4, dropout=0.0), ConvBlock(4, 4, 3, dilation=4,
                                                                                          dropout=0.0)).double()
    for block in blocks:
        torch.nn.init.uniform_(block.bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(block.bn.bias, std=0.3)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    means = [b.bn.running_mean.clone() for b in blocks]
    variances = [b.bn.running_var.clone() for b in blocks]
    out = conv_stack(x, [b.conv.weight for b in blocks], [b.bn.weight for b in blocks],
                     [b.bn.bias for b in blocks], means, variances, dropout_p=0.0, dilation=4)
    torch.testing.assert_close(out, blocks(x))
    for block, mean, var in zip(blocks, means, variances):
        torch.testing.assert_close(mean, block.bn.running_mean)
        torch.testing.assert_close(var, block.bn.running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    params = _stack([3, 4, 4], 3, torch.float32)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    kwargs = dict(dropout_p=0.3, dropout_seed=5, dilation=2)
    out, grads, _ = _run(conv_stack, x, params, **kwargs)
    out_ref, grads_ref, _ = _run(conv_stack_ref, x.double(), [[t.double() for t in g] for g in params], **kwargs)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(out.double(), out_ref, **tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=tol["rtol"] * 5, atol=tol["atol"] * 20)


def test_gradcheck():
    weights, gammas, betas, means, variances = _stack([2, 3, 2], 3, torch.float64)
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in [x, *weights, *gammas, *betas]]

    def fn(*ts):  # batch statistics, dropout from a fixed seed; running statistics on copies (updated each call)
        return conv_stack(ts[0], list(ts[1:3]), list(ts[3:5]), list(ts[5:7]), [m.clone() for m in means],
                          [v.clone() for v in variances], dropout_p=0.3, dropout_seed=3, dilation=1)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_keep_masks():
    shape = (4, 8, 16, 16)
    first = stack_keep_mask(9, 0, shape, 0.1, "cpu")
    assert set(first.unique().tolist()) <= {0.0, 1.0} and abs(first.mean().item() - 0.9) < 0.02
    assert torch.equal(first, stack_keep_mask(9, 0, shape, 0.1, "cpu"))  # drawn again, the same
    assert not torch.equal(first, stack_keep_mask(9, first.numel(), shape, 0.1, "cpu"))  # another block's offset
    assert not torch.equal(first, stack_keep_mask(10, 0, shape, 0.1, "cpu"))  # another step's seed


def test_seed_from_torchs_generator():
    weights, gammas, betas, _, _ = _stack([2, 3], 3, torch.float64)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    torch.manual_seed(3)
    first = conv_stack(x, weights, gammas, betas, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(first, conv_stack(x, weights, gammas, betas, dropout_p=0.5))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(weights=[]), "weights must be a non-empty list"),
    (lambda a: a.update(weights=[a["weights"][0], a["weights"][0]]), r"weights\[1\] must be \(C_out, 3, 3, 3\)"),
    (lambda a: a.update(gammas=a["gammas"][:1]), "gammas must be a list of 2"),
    (lambda a: a.update(betas=[a["betas"][0], a["betas"][0][:2]]), r"betas\[1\] must have shape \(3,\)"),
    (lambda a: a.update(running_vars=None), "given together"),
    (lambda a: a.update(dropout_p=1.0), "dropout_p must be in"),
    (lambda a: a.update(dilation=0), "dilation must be an int"),
    (lambda a: a.update(dropout_seed=1.5), "dropout_seed must be an int"),
    (lambda a: a.update(cudnn_plans=0), r"cudnn_plans must be an int in \[1, 16\], got 0"),
    (lambda a: a.update(cudnn_plans=17), "cudnn_plans must be an int"),
    (lambda a: a.update(cudnn_plans=True), "cudnn_plans must be an int"),
])
def test_errors_name_the_argument(change, match):
    weights, gammas, betas, means, variances = _stack([2, 3, 3], 3, torch.float64)
    args = dict(x=torch.zeros(1, 2, 5, 5, dtype=torch.float64), weights=weights, gammas=gammas, betas=betas,
                running_means=means, running_vars=variances, dropout_seed=1)
    change(args)
    with pytest.raises(ValueError, match=match):
        conv_stack(**args)


def test_reference_needs_a_seed_for_dropout():
    """conv_stack_ref draws its masks from the seed alone: in training with dropout, no seed is an error (conv_stack
    draws one), never a stack without dropout."""
    weights, gammas, betas, _, _ = _stack([2, 3, 3], 3, torch.float64)
    x = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="conv_stack_ref: dropout_seed must be an int in training with dropout"):
        conv_stack_ref(x, weights, gammas, betas, dropout_p=0.1)
    conv_stack_ref(x, weights, gammas, betas, dropout_p=0.1, training=False)
    conv_stack_ref(x, weights, gammas, betas, dropout_p=0.0)


def test_model_passes_cudnn_plans_to_its_stacks(monkeypatch):
    """LGCN.use_conv_stacks(cudnn_plans=n): every stack of the training step asks for n plans (checked first)."""
    module = sys.modules["lgc_fast.ops.conv_stack"]
    asked = []
    monkeypatch.setattr(module, "cudnn_unusable", lambda x, weights, *args: asked.append(args[-1]) or ["no cuDNN"])
    model = LGCN(width=4, local_layers=(3, 3)).use_conv_stacks(cudnn_plans=3).train()
    assert model.conv_stacks and model.cudnn_plans == 3
    model(torch.rand(1, 1, 20, 20) * 255)
    assert asked and set(asked) == {3}
    with pytest.raises(ValueError, match="cudnn_plans must be an int"):
        model.use_conv_stacks(cudnn_plans=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_model_runs_like_blocks_as_one_stack(monkeypatch, momentum):
    """LGCN.use_conv_stacks: runs of like ConvBlocks go through conv_stack (here on torch pieces, where a GPU would
    have cuDNN's), a run whose graphs cannot build (a 1-channel first layer here) sheds that block to its module;
    outputs, gradients, running statistics and batch counts as the modules give them."""
    from lgc_fast.ops.conv_stack_graphs import TorchGraphs

    module = sys.modules["lgc_fast.ops.conv_stack"]
    stacks = []
    monkeypatch.setattr(module, "cudnn_unusable",
                        lambda x, weights, *args: ["one channel"] if weights[0].shape[1] == 1 else [])
    monkeypatch.setattr(module, "stack_graphs", lambda x, weights, *args: stacks.append(len(weights)) or TorchGraphs())
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(ConvBlock(1, 4, 5, dropout=0.0), ConvBlock(4, 4, 5, dropout=0.0),
                                 ConvBlock(4, 4, 5, dropout=0.0), ConvBlock(4, 4, 3, dropout=0.0),
                                 ConvBlock(4, 4, 3, dropout=0.0)).double()
    for block in blocks:
        block.bn.momentum = momentum
        torch.nn.init.uniform_(block.bn.weight, 0.5, 1.5)
        torch.nn.init.normal_(block.bn.bias, std=0.3)
    twin = copy.deepcopy(blocks)
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # the second step sees the first one's running statistics and counts
        out = run_blocks(blocks, x, conv_stacks=True)
        want = twin(x)
        torch.testing.assert_close(out, want)
        grads = torch.autograd.grad(out.sum(), [x, *blocks.parameters()])
        want_grads = torch.autograd.grad(want.sum(), [x, *twin.parameters()])
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected)
    assert stacks == [2, 2, 2, 2]  # per step: the 5x5 run without its first block, the 3x3 run
    for got, expected in zip(blocks.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(got, expected)
