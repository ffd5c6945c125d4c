"""A stack of the LGCN's conv blocks (paper section 3.2; the release's layers) as one op, computed in the pieces that
cuDNN's fused graphs compute, so that BatchNorm, ReLU and dropout need no passes of their own:

    a_0 = x,  z_i = conv(a_{i-1}, W_i),  a_i = activation_scale * relu(BN_i(z_i)) * keep_i / (1 - p),  returns a_L

Why: the training step's BN / ReLU / dropout passes over each block's activations take about a third of its time on an
H100 (README, performance), and they disappear only inside the convolutions' own loads and stores. The pieces (the
graphs of bench/cudnn_fusion_probe.cpp, which checks and times each on a GPU):

  forward, block i    z_i = conv(prologue_{i-1}(z_{i-1}), W_i) with z_i's per-channel sum and sum of squares as the
                      epilogue (fprop_sbr_rng_stats; block 1: conv(x) + sums, fprop_stats). prologue_j(z) =
                      relu(z * s_j + b_j) * keep_j: block j's BatchNorm, ReLU, scale and dropout, with the scale
                      activation_scale / (1 - p) folded into s_j and b_j (relu is positively homogeneous) and keep_j
                      0 / 1 drawn from (seed, offset_j) again wherever it is needed, never stored (on cuDNN
                      graphs that do not fuse its RNG op: drawn once as a byte map, kept for the backward)
  finalize            per channel: batch mean and variance -> s_i, b_i; the running statistics' update
                      (lgc_fast.ops.bn_finalize: one C++ loop / CUDA launch a block)
  top block           a_L = bn_relu_dropout(z_L), lgc_fast's epilogue op (its own kernels, keep bits), the only
                      activation written; its backward gives dz_L, the top convolution's plain dy
  backward, block i   dW_i = wgrad(prologue_{i-1}(z_{i-1}), dz_i) and da_{i-1} = dgrad(dz_i, W_i), where
                      dz_i = eq_dy_i * g_i + eq_x_i * z_i + eq_b_i is made in both prologues (BatchNorm backward's
                      apply, fused: wgrad_sbr_rng_dbnapply, dgrad_dbnapply_rng_drelu_dbn), and dgrad's epilogue
                      gates da_{i-1} into g_{i-1} and sums BatchNorm's backward terms of block i-1; dgrad runs
                      first, so that pieces which store operands (``stores_operands``: TritonGraphs' default) have
                      it write dz_i, and their forward write a_{i-1}, for a wgrad that reads both plainly
  dgamma_i, dbeta_i   from those sums; dx = dgrad(dz_1, W_1)

The forward keeps x, z_1 .. z_{L-1} and the per-channel terms (bn_relu_dropout keeps z_L and its bits); no a_i (but
where the pieces store operands, for the filter gradients) and no other mask (but the byte masks or keep bits where
the pieces take those). The pieces run as torch functions
(``TorchGraphs``, lgc_fast/ops/conv_stack_graphs.py: the oracle of each cuDNN graph, in float32, float64 for float64
inputs), as cuDNN graphs (``CudnnGraphs``: bfloat16 / float16 maps, masks from cuDNN's RNG, else byte masks) or as
lgc_fast's Triton kernels (``TritonGraphs``, lgc_fast/ops/conv_stack_triton.py: any float dtype, keep bits);
``stack_graphs`` chooses. The composition is checked against ``conv_stack_ref``, the plain definition (F.conv2d,
F.batch_norm, relu, dropout on the same masks): values, gradients and running statistics.
a_L in x's dtype.

x: (N, C_0, H, W); weights[i]: (C_{i+1}, C_i, r, r), one odd r and one dilation for the stack, zero padding
dilation * (r // 2); gammas[i], betas[i], running_means[i], running_vars[i]: (C_{i+1},).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._checks import check_number
from lgc_fast.ops.bn_finalize import bn_finalize
from lgc_fast.ops.bn_relu_dropout import bn_relu_dropout, bn_relu_dropout_drawn
from lgc_fast.ops.conv_stack_graphs import MASK_MODES, CudnnGraphs, KeepSpec, TorchGraphs, keep_tensor
from lgc_fast.ops.conv_stack_triton import TritonGraphs, triton_unusable
from lgc_fast.ops.dilated_block import ACTIVATION_SCALE, DROPOUT_P


# ----------------------------------------------------------------------------------------------------------------
# The plain definition (the test oracle)

def conv_stack_ref(x, weights, gammas, betas, running_means=None, running_vars=None, *, training: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5, dropout_p: float = DROPOUT_P,
                   activation_scale: float = ACTIVATION_SCALE, dilation: int = 1,
                   dropout_seed: Optional[int] = None) -> torch.Tensor:
    """The stack as torch modules compute it, block by block (running statistics updated in place in training)."""
    _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed, training)
    a = x
    for i, w in enumerate(weights):
        z = F.conv2d(a, w.to(a.dtype), padding=dilation * (w.shape[-1] // 2), dilation=dilation)
        rm = None if running_means is None else running_means[i]
        rv = None if running_vars is None else running_vars[i]
        a = torch.relu(F.batch_norm(z, rm, rv, gammas[i].to(z.dtype), betas[i].to(z.dtype), training or rm is None,
                                    momentum, eps)) * activation_scale
        if training and dropout_p > 0:
            a = a * keep_tensor(_keep_spec(dropout_seed, i, a.shape, dropout_p), a) / (1 - dropout_p)
    return a


# ----------------------------------------------------------------------------------------------------------------
# The composition

def _keep_spec(seed, block: int, z_shape, p: float) -> Optional[KeepSpec]:
    """Block `block`'s mask (None without dropout): offsets a block's map size apart (conv_stack_graphs says why)."""
    if seed is None:
        return None
    n, c, h, w = z_shape
    return KeepSpec(int(seed), block * n * c * h * w, p)


def _made_out(t: Optional[torch.Tensor]) -> dict:
    """The made_out argument for pieces that store operands, none for the others (whose fprop / dgrad lack it)."""
    return {} if t is None else {"made_out": t}


class _ConvStack(torch.autograd.Function):
    """The stack up to the top block's convolution, z_L (its BatchNorm, ReLU and dropout are ``bn_relu_dropout``'s,
    after this), from the pieces of `graphs` (module docstring). params: the L weights, then gamma and beta of the
    first L - 1 blocks."""

    @staticmethod
    def forward(ctx, config, graphs, x, *params):
        n_blocks = (len(params) + 2) // 3
        weights, gammas, betas = params[:n_blocks], params[n_blocks:2 * n_blocks - 1], params[2 * n_blocks - 1:]
        ct = graphs.compute_dtype(x.dtype)
        dil, training, p = config["dilation"], config["training"], config["dropout_p"]
        seed = config["dropout_seed"] if training and p > 0 else None
        factor = config["activation_scale"] / (1 - p) if seed is not None else config["activation_scale"]
        inp, zs, terms, keeps, made = x.to(ct), [], [], [], []
        conv_weights = [graphs.conv_weight(w) for w in weights]  # cast once, for the forward and dgrad
        for i in range(n_blocks):
            prologue = None if i == 0 else (terms[-1], keeps[-1])
            # block i's filter gradient reads the activation a_{i-1} as this convolution made it
            stored = prologue is not None and graphs.stores_operands and ctx.needs_input_grad[3 + i]
            made.append(graphs.new_map(inp) if stored else None)
            z, total, sq_total = graphs.fprop(inp, conv_weights[i], dil, prologue, **_made_out(made[-1]))
            zs.append(z)
            inp = z
            if i == n_blocks - 1:
                break
            rm, rv = config["running"][i]
            terms.append(bn_finalize(total, sq_total, z.numel() // z.shape[1], gammas[i], betas[i], rm, rv,
                                     batch_stats=training or rm is None, update_running=training and rm is not None,
                                     momentum=config["momentum"], eps=config["eps"], factor=factor))
            keeps.append(graphs.keep_mask(_keep_spec(seed, i, z.shape, p), z))
        ctx.save_for_backward(x, *conv_weights, *zs[:-1], *made[1:])
        ctx.graphs, ctx.terms, ctx.keeps, ctx.factor = graphs, terms, keeps, factor
        ctx.batch_stats = [training or rm is None for rm, _ in config["running"]]
        ctx.dilation, ctx.n_blocks, ctx.param_dtypes = dil, n_blocks, [t.dtype for t in params]
        return zs[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        n_blocks, graphs, terms, keeps, dil = ctx.n_blocks, ctx.graphs, ctx.terms, ctx.keeps, ctx.dilation
        saved = ctx.saved_tensors
        x, weights = saved[0], saved[1:1 + n_blocks]
        zs, made = saved[1 + n_blocks:2 * n_blocks], (None, *saved[2 * n_blocks:])  # made[i]: a_{i-1} or None
        d_weights, d_gammas, d_betas = [None] * n_blocks, [None] * (n_blocks - 1), [None] * (n_blocks - 1)
        dy, dx = grad_z, None  # the top block's dz, then each block's (g, z, eq) for BatchNorm backward's apply
        for i in range(n_blocks - 1, -1, -1):
            if i == 0:
                inp, prologue = x.to(graphs.compute_dtype(x.dtype)), None
            else:
                inp, prologue = zs[i - 1], (terms[i - 1], keeps[i - 1])
            need_w, runs_dgrad = ctx.needs_input_grad[3 + i], i > 0 or ctx.needs_input_grad[2]
            # dgrad makes dz from BatchNorm backward's terms anyway; pieces that store operands write it for wgrad
            dz = None
            if need_w and runs_dgrad and graphs.stores_operands and not isinstance(dy, torch.Tensor):
                dz = graphs.new_map(dy[0])
            if i > 0:
                g, d_gammas[i - 1], d_betas[i - 1], eq = graphs.dgrad(
                    dy, weights[i], inp.shape, dil, (inp, terms[i - 1], keeps[i - 1], ctx.batch_stats[i - 1]),
                    **_made_out(dz))
            elif runs_dgrad:
                dx = graphs.dgrad(dy, weights[0], x.shape, dil, **_made_out(dz)).to(x.dtype)
            if need_w:
                a, a_prologue = (inp, prologue) if made[i] is None else (made[i], None)
                d_weights[i] = graphs.wgrad(a, weights[i].shape, dy if dz is None else dz, dil, a_prologue)
            if i > 0:
                dy = (g, inp, *eq)
        # gamma_eff = gamma * factor: the chain rule's factor, then each parameter's own dtype
        d_gammas = [None if d is None else d * ctx.factor for d in d_gammas]
        d_betas = [None if d is None else d * ctx.factor for d in d_betas]
        grads = [None if d is None else d.to(dt) for d, dt in zip(d_weights + d_gammas + d_betas, ctx.param_dtypes)]
        return (None, None, dx, *grads)


def _top_epilogue(z, config, gamma, beta, pieces):
    """The top block's BatchNorm, ReLU, scale and dropout on z_L as lgc_fast's ``bn_relu_dropout`` (its fastest
    backend here): with freshly drawn keep bits (``bn_relu_dropout_drawn``) where the pieces allow it (cuDNN's), else
    with the mask of (seed, offset), as conv_stack_ref draws it."""
    rm, rv = config["running"][-1]
    training, p = config["training"], config["dropout_p"]
    common = dict(momentum=config["momentum"], eps=config["eps"], dropout_p=p,
                  activation_scale=config["activation_scale"])
    if training and p > 0 and pieces.fresh_top_mask:
        return bn_relu_dropout_drawn(z, rm, rv, gamma, beta, **common)[0]
    keep = None
    if training and p > 0:
        keep = keep_tensor(_keep_spec(config["dropout_seed"], len(config["running"]) - 1, z.shape, p), z).bool()
    return bn_relu_dropout(z, rm, rv, gamma, beta, keep, training=training or rm is None, **common)


GRAPHS = ("torch", "cudnn", "triton")
MAX_CUDNN_PLANS = 16  # csrc/cuda/cudnn_graph.h kMaxPlans: the heuristics configurations a graph takes at most
_warned: set = set()


def stack_graphs(x: torch.Tensor, weights, dilation: int, dropout_p: float, training: bool,
                 graphs: Optional[str] = None, backward: bool = True, cudnn_plans: int = 1):
    """The pieces conv_stack runs for this stack: "cudnn" where ``cudnn_unusable`` finds no reason against it; else
    "torch". graphs="cudnn" or "triton" insists (a ValueError with the reasons where it cannot: ``cudnn_unusable``,
    ``triton_unusable``); None chooses, warning once a shape with the reasons it keeps torch (it does not choose
    triton: until a GPU run shows those kernels faster than cuDNN's, they are asked for by name). A pieces object
    (TorchGraphs, CudnnGraphs, TritonGraphs) is used as it is. cudnn_plans: as conv_stack's."""
    if isinstance(graphs, (TorchGraphs, CudnnGraphs, TritonGraphs)):
        return graphs
    if graphs not in (None, *GRAPHS):
        raise ValueError(f"graphs must be one of {', '.join(GRAPHS)} or None, not {graphs!r}")
    if graphs == "torch":
        return TorchGraphs()
    if graphs == "triton":
        reasons = triton_unusable(x, weights)
        if reasons:
            raise ValueError("conv_stack: graphs='triton' is not usable here: " + "; ".join(reasons))
        return TritonGraphs(x.dtype)
    cudnn = _cudnn_graphs(x, weights, dilation, dropout_p, training, backward, cudnn_plans)
    if cudnn is not None:
        return cudnn
    reasons = cudnn_unusable(x, weights, dilation, dropout_p, training, backward, cudnn_plans)
    if graphs == "cudnn":
        raise ValueError("conv_stack: graphs='cudnn' is not usable here: " + "; ".join(reasons))
    key = (tuple(x.shape), x.dtype, x.device.type, tuple(tuple(w.shape) for w in weights))
    if x.is_cuda and key not in _warned:
        _warned.add(key)
        warnings.warn("conv_stack: torch pieces, not cuDNN graphs: " + "; ".join(reasons), RuntimeWarning,
                      stacklevel=3)
    return TorchGraphs()


_choices: dict = {}  # _cudnn_choice's answers: a graph that built (or did not) once does again


def cudnn_unusable(x: torch.Tensor, weights, dilation: int, dropout_p: float, training: bool,
                   backward: bool = True, cudnn_plans: int = 1) -> list[str]:
    """Why conv_stack cannot run this stack on cuDNN graphs (none: it can): lgc_fast._C built without them, x not a
    bfloat16 / float16 CUDA tensor, or a graph it needs (the backward's too where `backward`) that cuDNN does not
    build with either kind of keep mask (the RNG's, then bytes). Asked once per shape and cudnn_plans (the graphs
    that build are then built, their plans timed where cudnn_plans > 1, and cached); later calls, one a training
    step, are a lookup."""
    return _cudnn_choice(x, weights, dilation, dropout_p, training, backward, cudnn_plans)[1]


def _cudnn_choice(x, weights, dilation, dropout_p, training, backward, cudnn_plans) -> tuple[Optional[str], list]:
    """(the keep masks the stack's cuDNN graphs take, "rng" or "byte", or None where neither builds; the reasons
    against the others)."""
    key = (x.device, x.dtype, tuple(x.shape), tuple(tuple(w.shape) for w in weights), dilation, dropout_p, training,
           backward, cudnn_plans)
    if key not in _choices:
        reasons, choice = _cudnn_unusable(x), None
        # without dropout the graphs hold no mask: one try
        modes = MASK_MODES if training and dropout_p > 0 else MASK_MODES[:1]
        for mode in modes if not reasons else ():
            cudnn = CudnnGraphs(_backend.extension(), x.device, x.dtype, cudnn_plans, mode)
            why = cudnn.unbuildable(key[2], list(key[3]), dilation, dropout_p, training, backward)
            if not why:
                choice, reasons = mode, []
                break
            reasons += [f"with {mode} masks: {w}" for w in why]
        _choices[key] = (choice, reasons)
    return _choices[key]


def _cudnn_graphs(x, weights, dilation, dropout_p, training, backward, cudnn_plans) -> Optional[CudnnGraphs]:
    mode = _cudnn_choice(x, weights, dilation, dropout_p, training, backward, cudnn_plans)[0]
    return None if mode is None else CudnnGraphs(_backend.extension(), x.device, x.dtype, cudnn_plans, mode)


def cudnn_plan_report(x: torch.Tensor, weights, dilation: int, dropout_p: float, training: bool,
                      backward: bool = True, cudnn_plans: int = 1) -> list[dict]:
    """The plans conv_stack's cuDNN graphs run for this stack (``CudnnGraphs.plan_report``: per graph, the plans
    built, their times where cudnn_plans > 1, and which one runs), for a benchmark's record; a ValueError with
    ``cudnn_unusable``'s reasons where the stack cannot run on cuDNN graphs."""
    check_cudnn_plans(cudnn_plans)
    cudnn = _cudnn_graphs(x, weights, dilation, dropout_p, training, backward, cudnn_plans)
    if cudnn is None:
        raise ValueError("conv_stack: no cuDNN graphs here: " +
                         "; ".join(cudnn_unusable(x, weights, dilation, dropout_p, training, backward, cudnn_plans)))
    return cudnn.plan_report(tuple(x.shape), [tuple(w.shape) for w in weights], dilation, dropout_p, training,
                             backward)


def _cudnn_unusable(x: torch.Tensor) -> list[str]:
    ext = _backend.extension()
    if ext is None or not getattr(ext, "with_cudnn_graphs", False):
        return ["lgc_fast._C was built without the cuDNN conv graphs (a CUDA build finds cuDNN's headers; setup.py)"]
    if not x.is_cuda:
        return ["x is not on a CUDA device"]
    if x.dtype not in (torch.bfloat16, torch.float16):
        return [f"x is {x.dtype}; the graphs take bfloat16 or float16"]
    return []


def conv_stack(x, weights, gammas, betas, running_means=None, running_vars=None, *, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5, dropout_p: float = DROPOUT_P,
               activation_scale: float = ACTIVATION_SCALE, dilation: int = 1,
               dropout_seed: Optional[int] = None, graphs: Optional[str] = None,
               cudnn_plans: int = 1) -> torch.Tensor:
    """The stack's output a_L (N, C_L, H, W), computed from the fused graphs' pieces (module docstring); equal to
    ``conv_stack_ref`` with the same arguments where the pieces are torch's (cuDNN's draw other dropout masks). In
    training with dropout_p > 0, `dropout_seed` (an int) picks the masks; None draws one from torch's (CPU)
    generator. running_means / running_vars (lists, or None for none) are updated in place in training, as
    nn.BatchNorm2d updates its buffers. graphs: "torch", "cudnn", "triton" (lgc_fast's Triton kernels,
    lgc_fast/ops/conv_stack_triton.py: CUDA, or the CPU under TRITON_INTERPRET=1; dropout masks of their own, keep
    bits from torch's generator, as cuDNN's are) or None (``stack_graphs`` chooses). cudnn_plans (1 to 16): how many
    of cuDNN's heuristic plans each graph builds and times, once per shape, the fastest then running; 1 takes the
    first that builds, untimed."""
    if training and dropout_p > 0 and dropout_seed is None:
        dropout_seed = _draw_seed()
    _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed, training)
    check_cudnn_plans(cudnn_plans)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *gammas, *betas))
    pieces = stack_graphs(x, weights, dilation, dropout_p, training, graphs, backward, cudnn_plans)
    n_blocks = len(weights)
    running = [(None if running_means is None else running_means[i], None if running_vars is None else
                running_vars[i]) for i in range(n_blocks)]
    config = {"dilation": int(dilation), "training": bool(training), "dropout_p": float(dropout_p),
              "activation_scale": float(activation_scale), "momentum": float(momentum), "eps": float(eps),
              "dropout_seed": dropout_seed, "running": running}
    run = _run_stack if isinstance(pieces, TorchGraphs) else _run_stack_untraced
    return run(config, pieces, x, weights, gammas, betas)


def _run_stack(config, pieces, x, weights, gammas, betas) -> torch.Tensor:
    z_top = _ConvStack.apply(config, pieces, x, *weights, *gammas[:-1], *betas[:-1])
    return _top_epilogue(z_top, config, gammas[-1], betas[-1], pieces).to(x.dtype)


# torch.compile runs the kernels' pieces as they are, between its graphs: their host code (tensor descriptors and
# autotuners, cuDNN's plans) is not traceable (dynamo failed inside the Triton launcher), and each piece is already a
# whole kernel. The torch pieces stay traceable.
_run_stack_untraced = torch.compiler.disable(_run_stack)


@torch.compiler.disable  # torch.compile calls it as it is (an int from a tensor would end its graph with a warning)
def _draw_seed() -> int:
    """A dropout seed from torch's (CPU) generator."""
    return int(torch.randint(2**62, (1,)))


def check_cudnn_plans(cudnn_plans) -> None:
    if isinstance(cudnn_plans, bool) or not isinstance(cudnn_plans, int) or not 1 <= cudnn_plans <= MAX_CUDNN_PLANS:
        raise ValueError(f"cudnn_plans must be an int in [1, {MAX_CUDNN_PLANS}], got {cudnn_plans!r}")


def _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed, training) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating-point tensor (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(weights, Sequence) or len(weights) == 0:
        raise ValueError("weights must be a non-empty list of (C_out, C_in, r, r) tensors")
    r = weights[0].shape[-1] if weights[0].dim() == 4 else None
    c_in = x.shape[1]
    for i, w in enumerate(weights):
        if w.dim() != 4 or w.shape[1] != c_in or w.shape[2] != r or w.shape[3] != r or r % 2 == 0:
            raise ValueError(f"weights[{i}] must be (C_out, {c_in}, {r}, {r}) with the stack's odd kernel size, got "
                             f"{tuple(w.shape)}")
        c_in = w.shape[0]
    for name, values in (("gammas", gammas), ("betas", betas), ("running_means", running_means),
                         ("running_vars", running_vars)):
        if values is None and name.startswith("running"):
            continue
        if not isinstance(values, Sequence) or len(values) != len(weights):
            raise ValueError(f"{name} must be a list of {len(weights)} tensors, one a block")
        for i, (v, w) in enumerate(zip(values, weights)):
            if v is None or tuple(v.shape) != (w.shape[0],):
                raise ValueError(f"{name}[{i}] must have shape ({w.shape[0]},), got "
                                 f"{None if v is None else tuple(v.shape)}")
    if (running_means is None) != (running_vars is None):
        raise ValueError("running_means and running_vars must be given together or not at all")
    check_number("momentum", momentum, lambda v: 0 <= v <= 1, "in [0, 1]")
    check_number("eps", eps, lambda v: v > 0, "> 0")
    check_number("dropout_p", dropout_p, lambda v: 0 <= v < 1, "in [0, 1)")
    check_number("activation_scale", activation_scale, lambda v: v > 0, "> 0")
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    if training and dropout_p > 0 and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise ValueError(f"dropout_seed must be an int in training with dropout, got {dropout_seed!r}")
