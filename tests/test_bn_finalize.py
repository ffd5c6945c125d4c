"""lgc_fast.ops.bn_finalize: each compiled backend against bn_finalize_ref (itself against nn.BatchNorm2d's own
statistics and update), the running statistics in place, the argument checks, and opcheck of the C++ op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import devices
from lgc_fast import _backend
from lgc_fast.ops.bn_finalize import bn_finalize, bn_finalize_ref

C = 37  # not a multiple of the CUDA kernel's block


def _compiled(device: str) -> list[str]:
    name = "cuda" if device == "cuda" else "cpu"
    return [name] if _backend._usable(name, torch.device(device))[0] else []


def _sums(dtype, device, n=6, mean_offset=3.0):
    """z (n, C, 5, 4) with means far from 0 (where E[z^2] - E[z]^2 loses float32's digits) and its sums in dtype."""
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(C, 1, 1, generator=g, dtype=torch.float64)
    z = torch.randn(n, C, 5, 4, generator=g, dtype=torch.float64) * spread + mean_offset
    total, sq_total = z.sum((0, 2, 3)), (z * z).sum((0, 2, 3))
    gamma = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(C, generator=g, dtype=torch.float64)
    running = (torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    to = dict(dtype=dtype, device=device)
    return (z.to(**to), total.to(**to), sq_total.to(**to), gamma.to(**to), beta.to(**to),
            tuple(r.to(**to) for r in running))


def test_reference_is_batchnorm():
    """The reference's terms and running update against F.batch_norm on the map the sums came from, in float64:
    relu(z * s + b) == factor * relu(batch_norm(z)) for factor > 0."""
    z, total, sq_total, gamma, beta, (rm, rv) = _sums(torch.float64, "cpu")
    factor = 0.1 / 0.9
    for batch_stats in (True, False):
        ours, theirs = rm.clone(), rv.clone()
        bn_rm, bn_rv = rm.clone(), rv.clone()
        terms = bn_finalize_ref(total, sq_total, z.numel() // C, gamma, beta, ours, theirs, batch_stats=batch_stats,
                                update_running=batch_stats, momentum=0.2, eps=1e-4, factor=factor)
        want = factor * F.batch_norm(z, bn_rm, bn_rv, gamma, beta, batch_stats, 0.2, 1e-4)
        got = z * terms.s[:, None, None] + terms.b[:, None, None]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours, bn_rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(theirs, bn_rv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms.gamma_eff, gamma * factor)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_stats, update_running", [(True, True), (True, False), (False, False)])
def test_compiled_matches_reference(device, dtype, batch_stats, update_running):
    for backend in _compiled(device):
        z, total, sq_total, gamma, beta, (rm, rv) = _sums(dtype, device)
        count = z.numel() // C
        kwargs = dict(batch_stats=batch_stats, update_running=update_running, momentum=0.3, eps=1e-5, factor=0.7)
        ref_rm, ref_rv = rm.clone(), rv.clone()
        want = bn_finalize_ref(total, sq_total, count, gamma, beta, ref_rm, ref_rv, **kwargs)
        got = bn_finalize(total, sq_total, count, gamma, beta, rm, rv, backend=backend, **kwargs)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
        for name, a, b in zip(got._fields, got, want):
            assert a.dtype == dtype and a.device.type == device, name
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{backend} {name}: {m}")
        torch.testing.assert_close(rm, ref_rm, **tol)
        torch.testing.assert_close(rv, ref_rv, **tol)
        if not update_running:
            assert torch.equal(rm, _sums(dtype, device)[-1][0])  # untouched


@pytest.mark.parametrize("device", devices())
def test_without_running_statistics_and_with_one_value(device):
    """No running statistics in training (track_running_stats=False); count 1 (a zero variance, the unbiased factor's
    count - 1 taken as 1): finite terms, as the reference gives them."""
    for backend in _compiled(device):
        _, total, sq_total, gamma, beta, (rm, rv) = _sums(torch.float32, device)
        got = bn_finalize(total, sq_total, 16, gamma, beta, None, None, batch_stats=True, update_running=False,
                          momentum=0.1, eps=1e-5, factor=1.0, backend=backend)
        want = bn_finalize_ref(total, sq_total, 16, gamma, beta, None, None, batch_stats=True, update_running=False,
                               momentum=0.1, eps=1e-5, factor=1.0)
        torch.testing.assert_close(list(got), list(want), rtol=2e-6, atol=1e-6)
        ref_rm, ref_rv = rm.clone(), rv.clone()
        got = bn_finalize(total, total * total, 1, gamma, beta, rm, rv, batch_stats=True, update_running=True,
                          momentum=0.5, eps=1e-5, factor=1.0, backend=backend)
        want = bn_finalize_ref(total, total * total, 1, gamma, beta, ref_rm, ref_rv, batch_stats=True,
                               update_running=True, momentum=0.5, eps=1e-5, factor=1.0)
        assert all(torch.isfinite(t).all() for t in got)
        torch.testing.assert_close(list(got) + [rm, rv], list(want) + [ref_rm, ref_rv], rtol=2e-6, atol=1e-5)


def test_automatic_choice_falls_back_to_the_reference_for_other_dtypes():
    """float32 sums with float64 running statistics: the reference runs (and updates them) on the automatic choice;
    the compiled backend by name refuses with a message naming the dtypes."""
    _, total, sq_total, gamma, beta, (rm, rv) = _sums(torch.float32, "cpu")
    rm64, rv64 = rm.double(), rv.double()
    kwargs = dict(batch_stats=True, update_running=True, momentum=0.1, eps=1e-5, factor=1.0)
    got = bn_finalize(total, sq_total, 120, gamma, beta, rm64, rv64, **kwargs)
    want_rm, want_rv = rm.double(), rv.double()
    want = bn_finalize_ref(total, sq_total, 120, gamma, beta, want_rm, want_rv, **kwargs)
    torch.testing.assert_close(list(got) + [rm64, rv64], list(want) + [want_rm, want_rv])
    if _compiled("cpu"):
        with pytest.raises(ValueError, match="running statistics torch.float64"):
            bn_finalize(total, sq_total, 120, gamma, beta, rm64, rv64, backend="cpu", **kwargs)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(total=torch.zeros(C, 2)), "total must be a floating-point vector"),
    (lambda a: a.update(gamma=torch.zeros(C + 1)), rf"gamma must have shape \({C},\)"),
    (lambda a: a.update(running_var=None), "given together"),
    (lambda a: a.update(running_mean=None, running_var=None, update_running=True), "needed to update them"),
    (lambda a: a.update(count=0), "count must be > 0"),
])
def test_errors_name_the_argument(change, match):
    _, total, sq_total, gamma, beta, (rm, rv) = _sums(torch.float32, "cpu")
    args = dict(total=total, sq_total=sq_total, count=4, gamma=gamma, beta=beta, running_mean=rm, running_var=rv,
                batch_stats=True, update_running=False, momentum=0.1, eps=1e-5, factor=1.0)
    change(args)
    with pytest.raises(ValueError, match=match):
        bn_finalize(**args)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    if not _compiled(device):
        pytest.skip("lgc_fast._C is not built here")
    _, total, sq_total, gamma, beta, (rm, rv) = _sums(torch.float32, device)
    op = torch.ops.lgc_fast_C.bn_finalize.default
    torch.library.opcheck(op, (total, sq_total, gamma, beta, rm, rv, 120.0, True, True, 0.1, 1e-5, 0.5))
    torch.library.opcheck(op, (total, sq_total, gamma, beta, rm, rv, 120.0, False, False, 0.1, 1e-5, 0.5))
    torch.library.opcheck(op, (total, sq_total, gamma, beta, None, None, 120.0, True, False, 0.1, 1e-5, 0.5))
