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
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from lgc_fast import _backend
from lgc_fast.ops._checks import check_number
from lgc_fast.ops._library import custom_op
from lgc_fast.ops.bn_finalize import bn_finalize
from lgc_fast.ops.bn_relu_dropout import bn_relu_dropout, bn_relu_dropout_drawn
from lgc_fast.ops.conv_stack_graphs import MASK_MODES, BnTerms, CudnnGraphs, KeepSpec, TorchGraphs, keep_tensor
from lgc_fast.ops.conv_stack_triton import TritonGraphs, triton_unusable
from lgc_fast.ops.dilated_block import ACTIVATION_SCALE, DROPOUT_P


# ----------------------------------------------------------------------------------------------------------------
# The plain definition (the test oracle)

def conv_stack_ref(x, weights, gammas, betas, running_means=None, running_vars=None, *, training: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5, dropout_p: float = DROPOUT_P,
                   activation_scale: float = ACTIVATION_SCALE, dilation: int = 1,
                   dropout_seed: Optional[int] = None) -> torch.Tensor:
    """The stack as torch modules compute it, block by block (running statistics updated in place in training);
    the dropout masks are those of `dropout_seed`, needed in training with dropout."""
    _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed)
    if training and dropout_p > 0 and dropout_seed is None:
        raise ValueError("conv_stack_ref: dropout_seed must be an int in training with dropout")
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


class _StackState(NamedTuple):
    """What a stack's backward reads from its forward: the filters as the pieces take them; z_1 .. z_{L-1}; per block
    the activation a_{i-1} its convolution wrote for the filter gradient (None: not stored); per interior block its
    BatchNorm terms (BnTerms) and keep mask (None without dropout)."""
    weights: list
    zs: list
    made: list
    terms: list
    keeps: list


def _factor(config) -> float:
    """BatchNorm's gamma and beta are applied scaled by this: the activation scale, over 1 - p where dropout runs."""
    dropping = config["training"] and config["dropout_p"] > 0
    return config["activation_scale"] / (1 - config["dropout_p"]) if dropping else config["activation_scale"]


def _batch_stats(config) -> list:
    """Per block: whether its BatchNorm uses the batch's statistics (in training, or without running ones)."""
    return [config["training"] or rm is None for rm, _ in config["running"]]


def _stores(graphs, needs, i: int) -> bool:
    """Whether block i's convolution writes its input activation for block i's filter gradient. needs: whether x,
    each weight, each interior gamma and each interior beta need a gradient, in that order."""
    return i > 0 and graphs.stores_operands and needs[1 + i]


def _stack_forward(config, graphs, x, params, needs) -> tuple[torch.Tensor, _StackState]:
    """z_L and the state its backward reads (module docstring); the running statistics updated in place. params: the
    L weights, then gamma and beta of the first L - 1 blocks."""
    n_blocks = (len(params) + 2) // 3
    weights, gammas, betas = params[:n_blocks], params[n_blocks:2 * n_blocks - 1], params[2 * n_blocks - 1:]
    dil, training, p = config["dilation"], config["training"], config["dropout_p"]
    seed = config["dropout_seed"] if training and p > 0 else None
    inp, zs, terms, keeps, made = x.to(graphs.compute_dtype(x.dtype)), [], [], [], []
    conv_weights = [graphs.conv_weight(w) for w in weights]  # cast once, for the forward and dgrad
    for i in range(n_blocks):
        prologue = None if i == 0 else (terms[-1], keeps[-1])
        made.append(graphs.new_map(inp) if _stores(graphs, needs, i) else None)
        z, total, sq_total = graphs.fprop(inp, conv_weights[i], dil, prologue, **_made_out(made[-1]))
        zs.append(z)
        inp = z
        if i == n_blocks - 1:
            break
        rm, rv = config["running"][i]
        terms.append(bn_finalize(total, sq_total, z.numel() // z.shape[1], gammas[i], betas[i], rm, rv,
                                 batch_stats=training or rm is None, update_running=training and rm is not None,
                                 momentum=config["momentum"], eps=config["eps"], factor=_factor(config)))
        keeps.append(graphs.keep_mask(_keep_spec(seed, i, z.shape, p), z))
    return zs[-1], _StackState(conv_weights, zs[:-1], made, terms, keeps)


def _stack_backward(config, graphs, x, state: _StackState, grad_z, needs, batch_stats) -> tuple:
    """(dx, the weights' gradients, the interior gammas', the interior betas') for z_L's gradient grad_z, each None
    where `needs` (as _stores') says no; in float32 (float64) but dx, in x's dtype. batch_stats: per interior block,
    whether its BatchNorm used the batch's statistics."""
    n_blocks, dil = len(state.weights), config["dilation"]
    terms, keeps, zs, made = state.terms, state.keeps, state.zs, state.made
    d_weights, d_gammas, d_betas = [None] * n_blocks, [None] * (n_blocks - 1), [None] * (n_blocks - 1)
    dy, dx = grad_z, None  # the top block's dz, then each block's (g, z, eq) for BatchNorm backward's apply
    for i in range(n_blocks - 1, -1, -1):
        if i == 0:
            inp, prologue = x.to(graphs.compute_dtype(x.dtype)), None
        else:
            inp, prologue = zs[i - 1], (terms[i - 1], keeps[i - 1])
        need_w, runs_dgrad = needs[1 + i], i > 0 or needs[0]
        # dgrad makes dz from BatchNorm backward's terms anyway; pieces that store operands write it for wgrad
        dz = None
        if need_w and runs_dgrad and graphs.stores_operands and not isinstance(dy, torch.Tensor):
            dz = graphs.new_map(dy[0])
        if i > 0:
            g, d_gammas[i - 1], d_betas[i - 1], eq = graphs.dgrad(
                dy, state.weights[i], inp.shape, dil, (inp, terms[i - 1], keeps[i - 1], batch_stats[i - 1]),
                **_made_out(dz))
        elif runs_dgrad:
            dx = graphs.dgrad(dy, state.weights[0], x.shape, dil, **_made_out(dz)).to(x.dtype)
        if need_w:
            a, a_prologue = (inp, prologue) if made[i] is None else (made[i], None)
            d_weights[i] = graphs.wgrad(a, state.weights[i].shape, dy if dz is None else dz, dil, a_prologue)
        if i > 0:
            dy = (g, inp, *eq)
    # gamma_eff = gamma * factor: the chain rule's factor
    factor = _factor(config)
    return (dx, d_weights, [None if d is None else d * factor for d in d_gammas],
            [None if d is None else d * factor for d in d_betas])


class _ConvStack(torch.autograd.Function):
    """The stack up to the top block's convolution, z_L (its BatchNorm, ReLU and dropout are ``bn_relu_dropout``'s,
    after this), from the pieces of `graphs` (module docstring). params: the L weights, then gamma and beta of the
    first L - 1 blocks."""

    @staticmethod
    def forward(ctx, config, graphs, x, *params):
        z, state = _stack_forward(config, graphs, x, params, ctx.needs_input_grad[2:])
        ctx.save_for_backward(x, *state.weights, *state.zs, *[m for m in state.made if m is not None])
        ctx.config, ctx.graphs, ctx.terms, ctx.keeps = config, graphs, state.terms, state.keeps
        ctx.stored_at = [m is not None for m in state.made]
        ctx.param_dtypes = [t.dtype for t in params]
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        n_blocks = len(ctx.stored_at)
        x, *saved = ctx.saved_tensors
        stored = iter(saved[2 * n_blocks - 1:])
        state = _StackState(saved[:n_blocks], saved[n_blocks:2 * n_blocks - 1],
                            [next(stored) if s else None for s in ctx.stored_at], ctx.terms, ctx.keeps)
        dx, d_weights, d_gammas, d_betas = _stack_backward(ctx.config, ctx.graphs, x, state, grad_z,
                                                           ctx.needs_input_grad[2:], _batch_stats(ctx.config))
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
    _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed)
    check_cudnn_plans(cudnn_plans)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *gammas, *betas))
    pieces = stack_graphs(x, weights, dilation, dropout_p, training, graphs, backward, cudnn_plans)
    if training and dropout_p > 0 and dropout_seed is None:
        # pieces that draw their masks from torch's generator ignore the seed: none is drawn (under torch.compile
        # a draw would end the graph)
        dropout_seed = _draw_seed() if pieces.uses_seed else 0
    n_blocks = len(weights)
    running = [(None if running_means is None else running_means[i], None if running_vars is None else
                running_vars[i]) for i in range(n_blocks)]
    config = {"dilation": int(dilation), "training": bool(training), "dropout_p": float(dropout_p),
              "activation_scale": float(activation_scale), "momentum": float(momentum), "eps": float(eps),
              "dropout_seed": dropout_seed, "running": running}
    if type(pieces) is TritonGraphs:  # a subclass's methods run through the autograd.Function, as they are
        return _run_triton_stack(config, pieces, x, weights, gammas, betas)
    run = _run_stack if isinstance(pieces, TorchGraphs) else _run_stack_untraced
    return run(config, pieces, x, weights, gammas, betas)


def _run_stack(config, pieces, x, weights, gammas, betas) -> torch.Tensor:
    z_top = _ConvStack.apply(config, pieces, x, *weights, *gammas[:-1], *betas[:-1])
    return _top_epilogue(z_top, config, gammas[-1], betas[-1], pieces).to(x.dtype)


# torch.compile runs cuDNN's pieces as they are, between its graphs: their host code (cuDNN's plans) is not
# traceable, and each piece is already a whole graph. The torch pieces stay traceable; the Triton pieces are one
# registered op (below), a node of the compiled graph.
_run_stack_untraced = torch.compiler.disable(_run_stack)


@torch.compiler.disable  # torch.compile calls it as it is (an int from a tensor would end its graph with a warning)
def _draw_seed() -> int:
    """A dropout seed from torch's (CPU) generator."""
    return int(torch.randint(2**62, (1,)))


# ----------------------------------------------------------------------------------------------------------------
# The Triton pieces' stack as registered ops, so that torch.compile keeps it as a node of its graph (their host code,
# tensor descriptors and autotuners, is not traceable: dynamo failed inside the Triton launcher). The state its
# backward reads is the forward op's outputs after z_L (_state_tensors' order); the running statistics come back as
# new tensors, copied into the buffers outside (torch 2.4 has no autograd for ops that mutate their inputs).

def _run_triton_stack(config, pieces, x, weights, gammas, betas) -> torch.Tensor:
    means = [rm for rm, _ in config["running"][:-1] if rm is not None]
    variances = [rv for _, rv in config["running"][:-1] if rv is not None]
    interior = [*weights, *gammas[:-1], *betas[:-1]]
    needs = [torch.is_grad_enabled() and t.requires_grad for t in (x, *interior)]
    outs = torch.ops.lgc_fast.conv_stack_triton(
        x, list(weights), list(gammas[:-1]), list(betas[:-1]), means, variances, pieces.io, pieces.masks,
        pieces.operands, config["dilation"], config["training"], config["dropout_p"], config["activation_scale"],
        config["momentum"], config["eps"], config["dropout_seed"] or 0, needs)
    if _returns_running(config["training"], means):
        with torch.no_grad():
            for buffer, new in zip(means + variances, outs[len(outs) - 2 * len(means):]):
                buffer.copy_(new)
    return _top_epilogue(outs[0], config, gammas[-1], betas[-1], pieces).to(x.dtype)


def _returns_running(training: bool, running_means) -> bool:
    """Whether the forward op returns updated running statistics (and the wrapper copies them into the buffers)."""
    return training and len(running_means) > 0


def _state_tensors(state: _StackState) -> list:
    """The forward's state as the op returns it: z_1 .. z_{L-1}, the stored activations, each interior block's five
    BatchNorm terms, its keep bits (without dropout: none)."""
    return [*state.zs, *[m for m in state.made if m is not None], *[t for terms in state.terms for t in terms],
            *[k for k in state.keeps if k is not None]]


def _unflatten_state(weights, tensors, stored_at, dropping) -> _StackState:
    n_blocks = len(weights)
    zs, rest = list(tensors[:n_blocks - 1]), iter(tensors[n_blocks - 1:])
    made = [next(rest) if s else None for s in stored_at]
    terms = [BnTerms(*(next(rest) for _ in BnTerms._fields)) for _ in range(n_blocks - 1)]
    keeps = [next(rest) if dropping else None for _ in range(n_blocks - 1)]
    return _StackState(weights, zs, made, terms, keeps)


def _fresh(tensors, inputs) -> list:
    """tensors, each copied where it shares an input's storage (a registered op's outputs may not alias its inputs:
    float64 terms of running statistics are those statistics)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs}
    return [t.clone() if t.untyped_storage().data_ptr() in taken else t for t in tensors]


@custom_op("lgc_fast::conv_stack_triton", mutates_args=())
def _triton_stack_op(x: torch.Tensor, weights: List[torch.Tensor], gammas: List[torch.Tensor],
                     betas: List[torch.Tensor], running_means: List[torch.Tensor], running_vars: List[torch.Tensor],
                     io_dtype: torch.dtype, masks: str, operands: str, dilation: int, training: bool,
                     dropout_p: float, activation_scale: float, momentum: float, eps: float, dropout_seed: int,
                     needs: List[bool]) -> List[torch.Tensor]:
    """[z_L, the backward's state (_state_tensors), the updated running means and variances (in training)] of the
    stack on TritonGraphs(io_dtype, masks, operands); gammas, betas and the running statistics: the interior
    blocks'; needs: whether x, each weight, each gamma, each beta takes a gradient."""
    update = _returns_running(training, running_means)
    running = [(m.clone(), v.clone()) if update else (m, v) for m, v in zip(running_means, running_vars)]
    config = {"dilation": dilation, "training": training, "dropout_p": dropout_p, "activation_scale": activation_scale,
              "momentum": momentum, "eps": eps, "dropout_seed": dropout_seed,
              "running": (running or [(None, None)] * (len(weights) - 1)) + [(None, None)]}  # the top's: not here
    z, state = _stack_forward(config, TritonGraphs(io_dtype, masks, operands), x, (*weights, *gammas, *betas), needs)
    inputs = [x, *weights, *gammas, *betas, *running_means, *running_vars]
    new_running = [m for m, _ in running] + [v for _, v in running] if update else []
    return [z, *_fresh(_state_tensors(state), inputs), *new_running]


@_triton_stack_op.register_fake
def _(x, weights, gammas, betas, running_means, running_vars, io_dtype, masks, operands, dilation, training,
      dropout_p, activation_scale, momentum, eps, dropout_seed, needs):
    n, _, h, w = x.shape
    pieces = TritonGraphs(io_dtype, masks, operands)

    def new_map(c):
        return pieces._empty((n, c, h, w), x.device)

    channels = [wt.shape[0] for wt in weights]
    made = [new_map(weights[i].shape[1]) for i in range(len(weights)) if _stores(pieces, needs, i)]
    terms = [x.new_empty((c,), dtype=pieces.acc) for c in channels[:-1] for _ in BnTerms._fields]
    keeps = [x.new_empty(((n * c * h * w + 7) // 8,), dtype=torch.uint8) for c in channels[:-1]] \
        if training and dropout_p > 0 else []
    new_running = [torch.empty_like(t) for t in (*running_means, *running_vars)] \
        if _returns_running(training, running_means) else []
    return [new_map(channels[-1]), *(new_map(c) for c in channels[:-1]), *made, *terms, *keeps, *new_running]


@custom_op("lgc_fast::conv_stack_triton_backward", mutates_args=())
def _triton_stack_backward_op(grad_z: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                              gammas: List[torch.Tensor], betas: List[torch.Tensor], state: List[torch.Tensor],
                              io_dtype: torch.dtype, masks: str, operands: str, dilation: int, training: bool,
                              dropout_p: float, activation_scale: float, running: bool,
                              needs: List[bool]) -> List[torch.Tensor]:
    """The gradients `needs` asks for, in its order (x's in x's dtype, the others in their parameter's), from z_L's
    gradient and the forward op's state; running: whether the forward had running statistics."""
    pieces = TritonGraphs(io_dtype, masks, operands)
    config = {"dilation": dilation, "training": training, "dropout_p": dropout_p, "activation_scale": activation_scale}
    stored_at = [_stores(pieces, needs, i) for i in range(len(weights))]
    conv_weights = [pieces.conv_weight(w) for w in weights]
    state = _unflatten_state(conv_weights, state, stored_at, training and dropout_p > 0)
    dx, d_weights, d_gammas, d_betas = _stack_backward(config, pieces, x, state, grad_z, needs,
                                                       [training or not running] * (len(weights) - 1))
    grads = [dx, *(d.to(t.dtype) if d is not None else None
                   for d, t in zip(d_weights + d_gammas + d_betas, [*weights, *gammas, *betas]))]
    return [g for g, need in zip(grads, needs) if need]


@_triton_stack_backward_op.register_fake
def _(grad_z, x, weights, gammas, betas, state, io_dtype, masks, operands, dilation, training, dropout_p,
      activation_scale, running, needs):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    like = [dx, *weights, *gammas, *betas]
    return [t if i == 0 else torch.empty_like(t, memory_format=torch.contiguous_format)
            for i, (t, need) in enumerate(zip(like, needs)) if need]


def _triton_stack_setup_context(ctx, inputs, output):
    x, weights, gammas, betas, running_means, _, *static = inputs
    io_dtype, masks, operands, dilation, training, dropout_p, activation_scale, _, _, _, needs = static
    n_state = len(output) - 1 - (2 * len(running_means) if _returns_running(training, running_means) else 0)
    ctx.save_for_backward(x, *weights, *gammas, *betas, *output[1:1 + n_state])
    ctx.mark_non_differentiable(*output[1:])
    ctx.n_blocks, ctx.n_running = len(weights), len(running_means)
    ctx.static = (io_dtype, masks, operands, dilation, training, dropout_p, activation_scale,
                  len(running_means) > 0, needs)


def _triton_stack_backward(ctx, grads):
    n = ctx.n_blocks
    x, *saved = ctx.saved_tensors
    weights, gammas, betas, state = saved[:n], saved[n:2 * n - 1], saved[2 * n - 1:3 * n - 2], saved[3 * n - 2:]
    needs = ctx.static[-1]
    got = iter(torch.ops.lgc_fast.conv_stack_triton_backward(grads[0], x, weights, gammas, betas, state,
                                                              *ctx.static))
    grads = [next(got) if need else None for need in needs]
    no_running = [None] * ctx.n_running
    return (grads[0], grads[1:1 + n], grads[1 + n:2 * n], grads[2 * n:], no_running, no_running, *[None] * 11)


_triton_stack_op.register_autograd(_triton_stack_backward, setup_context=_triton_stack_setup_context)


def check_cudnn_plans(cudnn_plans) -> None:
    if isinstance(cudnn_plans, bool) or not isinstance(cudnn_plans, int) or not 1 <= cudnn_plans <= MAX_CUDNN_PLANS:
        raise ValueError(f"cudnn_plans must be an int in [1, {MAX_CUDNN_PLANS}], got {cudnn_plans!r}")


def _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed) -> None:
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
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise ValueError(f"dropout_seed must be an int or None, got {dropout_seed!r}")
