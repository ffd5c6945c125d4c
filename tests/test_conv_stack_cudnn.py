"""conv_stack's cuDNN pieces (CudnnGraphs, lgc_fast/ops/conv_stack_graphs.py) without a GPU, through a stand-in for
lgc_fast._C's cudnn_conv_graph / cudnn_conv_graph_check. The stand-in checks that every call binds exactly the tensors
the library's C++ graph has (names, value counts, dtypes, channels_last; listed by tests/cpp/cudnn_conv_graph_roles.cpp
from build_conv_graph against cuDNN's headers) and that every graph run was checked first, then computes the graph's
outputs in torch from the bound tensors alone, by what the graph means (its RNG mask drawn as stack_keep_mask from the
bound seed and offset). The stack through it must equal conv_stack_ref. Needs cuDNN's headers and library, as the
probe's tests (tests/test_bench_cudnn_fusion.py); skips without them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lgc_fast.ops.conv_stack import conv_stack, conv_stack_ref, stack_graphs
from lgc_fast.ops.conv_stack_graphs import CudnnGraphs, stack_keep_mask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_cudnn_fusion as probe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
IO = torch.float64  # the stand-in's io dtype (the real graphs take bfloat16 / float16)
STORAGE = {"io16": IO, "f32": torch.float32, "i64": torch.int64, "u8": torch.uint8}


@pytest.fixture(scope="module")
def roles_program(tmp_path_factory):
    try:
        include, lib = probe.cudnn_paths(None)
        probe.cuda_root()
    except probe.ProbeError as exc:
        pytest.skip(str(exc))
    if lib is None:
        pytest.skip(f"cuDNN's library (libcudnn.so.9) is not beside {include.parent}")
    out = tmp_path_factory.mktemp("roles") / "roles"
    return probe.build_probe(include, lib, out, compile_only=False,
                             source=ROOT / "tests" / "cpp" / "cudnn_conv_graph_roles.cpp")


class StandIn:
    with_cudnn_graphs = True

    def __init__(self, program):
        self.program, self.checked, self.ran, self._roles, self.plans = program, set(), [], {}, set()

    def roles(self, key):
        if key not in self._roles:
            conv, sbr, mask, stats, dbn, dbn_apply, shape, keep = key
            line = " ".join(map(str, [conv, int(sbr), mask, int(stats), int(dbn), int(dbn_apply), *shape, keep]))
            out = subprocess.run([str(self.program)], input=line + "\n", capture_output=True, text=True,
                                 check=True).stdout.strip()
            assert not out.startswith("error"), out
            self._roles[key] = {name: (int(count), storage, output == "1")
                                for name, count, storage, output in (r.split(":") for r in out.split())}
        return self._roles[key]

    def cudnn_conv_graph_check(self, conv, sbr, mask, stats, dbn, dbn_apply, shape, keep, io, device, plans):
        assert io in ("bfloat16", "float16") and device == 0
        key = (conv, sbr, mask, stats, dbn, dbn_apply, tuple(shape), keep)
        self.roles(key)
        self.checked.add(key)
        self.plans.add(plans)
        return ""

    def cudnn_conv_graph_plans(self, conv, sbr, mask, stats, dbn, dbn_apply, shape, keep, io, device, plans):
        """As the executor reports them: plan i timed at i + 1 ms where more than one was asked for, the first
        chosen."""
        assert (conv, sbr, mask, stats, dbn, dbn_apply, tuple(shape), keep) in self.checked
        return [(f"plan{i}", float(i + 1) if plans > 1 else -1.0, i == 0) for i in range(plans)]

    def cudnn_conv_graph(self, conv, sbr, mask, stats, dbn, dbn_apply, shape, keep, tensors, plans):
        key = (conv, sbr, mask, stats, dbn, dbn_apply, tuple(shape), keep)
        assert key in self.checked, f"{key} ran without a check first"
        self.plans.add(plans)
        roles = self.roles(key)
        assert set(tensors) == set(roles), (conv, sorted(tensors), sorted(roles))
        for name, t in tensors.items():
            count, storage, _ = roles[name]
            assert t.numel() == count and t.dtype == STORAGE[storage], (name, t.shape, t.dtype, storage)
            assert t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous(), name
        self.ran.append(key)
        _compute(conv, sbr, mask, dbn, dbn_apply, shape, keep, tensors)


def _ch(v):
    return v.double()[:, None, None]


def _compute(conv, sbr, mask, dbn, dbn_apply, shape, keep, t):
    """The graph's outputs from its bound tensors, in float64, written into the output tensors."""
    n, c, k, h, w, r, dil = shape
    pad = dil * (r // 2)

    def rng_mask(like):
        if mask == "byte":
            return t["m"].double()
        return stack_keep_mask(int(t["seed"]), int(t["offset"]), like.shape, 1 - keep, "cpu", torch.float64)

    if dbn_apply:
        dy = t["dy_g"].double() * _ch(t["dy_eq_dy"]) + t["dy_z"].double() * _ch(t["dy_eq_x"]) + _ch(t["dy_eq_b"])
    elif "dy" in t:
        dy = t["dy"].double()
    if conv in ("fprop", "wgrad"):
        a = t["x"].double()
        if sbr:
            a = torch.relu(a * _ch(t["s"]) + _ch(t["b"]))
            if mask != "none":
                a = a * rng_mask(a)
        if conv == "fprop":
            y = F.conv2d(a, t["w"].double(), padding=pad, dilation=dil)
            t["y"].copy_(y)
            t["sum"].copy_(y.sum((0, 2, 3)))
            t["sq_sum"].copy_((y * y).sum((0, 2, 3)))
        else:
            t["w"].copy_(torch.nn.grad.conv2d_weight(a, t["w"].shape, dy, padding=pad, dilation=dil))
        return
    da = torch.nn.grad.conv2d_input((n, c, h, w), t["w"].double(), dy, padding=pad, dilation=dil)
    if not dbn:
        t["dx"].copy_(da)
        return
    if mask != "none":
        da = da * rng_mask(da)
    z = t["z"].double()
    g = torch.where(z * _ch(t["s"]) + _ch(t["b"]) > 0, da, torch.zeros((), dtype=da.dtype))
    mean, invstd, gamma = t["mean"].double(), t["invstd"].double(), t["gamma"].double()
    dgamma = (g * (z - mean[:, None, None]) * invstd[:, None, None]).sum((0, 2, 3))
    dbeta = g.sum((0, 2, 3))
    m = n * h * w  # cuDNN's BN backward weights: batch statistics
    t["g"].copy_(g)
    t["dgamma"].copy_(dgamma)
    t["dbeta"].copy_(dbeta)
    t["eq_dy"].copy_(gamma * invstd)
    t["eq_x"].copy_(-gamma * invstd * invstd * dgamma / m)
    t["eq_b"].copy_(-gamma * invstd * dbeta / m + gamma * invstd * invstd * mean * dgamma / m)


def _params(channels, r):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(co, ci, r, r, generator=g, dtype=torch.float64) / (r * ci**0.5)
               for ci, co in zip(channels[:-1], channels[1:])]
    gammas = [torch.rand(c, generator=g, dtype=torch.float64) + 0.5 for c in channels[1:]]
    betas = [torch.randn(c, generator=g, dtype=torch.float64) * 0.3 for c in channels[1:]]
    return weights, gammas, betas


def _grads(fn, x, weights, gammas, betas, running, **kwargs):
    leaves = [t.clone().requires_grad_() for t in [x, *weights, *gammas, *betas]]
    n = len(weights)
    means, variances = [m.clone() for m in running[0]], [v.clone() for v in running[1]]
    out = fn(leaves[0], leaves[1:1 + n], leaves[1 + n:1 + 2 * n], leaves[1 + 2 * n:], means, variances, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    return [out, *torch.autograd.grad(out, leaves, grad_out), *means, *variances]


@pytest.mark.parametrize("training, dropout_p, plans, masks", [
    (True, 0.3, 1, "rng"), (True, 0.0, 1, "rng"), (False, 0.3, 3, "rng"), (True, 0.3, 2, "byte")])
def test_cudnn_pieces_compose_to_the_plain_definition(roles_program, monkeypatch, training, dropout_p, plans, masks):
    """The stack through the stand-in equals conv_stack_ref (byte masks are drawn as the reference draws its masks;
    the RNG's are, by the stand-in, from the bound seed and offset); the graphs that ran are exactly the expected
    ones, with the plans asked for, and the plan report names them."""
    stand_in = StandIn(roles_program)
    pieces = CudnnGraphs(stand_in, torch.device("cpu"), torch.bfloat16, plans, masks)
    pieces.io = IO  # float64 maps, which the stand-in computes exactly; the checks still name bfloat16
    pieces.fresh_top_mask = False  # the top block's mask as conv_stack_ref draws it
    channels, r, dil = [3, 4, 5, 4], 3, 2
    weights, gammas, betas = _params(channels, r)
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    running = ([torch.zeros(c, dtype=torch.float64) for c in channels[1:]],
               [torch.ones(c, dtype=torch.float64) for c in channels[1:]])
    kwargs = dict(training=training, dropout_p=dropout_p, dilation=dil, dropout_seed=7)
    assert not pieces.unbuildable(tuple(x.shape), [tuple(w.shape) for w in weights], dil, dropout_p, training, True)
    # lgc_fast.ops.conv_stack the module (the package's attribute of that name is the function)
    monkeypatch.setattr(sys.modules["lgc_fast.ops.conv_stack"], "stack_graphs", lambda *args: pieces)
    got = _grads(conv_stack, x, weights, gammas, betas, running, **kwargs)
    want = _grads(conv_stack_ref, x, weights, gammas, betas, running, **kwargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    kinds = {(key[0], key[1], key[2], key[4], key[5]) for key in stand_in.ran}
    mask = masks if training and dropout_p > 0 else "none"
    expected = {("fprop", False, "none", False, False), ("fprop", True, mask, False, False)}
    # block 1, block 2, and the top block, whose dy is the top epilogue's plain gradient
    expected |= {("wgrad", False, "none", False, True), ("wgrad", True, mask, False, True),
                 ("wgrad", True, mask, False, False), ("dgrad", False, "none", False, True),
                 ("dgrad", False, mask, True, True), ("dgrad", False, mask, True, False)}
    assert kinds == expected
    assert stand_in.plans == {plans}  # every check and run asked for the same plans
    # the plan report names exactly the graphs that ran, each with the plans built for it
    report = pieces.plan_report(tuple(x.shape), [tuple(w.shape) for w in weights], dil, dropout_p, training, True)
    ran = {pieces_key[:7] for pieces_key in stand_in.ran}
    assert len(report) == len(ran) == len({entry["graph"] for entry in report})
    for entry in report:
        assert [p["name"] for p in entry["plans"]] == [f"plan{i}" for i in range(plans)]
        assert [p["median_ms"] for p in entry["plans"]] == ([None] if plans == 1 else [i + 1.0 for i in range(plans)])
        assert [p["chosen"] for p in entry["plans"]] == [i == 0 for i in range(plans)]


def test_byte_masks_where_the_rng_does_not_build(roles_program, monkeypatch):
    """Where cuDNN does not build the graphs with its RNG op, the stack takes byte masks; without dropout there is no
    mask to choose; where neither builds, the reasons name both."""
    from lgc_fast.ops.conv_stack import cudnn_unusable

    stand_in = StandIn(roles_program)
    real_check = stand_in.cudnn_conv_graph_check
    stand_in.cudnn_conv_graph_check = lambda conv, sbr, mask, *rest: (
        "no RNG in runtime fusion" if mask == "rng" else real_check(conv, sbr, mask, *rest))
    module = sys.modules["lgc_fast.ops.conv_stack"]
    monkeypatch.setattr(module, "_cudnn_unusable", lambda x: [])
    monkeypatch.setattr(module._backend, "extension", lambda: stand_in)
    monkeypatch.setattr(module, "_choices", {})
    weights, _, _ = _params([3, 4, 4], 3)
    x = torch.zeros(2, 3, 9, 8, dtype=torch.bfloat16)
    pieces = stack_graphs(x, weights, 2, 0.3, True)
    assert pieces.name == "cudnn" and pieces.mask == "byte"
    assert stack_graphs(x, weights, 2, 0.0, True).mask == "rng"
    stand_in.cudnn_conv_graph_check = lambda *args: "nothing builds"
    module._choices.clear()
    reasons = cudnn_unusable(x, weights, 2, 0.3, True)
    assert any(r.startswith("with rng masks: fprop") for r in reasons), reasons
    assert any(r.startswith("with byte masks: fprop") for r in reasons), reasons
    assert stack_graphs(x, weights, 2, 0.3, True).name == "torch"


def test_graph_choice_on_the_cpu():
    weights, _, _ = _params([2, 3], 3)
    x = torch.zeros(1, 2, 6, 6)
    assert stack_graphs(x, weights, 1, 0.1, True).name == "torch"
    with pytest.raises(ValueError, match="graphs='cudnn' is not usable here"):
        stack_graphs(x, weights, 1, 0.1, True, "cudnn")
    with pytest.raises(ValueError, match="graphs must be one of"):
        stack_graphs(x, weights, 1, 0.1, True, "fast")
    from lgc_fast.ops.conv_stack import cudnn_plan_report
    with pytest.raises(ValueError, match="no cuDNN graphs here: .*CUDA"):
        cudnn_plan_report(x, weights, 1, 0.1, True)


def _cudnn_graphs_built() -> bool:
    from lgc_fast import _backend
    return torch.cuda.is_available() and bool(getattr(_backend.extension(), "with_cudnn_graphs", False))


gpu_graphs = pytest.mark.skipif(not _cudnn_graphs_built(),
                                reason="needs a CUDA GPU and lgc_fast._C built with the cuDNN conv graphs")


def _skip_unless_graphs_build(x, weights, dilation, dropout_p, training):
    """Skips, with cuDNN's reasons, where this cuDNN builds no engine for the stack's graphs: cuDNN 9.19 on an H100
    (session 27) built none of them, for either kind of mask."""
    from lgc_fast.ops.conv_stack import cudnn_unusable

    why = cudnn_unusable(x, weights, dilation, dropout_p, training)
    if why:
        pytest.skip("cuDNN builds no engine for these graphs here: " + "; ".join(why)[:400])


def _relative(a, b):
    return (torch.linalg.norm((a.float() - b.float()).flatten()) / torch.linalg.norm(b.float().flatten())).item()


def _gpu_stack(channels=(16, 16, 16, 16), r=3):
    weights, gammas, betas = _params(list(channels), r)
    to = dict(device="cuda", dtype=torch.float32)
    x = torch.randn(2, channels[0], 12, 12, generator=torch.Generator().manual_seed(3))
    x = x.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)
    running = ([torch.zeros(c, **to) for c in channels[1:]], [torch.ones(c, **to) for c in channels[1:]])
    return x, [w.to(**to) for w in weights], [g.to(**to) for g in gammas], [b.to(**to) for b in betas], running


@gpu_graphs
@pytest.mark.parametrize("training", [True, False])
def test_cudnn_graphs_match_the_torch_pieces_on_the_gpu(training):
    """Without dropout (the only thing the two draw differently): output, every gradient and the running statistics
    of the cuDNN graphs against the torch pieces on the same bfloat16 maps."""
    x, weights, gammas, betas, running = _gpu_stack()
    _skip_unless_graphs_build(x, weights, 4, 0.0, training)
    kwargs = dict(training=training, dropout_p=0.0, dilation=4)
    got = _grads(lambda *a, **k: conv_stack(*a, graphs="cudnn", **k), x, weights, gammas, betas, running, **kwargs)
    want = _grads(lambda *a, **k: conv_stack(*a, graphs="torch", **k), x, weights, gammas, betas, running, **kwargs)
    for a, b in zip(got, want):
        assert _relative(a, b) < 3e-2


@gpu_graphs
def test_byte_masks_match_the_torch_pieces_on_the_gpu(monkeypatch):
    """With dropout, on byte masks (drawn as the torch pieces draw theirs, so the same masks): output, gradients and
    running statistics of the cuDNN graphs against the torch pieces. Skips where cuDNN builds no byte-mask graph."""
    from lgc_fast import _backend

    x, weights, gammas, betas, running = _gpu_stack()
    pieces = CudnnGraphs(_backend.extension(), x.device, x.dtype, 1, "byte")
    why = pieces.unbuildable(tuple(x.shape), [tuple(w.shape) for w in weights], 4, 0.3, True, True)
    if why:
        pytest.skip("cuDNN builds no byte-mask graph here: " + "; ".join(why))
    pieces.fresh_top_mask = False  # the top block's mask as the torch pieces draw it
    kwargs = dict(training=True, dropout_p=0.3, dilation=4, dropout_seed=11)
    want = _grads(lambda *a, **k: conv_stack(*a, graphs="torch", **k), x, weights, gammas, betas, running, **kwargs)
    monkeypatch.setattr(sys.modules["lgc_fast.ops.conv_stack"], "stack_graphs", lambda *args: pieces)
    got = _grads(conv_stack, x, weights, gammas, betas, running, **kwargs)
    for a, b in zip(got, want):
        assert _relative(a, b) < 3e-2


@gpu_graphs
def test_timed_plans_on_the_gpu():
    """cudnn_plans=3: each graph's plans are timed once when it is built, the fastest runs (the report says which),
    and the stack computes what it computes on the first plan."""
    from lgc_fast.ops.conv_stack import cudnn_plan_report

    x, weights, gammas, betas, running = _gpu_stack()
    _skip_unless_graphs_build(x, weights, 4, 0.0, True)
    kwargs = dict(training=True, dropout_p=0.0, dilation=4)
    for entry in cudnn_plan_report(x, weights, 4, 0.0, True, cudnn_plans=3):
        plans = entry["plans"]
        assert 1 <= len(plans) <= 3 and sum(p["chosen"] for p in plans) == 1, entry
        if len(plans) > 1:
            times = [p["median_ms"] for p in plans]
            assert all(t is not None and t > 0 for t in times), entry
            assert plans[times.index(min(times))]["chosen"], entry
    got = _grads(lambda *a, **k: conv_stack(*a, graphs="cudnn", cudnn_plans=3, **k), x, weights, gammas, betas,
                 running, **kwargs)
    want = _grads(lambda *a, **k: conv_stack(*a, graphs="cudnn", **k), x, weights, gammas, betas, running, **kwargs)
    for a, b in zip(got, want):
        assert _relative(a, b) < 3e-2


@gpu_graphs
def test_cudnn_dropout_is_a_function_of_the_seed_on_the_gpu():
    """The graphs draw every interior mask again from (seed, offset) in the forward and both backward graphs: the same
    seed (and generator state, for the top block's bits) gives the same output and gradients twice (to summation
    order), another seed other ones."""
    x, weights, gammas, betas, running = _gpu_stack()
    _skip_unless_graphs_build(x, weights, 4, 0.3, True)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)  # the top block's keep bits come from torch's generator
        runs.append(_grads(lambda *a, **k: conv_stack(*a, graphs="cudnn", **k), x, weights, gammas, betas, running,
                           dropout_p=0.3, dilation=4, dropout_seed=seed))
    for a, b in zip(runs[0], runs[1]):
        assert _relative(a, b) < 1e-3  # a weight gradient's engine may sum in another order
    assert _relative(runs[2][0], runs[0][0]) > 0.1


@gpu_graphs
def test_model_with_conv_stacks_on_the_gpu():
    """A narrow LGCN without dropout: the loss and every gradient of a training step under bfloat16 autocast with the
    conv stacks on (cuDNN's graphs where they build) no further from float32's than the modules' bfloat16 step is.
    Some gradients are sums that nearly cancel (a BatchNorm bias before the next BatchNorm): on an H100 (session 27)
    the modules' bfloat16 step differed from float32's by up to 0.96 relative there, so each is judged against that
    step's own distance from float32, not by a fixed bound."""
    from lgc_fast.model import LGCN
    from lgc_fast.train import forward_loss

    results = {}
    for stacks, amp in ((False, False), (False, True), (True, True)):
        torch.manual_seed(0)
        model = LGCN(width=16, dropout=0.0).cuda().to(memory_format=torch.channels_last).train()
        model.use_conv_stacks(stacks)
        images = torch.rand(2, 1, 96, 96, device="cuda") * 255
        points = torch.rand(2, 68, 2, device="cuda") * 60 + 18
        labelled = torch.ones(2, 68, dtype=torch.bool, device="cuda")
        loss = forward_loss(model, images, points, labelled, amp=amp)
        names = ["loss"] + [n for n, _ in model.named_parameters()]
        results[stacks, amp] = dict(zip(names, [loss, *torch.autograd.grad(loss, list(model.parameters()))]))
    exact, modules, stacks = results[False, False], results[False, True], results[True, True]
    for name in exact:
        bound = 2 * _relative(modules[name], exact[name]) + 2e-2
        assert _relative(stacks[name], exact[name]) < bound, name
