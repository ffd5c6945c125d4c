"""conv_stack's BatchNorm finalize (lgc_fast/ops/conv_stack.py): per channel, from a block's z sums, the terms its
successor's prologue applies, pre = z * s + b, and nn.BatchNorm2d's running update.

    mean = total / count, var = max(sq_total / count - mean^2, 0)        (float64: E[z^2] - E[z]^2 cancels)
    running <- (1 - momentum) * running + momentum * (mean, var * count / (count - 1))     (where update_running)
    (mean, var) = the running statistics instead                          (where not batch_stats)
    invstd = 1 / sqrt(var + eps), gamma_eff = gamma * factor, s = gamma_eff * invstd, b = beta * factor - mean * s

Backends: "cpu" / "cuda", the compiled op lgc_fast_C::bn_finalize (csrc/bn_finalize.cpp; the arithmetic is
csrc/epilogue.h's bn_finalize_channel, one CUDA launch instead of the reference's dozen small ones), and "ref",
``bn_finalize_ref`` (plain torch), the test oracle. The compiled op takes every vector in total's dtype (float32 or
float64); where the running statistics have another one, the reference runs.

total, sq_total, gamma, beta, running_mean, running_var: (C,). Returns BnTerms (mean, invstd, gamma_eff, s, b),
(C,) in total's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from lgc_fast import _backend
from lgc_fast.ops.conv_stack_graphs import BnTerms

_SUPPORTED = ("cuda", "cpu", "ref")


def bn_finalize_ref(total: torch.Tensor, sq_total: torch.Tensor, count: float, gamma: torch.Tensor,
                    beta: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], *,
                    batch_stats: bool, update_running: bool, momentum: float, eps: float,
                    factor: float) -> BnTerms:
    """The finalize in plain torch (module docstring), the running statistics updated in place."""
    _check(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats, update_running)
    return _finalize_torch(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats,
                           update_running, momentum, eps, factor)


def _finalize_torch(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats, update_running,
                    momentum, eps, factor) -> BnTerms:
    if batch_stats:
        mean64 = total.double() / count
        var64 = (sq_total.double() / count - mean64 * mean64).clamp_min(0)
        if update_running:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean64.to(running_mean.dtype))
                unbiased = var64 * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
    else:
        mean64, var64 = running_mean.double(), running_var.double()
    invstd64 = torch.rsqrt(var64 + eps)
    gamma_eff64 = gamma.double() * factor
    s64 = gamma_eff64 * invstd64
    b64 = beta.double() * factor - mean64 * s64
    return BnTerms(*(t.to(total.dtype) for t in (mean64, invstd64, gamma_eff64, s64, b64)))


def bn_finalize(total: torch.Tensor, sq_total: torch.Tensor, count: float, gamma: torch.Tensor, beta: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], *, batch_stats: bool,
                update_running: bool, momentum: float, eps: float, factor: float,
                backend: Optional[str] = None) -> BnTerms:
    """The finalize (module docstring) on the compiled op of total's device where it runs, else the reference;
    `backend` ("cpu", "cuda", "ref") insists. The running statistics are updated in place where update_running."""
    _check(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats, update_running)
    name = _backend.choose("bn_finalize", total.device, backend, supported=_SUPPORTED)
    running_dtypes = {t.dtype for t in (running_mean, running_var) if t is not None}
    if name == "ref" or total.dtype not in (torch.float32, torch.float64) or running_dtypes - {total.dtype}:
        if backend not in (None, "ref"):
            running = ", ".join(sorted(map(str, running_dtypes))) or "none"
            raise ValueError(f"bn_finalize: backend={backend!r} takes float32 or float64 vectors with the running "
                             f"statistics in total's dtype, got total {total.dtype}, running statistics {running}")
        return _finalize_torch(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats,
                               update_running, momentum, eps, factor)
    vectors = [t.to(total.dtype).contiguous() for t in (sq_total, gamma, beta)]
    return BnTerms(*torch.ops.lgc_fast_C.bn_finalize(
        total.contiguous(), *vectors, running_mean, running_var, float(count), bool(batch_stats),
        bool(update_running), float(momentum), float(eps), float(factor)))


def _check(total, sq_total, count, gamma, beta, running_mean, running_var, batch_stats, update_running) -> None:
    if not isinstance(total, torch.Tensor) or total.dim() != 1 or not total.dtype.is_floating_point:
        raise ValueError(f"total must be a floating-point vector (C,), got "
                         f"{tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__}")
    c = total.shape[0]
    for name, v in (("sq_total", sq_total), ("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (c,)):
            raise ValueError(f"{name} must have shape ({c},), got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or not at all")
    if running_mean is None and (update_running or not batch_stats):
        raise ValueError("running_mean and running_var are needed to update them or to normalise without batch "
                         "statistics")
    if batch_stats and not count > 0:
        raise ValueError(f"count must be > 0, got {count!r}")
