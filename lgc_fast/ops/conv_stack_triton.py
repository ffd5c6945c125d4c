"""conv_stack's pieces as lgc_fast's own Triton kernels (``TritonGraphs``, the same methods as conv_stack_graphs'
TorchGraphs and CudnnGraphs; lgc_fast/ops/conv_stack.py says how they chain):

  fprop   kernels/fused_conv.py with the previous block's BatchNorm-apply, ReLU and dropout as the prologue and z's
          per-channel sums as the epilogue (``fused_conv``'s kernel);
  dgrad   the same kernel on the filter rotated by 180 degrees (stride 1, symmetric padding), with BatchNorm
          backward's apply, dz = eq_dy * g + eq_x * z + eq_b, as the prologue and, for an interior block, the previous
          block's dropout and ReLU gates and BatchNorm's backward sums as the epilogue;
  wgrad   kernels/fused_conv_wgrad.py, split over the pixels (partial blocks added in float64), on the activation and
          dz as fprop and dgrad stored them (operands="stored": their kernels write each value once, at the centre
          tap, and the filter gradient's loop is a plain GEMM's) or made again in its own prologues ("remade": no
          activation kept, the prologues run at each of the r*r taps).

Maps are channels_last in the io dtype (x's: float32, float16, bfloat16 or float64) with per-channel terms in
float32 (float64 for float64); the keep masks are keep bits, 1 bit a value, kept from the forward for the backward.
They work where cuDNN cannot fuse (its 9.19 graphs refuse these prologues for this network: README, performance) and
on any channel counts the descriptors take (``triton_unusable``).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from lgc_fast import _backend
from lgc_fast.ops.bn_relu_dropout import fused_backend, pack_keep_mask, random_keep_bits
from lgc_fast.ops.conv_stack_graphs import BnTerms, KeepSpec, bn_backward_eq, keep_tensor

KEEP_MODES = ("fresh", "seeded")
OPERAND_MODES = ("stored", "remade")
_CL = torch.channels_last


def _kernels():
    return importlib.import_module("lgc_fast.kernels.fused_conv")


@torch.compiler.assume_constant_result  # dynamo cannot trace the import; a compiled graph takes the answer as it is
def _descriptors_missing() -> str:
    """Why this Triton cannot run the kernels' host tensor descriptors ("": it can)."""
    if _kernels().TensorDescriptor is not None:
        return ""
    import triton
    return f"triton {triton.__version__} has no host tensor descriptors (Triton 3.4 or later)"


def triton_unusable(x: torch.Tensor, weights) -> list[str]:
    """Why conv_stack cannot run this stack on TritonGraphs (none: it can): Triton without host tensor descriptors
    (before 3.4), x not where Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1), a dtype the kernels lack, or a
    channel count whose rows are not 16-byte multiples (the descriptors' need; Cin and Cout multiples of 8 for 16-bit
    types, 4 for float32, 2 for float64)."""
    why = _descriptors_missing()
    if why:
        return [why]
    ok, why = _backend._usable("triton", x.device)
    if not ok:
        return [why]
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return [f"x is {x.dtype}; the kernels take float32, float16, bfloat16 or float64"]
    row_unit = 16 // x.element_size()
    counts = [("x's channels", x.shape[1])] + [(f"weights[{i}]'s Cout", w.shape[0]) for i, w in enumerate(weights)]
    return [f"{name} = {count} is not a multiple of {row_unit} ({x.dtype} rows of 16-byte multiples)"
            for name, count in counts if count % row_unit]


class TritonGraphs:
    """The pieces as Triton kernels on maps of `io_dtype` (module docstring). `masks`: "fresh" draws each interior
    block's keep bits from torch's generator (the compiled kernels' packed draw where they run: the fast way);
    "seeded" packs the mask of conv_stack's (seed, offset) KeepSpec, the one conv_stack_ref draws (a float map
    drawn and packed: for tests that compare with it). `operands`: how the filter gradient gets its operands
    (module docstring): "stored" keeps each interior block's activation from the forward (one map a block) and has
    dgrad write dz; "remade" makes both again in the filter gradient's prologues."""

    name = "triton"

    def __init__(self, io_dtype: torch.dtype, masks: str = "fresh", operands: str = "stored"):
        if masks not in KEEP_MODES:
            raise ValueError(f"masks must be one of {', '.join(KEEP_MODES)}, not {masks!r}")
        if operands not in OPERAND_MODES:
            raise ValueError(f"operands must be one of {', '.join(OPERAND_MODES)}, not {operands!r}")
        self.io, self.masks, self.operands = io_dtype, masks, operands
        # conv_stack asks fprop and dgrad for the filter gradient's operands (made_out) where this is set
        self.stores_operands = operands == "stored"
        self.acc = torch.float64 if io_dtype == torch.float64 else torch.float32
        # the top block's mask may be drawn afresh where the interior ones are
        self.fresh_top_mask = masks == "fresh"
        self.uses_seed = masks == "seeded"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.io

    def conv_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.io).contiguous()

    def keep_mask(self, keep: Optional[KeepSpec], like: torch.Tensor):
        """A block's mask as keep bits in `like`'s channels_last order (``fused_conv``'s keep_bits)."""
        if keep is None:
            return None
        if self.masks == "seeded":
            return pack_keep_mask(keep_tensor(keep, like), memory_format=_CL)
        return random_keep_bits(like.contiguous(memory_format=_CL), keep.p, fused_backend(like.device))

    def _map(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.io).contiguous(memory_format=_CL)

    def _vector(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.acc).contiguous()

    def _empty(self, shape, device) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=self.io, device=device, memory_format=_CL)

    def new_map(self, like: torch.Tensor) -> torch.Tensor:
        """An empty map of `like`'s shape as the kernels write it (made_out)."""
        return self._empty(like.shape, like.device)

    def _bn_prologue(self, prologue):
        if prologue is None:
            return None
        terms, keep_bits = prologue
        return _kernels().BnPrologue(self._vector(terms.s), self._vector(terms.b), keep_bits)

    def _dbn(self, dy):
        """dy as the kernels take it: (the map, None) for a plain gradient, else (g, its DbnPrologue)."""
        if isinstance(dy, torch.Tensor):
            return self._map(dy), None
        g, z, eq_dy, eq_x, eq_b = dy
        kernels = _kernels()
        return self._map(g), kernels.DbnPrologue(self._map(z), *(self._vector(v) for v in (eq_dy, eq_x, eq_b)))

    def fprop(self, inp, w, dilation, prologue=None, made_out=None):
        """(z, sum, sq_sum) of conv(prologue(inp), w) (TorchGraphs.fprop); with made_out (``new_map(inp)``, a
        prologue given) the activation prologue(inp) written there too."""
        kernels, x = _kernels(), self._map(inp)
        n, _, h, width = x.shape
        z = self._empty((n, w.shape[0], h, width), x.device)
        sums = kernels.new_partial_sums(n, h, width, w.shape[0], self.acc, x.device)
        kernels.fused_conv_triton(x, kernels.pack_filter(w), w.shape[-1], dilation, z,
                                  prologue=self._bn_prologue(prologue), sums=sums, prologue_out=made_out)
        return z, kernels.add_partials(sums[0], self.acc), kernels.add_partials(sums[1], self.acc)

    def wgrad(self, inp, w_shape, dy, dilation, prologue=None):
        """The filter gradient (TorchGraphs.wgrad), in float32 (float64)."""
        wgrad = importlib.import_module("lgc_fast.kernels.fused_conv_wgrad")
        dz, dbn = self._dbn(dy)
        return wgrad.fused_conv_wgrad_triton(self._map(inp), dz, w_shape[-1], dilation,
                                             prologue=self._bn_prologue(prologue), dbn=dbn)

    def dgrad(self, dy, w, in_shape, dilation, epilogue=None, made_out=None):
        """The input gradient (TorchGraphs.dgrad): da, or with an epilogue (z_prev, BnTerms, keep bits, batch_stats)
        (g, dgamma_eff, dbeta_eff, (eq_dy, eq_x, eq_b)) of the previous block; with made_out (``new_map(g)``, dy
        BatchNorm backward's (g, z, eq_dy, eq_x, eq_b)) its dz written there too."""
        kernels = _kernels()
        dz, dbn = self._dbn(dy)
        n, c, h, width = in_shape
        out = self._empty(in_shape, dz.device)
        w_packed = kernels.pack_filter(w, transposed=True)
        if epilogue is None:
            kernels.fused_conv_triton(dz, w_packed, w.shape[-1], dilation, out, prologue=dbn, prologue_out=made_out)
            return out
        z_prev, terms, keep_bits, batch_stats = epilogue
        terms = BnTerms(*(self._vector(v) for v in terms))
        gate = kernels.Gate(self._map(z_prev), terms.s, terms.b, terms.mean, terms.invstd, keep_bits)
        sums = kernels.new_partial_sums(n, h, width, c, self.acc, dz.device)
        kernels.fused_conv_triton(dz, w_packed, w.shape[-1], dilation, out, prologue=dbn, gate=gate, sums=sums,
                                  prologue_out=made_out)
        dgamma, dbeta = kernels.add_partials(sums[0], self.acc), kernels.add_partials(sums[1], self.acc)
        return out, dgamma, dbeta, bn_backward_eq(terms, dgamma, dbeta, n * h * width, batch_stats)
