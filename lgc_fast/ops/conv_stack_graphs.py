"""The pieces ``conv_stack`` computes a stack of conv blocks from (lgc_fast/ops/conv_stack.py says how they chain):
one class a backend, with the same methods.

``TorchGraphs``: each piece as torch functions, in float32 (float64 for float64): the oracle of each cuDNN graph.
``CudnnGraphs``: each piece as one cuDNN graph (csrc/cuda/cudnn_conv_graphs.h, through lgc_fast._C.cudnn_conv_graph),
in the io dtype (bfloat16 or float16, channels_last) with float32 per-channel terms. The interior blocks' keep masks
("rng") are drawn inside the graphs by cuDNN's RNG op from (seed, offset) device scalars, so a mask is never written;
or ("byte", where cuDNN does not fuse its RNG op into a graph) drawn once in the forward as uint8 maps that the three
graphs read. A graph that cuDNN cannot build is found before a stack runs (``CudnnGraphs.unbuildable``), and the
stack then keeps TorchGraphs.

A keep mask is named by a ``KeepSpec`` (seed, offset, p): 1 with probability 1 - p, else 0. The torch pieces draw it
with ``stack_keep_mask`` wherever it is needed, and so does CudnnGraphs for its byte masks (once); cuDNN's RNG draws
another mask from the same spec (its own Philox stream), the same one in every graph. Offsets are block * (values in
the block's map), so no two blocks' streams overlap however the RNG numbers its draws.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

_SUM_DIMS = (0, 2, 3)
MASK_MODES = ("rng", "byte")  # CudnnGraphs' keep masks, in the order conv_stack tries them


class KeepSpec(NamedTuple):
    seed: int
    offset: int
    p: float


class RngKeep(NamedTuple):
    """A KeepSpec as cuDNN's RNG op takes it: seed and offset as (1,) int64 device tensors, made once a block (by
    CudnnGraphs.keep_mask) and bound by its three graphs."""
    seed: torch.Tensor
    offset: torch.Tensor
    p: float


class BnTerms(NamedTuple):
    """A block's BatchNorm as its prologue applies it: pre = z * s + b, from mean and invstd (the batch's in training,
    else the running ones) and gamma_eff = gamma * activation_scale / (1 - p) (beta likewise); float32 (float64)."""
    mean: torch.Tensor
    invstd: torch.Tensor
    gamma_eff: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor


def stack_keep_mask(seed: int, offset: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The keep mask of (seed, offset), 1 with probability 1 - p else 0, of `shape` (N, C, H, W), drawn on `device`
    by a generator seeded from them: the backward draws it again instead of storing it. The same on every run of one
    device type."""
    generator = torch.Generator(device=device).manual_seed((int(seed) * 1_000_003 + int(offset)) % 2**63)
    keep = torch.rand(tuple(shape), generator=generator, device=device) >= p
    return keep.to(dtype)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None]


def keep_tensor(keep, like: torch.Tensor) -> Optional[torch.Tensor]:
    """A mask for `like` from a KeepSpec (drawn), a tensor (as it is) or None."""
    if keep is None or isinstance(keep, torch.Tensor):
        return keep
    return stack_keep_mask(keep.seed, keep.offset, like.shape, keep.p, like.device, like.dtype)


def apply_prologue(z, terms: BnTerms, keep):
    """relu(z * s + b) * keep: a block's BatchNorm, ReLU, scale and dropout (keep: KeepSpec, tensor or None)."""
    a = torch.relu(z * _per_channel(terms.s) + _per_channel(terms.b))
    mask = keep_tensor(keep, a)
    return a if mask is None else a * mask


def bn_backward_terms(da, z, terms: BnTerms, keep, batch_stats: bool):
    """From the gradient of a block's output a: g = the gradient at BatchNorm's output (through dropout and ReLU), the
    per-channel dgamma_eff = sum(g * xhat), dbeta_eff = sum(g), and (eq_dy, eq_x, eq_b) with the gradient at z equal
    to eq_dy * g + eq_x * z + eq_b (with batch statistics, their own gradient is in eq_x and eq_b). Computed in the
    terms' dtype."""
    ct = terms.s.dtype
    da, z = da.to(ct), z.to(ct)
    mask = keep_tensor(keep, da)
    g = da if mask is None else da * mask
    g = torch.where(z * _per_channel(terms.s) + _per_channel(terms.b) > 0, g, torch.zeros((), dtype=ct))
    xhat = (z - _per_channel(terms.mean)) * _per_channel(terms.invstd)
    dgamma, dbeta = (g * xhat).sum(_SUM_DIMS), g.sum(_SUM_DIMS)
    return g, dgamma, dbeta, bn_backward_eq(terms, dgamma, dbeta, z.numel() // z.shape[1], batch_stats)


def bn_backward_eq(terms: BnTerms, dgamma, dbeta, count: int, batch_stats: bool):
    """(eq_dy, eq_x, eq_b) of ``bn_backward_terms`` from its sums over `count` values a channel."""
    eq_dy = terms.gamma_eff * terms.invstd
    if not batch_stats:
        zero = torch.zeros_like(eq_dy)
        return eq_dy, zero, zero
    eq_x = -eq_dy * terms.invstd * dgamma / count
    eq_b = -eq_dy * dbeta / count - eq_x * terms.mean
    return eq_dy, eq_x, eq_b


def _padding(dilation: int, r: int) -> int:
    return dilation * (r // 2)


class TorchGraphs:
    """The pieces as torch functions. prologue: None or (BnTerms, keep); dy: a tensor, or the next block's
    (g, z, eq_dy, eq_x, eq_b), from which BatchNorm backward's apply makes it; epilogue: (z_prev, BnTerms, keep,
    batch_stats)."""

    name = "torch"
    # whether the top block's mask may be drawn afresh (bn_relu_dropout_drawn's keep bits, the fastest) rather than
    # as the (seed, offset) mask the torch pieces and conv_stack_ref draw
    fresh_top_mask = False
    # whether fprop and dgrad write the filter gradient's operands for it (made_out: TritonGraphs' "stored")
    stores_operands = False
    # whether the interior masks are those of conv_stack's dropout seed (else the pieces draw their own)
    uses_seed = True

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def keep_mask(self, keep: Optional[KeepSpec], like: torch.Tensor):
        """The form a block's mask is kept in between its graphs: the KeepSpec, drawn again wherever needed."""
        return keep

    def conv_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A filter as the pieces take it (here as it is; each piece casts it to its operand's dtype)."""
        return w

    def fprop(self, inp, w, dilation, prologue=None):
        """z = conv(inp or prologue(inp), w) with z's per-channel sum and sum of squares -> (z, sum, sq_sum)."""
        a = inp if prologue is None else apply_prologue(inp, *prologue)
        z = F.conv2d(a, w.to(a.dtype), padding=_padding(dilation, w.shape[-1]), dilation=dilation)
        return z, z.sum(_SUM_DIMS), (z * z).sum(_SUM_DIMS)

    def wgrad(self, inp, w_shape, dy, dilation, prologue=None):
        """The filter gradient of conv(inp or prologue(inp)) for dy."""
        a = inp if prologue is None else apply_prologue(inp, *prologue)
        return torch.nn.grad.conv2d_weight(a, w_shape, self._grad_operand(dy, a.dtype),
                                           padding=_padding(dilation, w_shape[-1]), dilation=dilation)

    def dgrad(self, dy, w, in_shape, dilation, epilogue=None):
        """The input gradient of the conv for dy; with an epilogue it goes on through the previous block's dropout,
        ReLU and BatchNorm: -> ``bn_backward_terms``'s (g, dgamma_eff, dbeta_eff, eq)."""
        grad = self._grad_operand(dy, self.compute_dtype(w.dtype))
        da = torch.nn.grad.conv2d_input(in_shape, w.to(grad.dtype), grad, padding=_padding(dilation, w.shape[-1]),
                                        dilation=dilation)
        return da if epilogue is None else bn_backward_terms(da, *epilogue)

    @staticmethod
    def _grad_operand(dy, dtype):
        if isinstance(dy, torch.Tensor):
            return dy.to(dtype)
        g, z, eq_dy, eq_x, eq_b = dy
        return (g.to(dtype) * _per_channel(eq_dy) + z.to(dtype) * _per_channel(eq_x) + _per_channel(eq_b)).to(dtype)


class CudnnGraphs:
    """The pieces as cuDNN graphs on `device` in `io_dtype`; `extension`: lgc_fast._C (or a stand-in with its
    cudnn_conv_graph / cudnn_conv_graph_check / cudnn_conv_graph_plans). `plans`: how many of cuDNN's heuristic plans
    each graph builds and times once, when it is built, the fastest then running (1: the first that builds, untimed).
    `mask`: "rng" or "byte" (module docstring). Same methods as TorchGraphs."""

    name = "cudnn"
    fresh_top_mask = True  # its interior masks are cuDNN's own anyway
    stores_operands = False
    uses_seed = True  # the RNG op's seed, or the byte masks'

    def __init__(self, extension, device: torch.device, io_dtype: torch.dtype, plans: int = 1, mask: str = "rng"):
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, not {mask!r}")
        self.ext, self.device, self.io, self.plans = extension, torch.device(device), io_dtype, int(plans)
        self.mask = mask
        self.io_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[io_dtype]

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.io

    def conv_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A filter as the graphs take it, in the io dtype, channels_last: cast once a forward, not once a graph."""
        return self._act(w)

    def keep_mask(self, keep: Optional[KeepSpec], like: torch.Tensor):
        """The form a block's mask is kept in between its graphs: for the RNG's masks its seed and offset on the device
        (RngKeep); for byte masks, the mask it names drawn once, (N, C, H, W) uint8 channels_last like `like`."""
        if keep is None:
            return None
        if self.mask == "rng":
            return RngKeep(self._scalar(keep.seed), self._scalar(keep.offset), keep.p)
        mask = stack_keep_mask(keep.seed, keep.offset, like.shape, keep.p, like.device, torch.uint8)
        return mask.contiguous(memory_format=torch.channels_last)

    def _act(self, t):
        return t.to(self.io).contiguous(memory_format=torch.channels_last)

    def _empty(self, shape, dtype=None, channels_last=True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=dtype or self.io, device=self.device, memory_format=fmt)

    def _channels(self, v):
        return v.to(device=self.device, dtype=torch.float32).contiguous()

    def _zeros(self, count: int, c: int):
        """`count` zeroed (c,) float32 vectors from one fill (sums are zeroed in case an engine accumulates)."""
        return torch.zeros(count, c, dtype=torch.float32, device=self.device).unbind(0)

    def _scalar(self, value: int):
        # a fill kernel with the value as its argument: no copy from pageable host memory, which may wait for the
        # stream, and nothing a CUDA graph capture refuses
        return torch.full((1,), int(value), dtype=torch.int64, device=self.device)

    def _prologue_tensors(self, tensors, prologue):
        """Adds s, b (and the RNG's seed and offset) of a prologue; returns (sbr, mask, keep probability)."""
        if prologue is None:
            return False, "none", 1.0
        terms, keep = prologue
        tensors["s"], tensors["b"] = self._channels(terms.s), self._channels(terms.b)
        return (True,) + self._mask_tensors(tensors, keep)

    def _mask_tensors(self, tensors, keep):
        if keep is None:
            return "none", 1.0
        if isinstance(keep, torch.Tensor):  # keep_mask's byte mask
            tensors["m"] = keep
            return "byte", 1.0
        tensors["seed"], tensors["offset"] = keep.seed, keep.offset  # keep_mask's RngKeep
        return "rng", 1.0 - keep.p

    def _dy_tensors(self, tensors, dy) -> bool:
        if isinstance(dy, torch.Tensor):
            tensors["dy"] = self._act(dy)
            return False
        g, z, eq_dy, eq_x, eq_b = dy
        tensors.update(dy_g=self._act(g), dy_z=self._act(z), dy_eq_dy=self._channels(eq_dy),
                       dy_eq_x=self._channels(eq_x), dy_eq_b=self._channels(eq_b))
        return True

    def fprop(self, inp, w, dilation, prologue=None):
        n, c, h, width = inp.shape
        k, r = w.shape[0], w.shape[-1]
        y, (total, sq_total) = self._empty((n, k, h, width)), self._zeros(2, k)
        tensors = {"x": self._act(inp), "w": self._act(w), "y": y, "sum": total, "sq_sum": sq_total}
        sbr, mask, keep_probability = self._prologue_tensors(tensors, prologue)
        self.ext.cudnn_conv_graph("fprop", sbr, mask, True, False, False, [n, c, k, h, width, r, dilation],
                                  keep_probability, tensors, self.plans)
        return y, total, sq_total

    def wgrad(self, inp, w_shape, dy, dilation, prologue=None):
        n, c, h, width = inp.shape
        k, r = w_shape[0], w_shape[-1]
        dw = self._empty(tuple(w_shape))
        tensors = {"x": self._act(inp), "w": dw}
        sbr, mask, keep_probability = self._prologue_tensors(tensors, prologue)
        dbn_apply = self._dy_tensors(tensors, dy)
        self.ext.cudnn_conv_graph("wgrad", sbr, mask, False, False, dbn_apply, [n, c, k, h, width, r, dilation],
                                  keep_probability, tensors, self.plans)
        return dw

    def dgrad(self, dy, w, in_shape, dilation, epilogue=None):
        n, c, h, width = in_shape
        k, r = w.shape[0], w.shape[-1]
        tensors = {"w": self._act(w)}
        dbn_apply = self._dy_tensors(tensors, dy)
        shape = [n, c, k, h, width, r, dilation]
        if epilogue is None:
            tensors["dx"] = dx = self._empty((n, c, h, width))
            self.ext.cudnn_conv_graph("dgrad", False, "none", False, False, dbn_apply, shape, 1.0, tensors,
                                      self.plans)
            return dx
        z_prev, terms, keep, batch_stats = epilogue
        mask, keep_probability = self._mask_tensors(tensors, keep)
        sums = ("dgamma", "dbeta", "eq_dy", "eq_x", "eq_b")
        out = {"g": self._empty((n, c, h, width)), **dict(zip(sums, self._zeros(len(sums), c)))}
        tensors.update(z=self._act(z_prev), s=self._channels(terms.s), b=self._channels(terms.b),
                       mean=self._channels(terms.mean), invstd=self._channels(terms.invstd),
                       gamma=self._channels(terms.gamma_eff), **out)
        self.ext.cudnn_conv_graph("dgrad", False, mask, False, True, dbn_apply, shape, keep_probability, tensors,
                                  self.plans)
        if not batch_stats:  # running statistics: BatchNorm is affine, the batch terms of dz vanish
            out["eq_x"].zero_()
            out["eq_b"].zero_()
        return out["g"], out["dgamma"], out["dbeta"], (out["eq_dy"], out["eq_x"], out["eq_b"])

    def unbuildable(self, x_shape, weight_shapes, dilation: int, dropout_p: float, training: bool,
                    backward: bool) -> list[str]:
        """cuDNN's reasons for every graph of such a stack that does not build (none: the stack can run here), the
        backward's too where `backward`; builds (and, for plans > 1, times) and caches those that do, so the step's
        first run compiles nothing more."""
        reasons = []
        for graph in _stack_graph_list(x_shape, weight_shapes, dilation, dropout_p, training, backward, self.mask):
            why = self.ext.cudnn_conv_graph_check(*graph, self.io_name, self.device.index or 0, self.plans)
            if why:
                reasons.append(f"{_describe(graph)}: {why}")
        return reasons

    def plan_report(self, x_shape, weight_shapes, dilation: int, dropout_p: float, training: bool,
                    backward: bool) -> list[dict]:
        """For every graph of such a stack (building those not built yet): its description and the plans built for
        it, each {"name", "median_ms" (None where plans were not timed), "chosen"}."""
        report = []
        for graph in _stack_graph_list(x_shape, weight_shapes, dilation, dropout_p, training, backward, self.mask):
            plans = self.ext.cudnn_conv_graph_plans(*graph, self.io_name, self.device.index or 0, self.plans)
            report.append({"graph": _describe(graph), "plans": [
                {"name": name, "median_ms": None if ms < 0 else ms, "chosen": chosen} for name, ms, chosen in plans]})
        return report


def _stack_graph_list(x_shape, weight_shapes, dilation: int, dropout_p: float, training: bool,
                      backward: bool, mask_mode: str = "rng") -> list[tuple]:
    """The graphs a stack of this shape runs with masks of `mask_mode`, each as cudnn_conv_graph_check's leading
    arguments (conv, sbr, mask, stats, dbn, dbn_apply, shape, keep_probability: the RNG's alone)."""
    n, c, h, width = x_shape
    dropping = training and dropout_p > 0
    mask = mask_mode if dropping else "none"
    keep_probability = 1.0 - dropout_p if mask == "rng" else 1.0
    graphs = []
    for i, w_shape in enumerate(weight_shapes):
        k, r = w_shape[0], w_shape[-1]
        shape = [n, c, k, h, width, r, dilation]
        # the first block's input is plain; the top block's dy is bn_relu_dropout's gradient, a plain tensor
        first, top = i == 0, i == len(weight_shapes) - 1
        m, prob = ("none", 1.0) if first else (mask, keep_probability)
        graphs.append(("fprop", not first, m, True, False, False, shape, prob))
        if backward:
            graphs.append(("wgrad", not first, m, False, False, not top, shape, prob))
            if first:
                graphs.append(("dgrad", False, "none", False, False, not top, shape, 1.0))
            else:
                graphs.append(("dgrad", False, mask, False, True, not top, shape, keep_probability))
        c = k
    return graphs


def _describe(graph: tuple) -> str:
    conv, sbr, mask, stats, dbn, dbn_apply, shape, _ = graph
    return f"{conv} (prologue {sbr}, mask {mask}, stats {stats}, dbn {dbn}, dbn_apply {dbn_apply}, shape {shape})"
