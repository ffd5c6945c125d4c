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
                      0 / 1 drawn from (seed, j) again wherever it is needed, never stored
  finalize            per channel: batch mean and variance -> s_i, b_i; the running statistics' update
  output              a_L = prologue_L(z_L), the only activation written
  backward, top       g_L = relu'(pre_L) * keep_L * da_L, BatchNorm's backward terms of block L
  backward, block i   dW_i = wgrad(prologue_{i-1}(z_{i-1}), dz_i) and da_{i-1} = dgrad(dz_i, W_i), where
                      dz_i = eq_dy_i * g_i + eq_x_i * z_i + eq_b_i is made in both prologues (BatchNorm backward's
                      apply, fused: wgrad_sbr_rng_dbnapply, dgrad_dbnapply_rng_drelu_dbn), and dgrad's epilogue
                      gates da_{i-1} into g_{i-1} and sums BatchNorm's backward terms of block i-1
  dgamma_i, dbeta_i   from those sums; dx = dgrad(dz_1, W_1)

The forward keeps x, every z_i and the per-channel terms; no a_i and no mask. ``conv_stack`` runs these pieces as the
torch functions below (``TORCH_GRAPHS``): they are the oracle of each cuDNN graph, and their composition is checked
against ``conv_stack_ref``, the plain definition (F.conv2d, F.batch_norm, relu, dropout on the same masks), values,
gradients and running statistics. Compute in float32 (float64 for float64 inputs); a_L in x's dtype.

x: (N, C_0, H, W); weights[i]: (C_{i+1}, C_i, r, r), one odd r and one dilation for the stack, zero padding
dilation * (r // 2); gammas[i], betas[i], running_means[i], running_vars[i]: (C_{i+1},).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from lgc_fast.ops._checks import check_number
from lgc_fast.ops.dilated_block import ACTIVATION_SCALE, DROPOUT_P

_SUM_DIMS = (0, 2, 3)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


def stack_keep_mask(seed: int, block: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """Block `block`'s keep mask, 1 with probability 1 - p else 0, of `shape` (N, C, H, W): a function of (seed,
    block) alone, so the backward draws it again instead of storing it (as cuDNN's RNG op does from a seed and an
    offset). Drawn on the CPU, so every device gets the same mask."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(block)) % 2**63)
    keep = torch.rand(tuple(shape), generator=generator, dtype=torch.float64) >= p
    return keep.to(device=device, dtype=dtype)


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
            a = a * stack_keep_mask(dropout_seed, i, a.shape, dropout_p, a.device, a.dtype) / (1 - dropout_p)
    return a


# ----------------------------------------------------------------------------------------------------------------
# The graphs, as torch functions

class BnTerms(NamedTuple):
    """A block's BatchNorm as its prologue applies it: pre = z * s + b, from mean and invstd (the batch's in training,
    else the running ones) and gamma_eff = gamma * activation_scale / (1 - p) (beta likewise)."""
    mean: torch.Tensor
    invstd: torch.Tensor
    gamma_eff: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor


def _prologue(z, terms: BnTerms, keep):
    a = torch.relu(z * _per_channel(terms.s) + _per_channel(terms.b))
    return a if keep is None else a * keep


def _grad_operand(dy):
    """dy as a tensor, or as BatchNorm backward's apply on the next block: (g, z, eq_dy, eq_x, eq_b)."""
    if isinstance(dy, torch.Tensor):
        return dy
    g, z, eq_dy, eq_x, eq_b = dy
    return g * _per_channel(eq_dy) + z * _per_channel(eq_x) + _per_channel(eq_b)


def fprop_graph(inp, w, dilation, prologue=None):
    """z = conv(inp or prologue(inp), w) with z's per-channel sum and sum of squares -> (z, sum, sq_sum).
    prologue: None or (BnTerms, keep or None)."""
    a = inp if prologue is None else _prologue(inp, *prologue)
    z = F.conv2d(a, w, padding=dilation * (w.shape[-1] // 2), dilation=dilation)
    return z, z.sum(_SUM_DIMS), (z * z).sum(_SUM_DIMS)


def wgrad_graph(inp, w_shape, dy, dilation, prologue=None):
    """The filter gradient of conv(inp or prologue(inp)) for dy (a tensor, or the next block's (g, z, eq_*))."""
    a = inp if prologue is None else _prologue(inp, *prologue)
    return torch.nn.grad.conv2d_weight(a, w_shape, _grad_operand(dy), padding=dilation * (w_shape[-1] // 2),
                                       dilation=dilation)


def dgrad_graph(dy, w, in_shape, dilation, epilogue=None):
    """The input gradient of the conv for dy; with epilogue (z_prev, BnTerms, keep, batch_stats) it goes on through
    the previous block's dropout, ReLU and BatchNorm: -> ``bn_backward_terms``'s (g, dgamma_eff, dbeta_eff, eq)."""
    da = torch.nn.grad.conv2d_input(in_shape, w, _grad_operand(dy), padding=dilation * (w.shape[-1] // 2),
                                    dilation=dilation)
    return da if epilogue is None else bn_backward_terms(da, *epilogue)


def bn_backward_terms(da, z, terms: BnTerms, keep, batch_stats: bool):
    """From the gradient of a block's output a: g = the gradient at BatchNorm's output (through dropout and ReLU), the
    per-channel dgamma_eff = sum(g * xhat), dbeta_eff = sum(g), and (eq_dy, eq_x, eq_b) with the gradient at z equal
    to eq_dy * g + eq_x * z + eq_b (with batch statistics their own gradient is in eq_x and eq_b)."""
    g = da if keep is None else da * keep
    g = torch.where(z * _per_channel(terms.s) + _per_channel(terms.b) > 0, g, torch.zeros((), dtype=g.dtype))
    xhat = (z - _per_channel(terms.mean)) * _per_channel(terms.invstd)
    dgamma, dbeta = (g * xhat).sum(_SUM_DIMS), g.sum(_SUM_DIMS)
    eq_dy = terms.gamma_eff * terms.invstd
    if not batch_stats:
        zero = torch.zeros_like(eq_dy)
        return g, dgamma, dbeta, (eq_dy, zero, zero)
    count = z.numel() // z.shape[1]
    eq_x = -eq_dy * terms.invstd * dgamma / count
    eq_b = -eq_dy * dbeta / count - eq_x * terms.mean
    return g, dgamma, dbeta, (eq_dy, eq_x, eq_b)


def bn_finalize(total, sq_total, count, gamma, beta, running_mean, running_var, *, batch_stats: bool,
                update_running: bool, momentum: float, eps: float, factor: float) -> BnTerms:
    """Per channel, from z's sums: mean and invstd (the batch's, or the running ones), the prologue's s and b with
    `factor` (activation_scale / (1 - p)) folded in; updates the running statistics in place as nn.BatchNorm2d does
    (unbiased variance) when `update_running`. Float64 arithmetic: E[z^2] - E[z]^2 cancels."""
    if batch_stats:
        mean64 = total.double() / count
        var64 = (sq_total.double() / count - mean64 * mean64).clamp_min(0)
        if update_running:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean64.to(running_mean.dtype))
                unbiased = var64 * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        mean, invstd = mean64.to(total.dtype), torch.rsqrt(var64 + eps).to(total.dtype)
    else:
        mean = running_mean.to(total.dtype)
        invstd = torch.rsqrt(running_var.double() + eps).to(total.dtype)
    gamma_eff, beta_eff = gamma.to(total.dtype) * factor, beta.to(total.dtype) * factor
    s = gamma_eff * invstd
    return BnTerms(mean, invstd, gamma_eff, s, beta_eff - mean * s)


TORCH_GRAPHS = {"fprop": fprop_graph, "wgrad": wgrad_graph, "dgrad": dgrad_graph, "bn_backward": bn_backward_terms}


class _ConvStack(torch.autograd.Function):
    """Forward and backward of ``conv_stack`` from the graphs in `graphs` (see the module docstring)."""

    @staticmethod
    def forward(ctx, config, graphs, x, *params):
        n_blocks = len(params) // 3
        weights, gammas, betas = params[:n_blocks], params[n_blocks:2 * n_blocks], params[2 * n_blocks:]
        ct = x.dtype if x.dtype == torch.float64 else torch.float32
        dil, training, p = config["dilation"], config["training"], config["dropout_p"]
        dropping = training and p > 0
        factor = config["activation_scale"] / (1 - p) if dropping else config["activation_scale"]
        keep = _Keeps(config["dropout_seed"] if dropping else None, p, x.device, ct)
        inp, zs, terms = x.to(ct), [], []
        for i in range(n_blocks):
            prologue = None if i == 0 else (terms[-1], keep(i - 1, inp.shape))
            z, total, sq_total = graphs["fprop"](inp, weights[i].to(ct), dil, prologue)
            rm, rv = config["running"][i]
            batch_stats = training or rm is None
            terms.append(bn_finalize(total, sq_total, z.numel() // z.shape[1], gammas[i], betas[i], rm, rv,
                                     batch_stats=batch_stats, update_running=training and rm is not None,
                                     momentum=config["momentum"], eps=config["eps"], factor=factor))
            zs.append(z)
            inp = z
        out = _prologue(zs[-1], terms[-1], keep(n_blocks - 1, zs[-1].shape)).to(x.dtype)
        ctx.save_for_backward(x, *weights, *zs)
        ctx.graphs, ctx.terms, ctx.keep, ctx.factor = graphs, terms, keep, factor
        ctx.batch_stats = [training or rm is None for rm, _ in config["running"]]
        ctx.dilation, ctx.n_blocks, ctx.param_dtypes = dil, n_blocks, [t.dtype for t in params]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        n_blocks, graphs, terms, keep, dil = ctx.n_blocks, ctx.graphs, ctx.terms, ctx.keep, ctx.dilation
        saved = ctx.saved_tensors
        x, weights, zs = saved[0], saved[1:1 + n_blocks], saved[1 + n_blocks:]
        ct = zs[0].dtype
        top = n_blocks - 1
        g, dgamma, dbeta, eq = graphs["bn_backward"](grad_out.to(ct), zs[top], terms[top], keep(top, zs[top].shape),
                                                     ctx.batch_stats[top])
        d_weights, d_gammas, d_betas = [None] * n_blocks, [None] * n_blocks, [None] * n_blocks
        d_gammas[top], d_betas[top] = dgamma, dbeta
        dx = None
        for i in range(top, -1, -1):
            dy = (g, zs[i], *eq)
            w = weights[i].to(ct)
            if i == 0:
                inp, prologue = x.to(ct), None
            else:
                inp = zs[i - 1]
                prologue = (terms[i - 1], keep(i - 1, inp.shape))
            if ctx.needs_input_grad[3 + i]:
                d_weights[i] = graphs["wgrad"](inp, w.shape, dy, dil, prologue)
            if i > 0:
                g, d_gammas[i - 1], d_betas[i - 1], eq = graphs["dgrad"](
                    dy, w, inp.shape, dil, (inp, terms[i - 1], prologue[1], ctx.batch_stats[i - 1]))
            elif ctx.needs_input_grad[2]:
                dx = graphs["dgrad"](dy, w, x.shape, dil).to(x.dtype)
        # gamma_eff = gamma * factor: the chain rule's factor, then each parameter's own dtype
        d_gammas = [None if d is None else d * ctx.factor for d in d_gammas]
        d_betas = [None if d is None else d * ctx.factor for d in d_betas]
        grads = [None if d is None else d.to(dt) for d, dt in zip(d_weights + d_gammas + d_betas, ctx.param_dtypes)]
        return (None, None, dx, *grads)


class _Keeps:
    """Block i's keep mask from (seed, i), drawn again at every use; None without dropout."""

    def __init__(self, seed, p, device, dtype):
        self.seed, self.p, self.device, self.dtype = seed, p, device, dtype

    def __call__(self, block, shape):
        if self.seed is None:
            return None
        return stack_keep_mask(self.seed, block, shape, self.p, self.device, self.dtype)


def conv_stack(x, weights, gammas, betas, running_means=None, running_vars=None, *, training: bool = True,
               momentum: float = 0.1, eps: float = 1e-5, dropout_p: float = DROPOUT_P,
               activation_scale: float = ACTIVATION_SCALE, dilation: int = 1,
               dropout_seed: Optional[int] = None) -> torch.Tensor:
    """The stack's output a_L (N, C_L, H, W), computed from the fused graphs' pieces (module docstring); equal to
    ``conv_stack_ref`` with the same arguments. In training with dropout_p > 0, `dropout_seed` (an int) picks the
    masks; None draws one from torch's generator. running_means / running_vars (lists, or None for none) are updated
    in place in training, as nn.BatchNorm2d updates its buffers."""
    if training and dropout_p > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(2**62, (1,)))
    _check(x, weights, gammas, betas, running_means, running_vars, momentum, eps, dropout_p, activation_scale,
           dilation, dropout_seed, training)
    n_blocks = len(weights)
    running = [(None if running_means is None else running_means[i], None if running_vars is None else
                running_vars[i]) for i in range(n_blocks)]
    config = {"dilation": int(dilation), "training": bool(training), "dropout_p": float(dropout_p),
              "activation_scale": float(activation_scale), "momentum": float(momentum), "eps": float(eps),
              "dropout_seed": dropout_seed, "running": running}
    return _ConvStack.apply(config, TORCH_GRAPHS, x, *weights, *gammas, *betas)


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
