"""Compile every Triton kernel of lgc_fast for sm_90 (H100/H200) with Triton's own ptxas, as its launcher would
specialise it for typical shapes, without a GPU. Run by tests/test_triton_sm90.py in a process of its own (the
interpreter, which the other tests switch on, replaces triton.jit's compiler).

Prints a JSON line {"triton", "skip" (why this Triton cannot compile them, or null), "tensor_descriptors"}, then one
per compiled kernel: {"kernel", "case", "cubin_bytes", "shared_bytes", "wgmma", "tma_loads" (the
PTX's Hopper matrix and tensor-memory instructions), "wgmma_serialized" (for a kernel with wgmma: whether ptxas -v
reports C7515, each wgmma made to wait for the one before; else null)} (dilated_conv and the fused_conv kernels add
"shared_bound_bytes", the autotuner's pruning estimate); exits non-zero with the compiler's error on the first kernel
that does not compile.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - Triton before 3.0
    GPUTarget = ASTSource = None

from lgc_fast.kernels import (bn_relu_dropout, dilated_conv, fit_shape, fused_conv, fused_conv_wgrad, kernel_conv,
                              lgc_loss)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import wgmma_serialized  # noqa: E402  (bench/common.py: ptxas's notes)

TARGET = GPUTarget("cuda", 90, 32) if GPUTarget is not None else None
PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, case: str,
                 extra: dict | None = None) -> None:
    """types: argument name -> Triton type ("*fp32", "i32", ...) for every argument not in constexprs; extra: more
    fields for the JSON line."""
    while not isinstance(fn, triton.runtime.JITFunction):  # an autotuner (or heuristics) wraps the jit function
        fn = fn.fn
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, attrs={},
                       constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    wgmma = ptx.count("wgmma.mma_async")
    print(json.dumps({"kernel": fn.__name__, "case": case, "cubin_bytes": len(compiled.asm["cubin"]),
                      "shared_bytes": compiled.metadata.shared, "wgmma": wgmma,
                      "tma_loads": ptx.count("cp.async.bulk.tensor"),
                      "wgmma_serialized": wgmma_serialized(ptx) if wgmma else None, **(extra or {})}), flush=True)


def ints(*names: str) -> dict:
    return dict.fromkeys(names, "i32")


def kernel_conv_cases() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        fp64 = dtype == torch.float64
        band = PTR[torch.float64 if fp64 else torch.float32]
        types = {"x_ptr": PTR[dtype], "y_ptr": PTR[dtype], "row_band_ptr": band, "col_band_ptr": band,
                 **ints("channels", "height", "width", "tiles_w", "sx_n", "sx_c", "sx_h", "sx_w",
                        "sy_n", "sy_c", "sy_h", "sy_w")}
        for side in (96, 1024):  # one whole tile / tiles with halos
            tile_h, in_h, halo_h = kernel_conv._side_tiling(side, kernel_conv._WHOLE_ROWS)
            tile_w, in_w, halo_w = kernel_conv._side_tiling(side, kernel_conv._WHOLE_COLS)
            meta = dict(TILE_H=tile_h, IN_H=in_h, HALO_H=halo_h, TILE_W=tile_w, IN_W=in_w, HALO_W=halo_w,
                        BLOCK_K=min(kernel_conv._CHUNK, in_h), BLOCK_N=min(kernel_conv._CHUNK, in_w),
                        INPUT_PRECISION="ieee" if fp64 else "tf32x3", ACC_FP64=fp64)
            compile_sm90(kernel_conv._kernel_conv_tile, types, meta, 8, 2, f"{dtype} {side}x{side}")


def lgc_loss_cases() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        local = torch.empty(2, 68, 96, 96, dtype=dtype)
        _, _, _, meta = lgc_loss._launch_args(local, torch.zeros(2, 68, 2), torch.ones(2, 68, dtype=torch.bool))
        num_warps = lgc_loss.gpu_num_warps(meta["BLOCK_H"], meta["BLOCK_W"])
        maps = {"local_ptr": PTR[dtype], "omega_ptr": PTR[dtype], "points_ptr": "*fp32", "lab_ptr": "*u8",
                "taps_ptr": "*fp32", **ints("C", "H", "W")}
        compile_sm90(lgc_loss._lgc_loss_fwd_kernel, {**maps, "plane_loss_ptr": "*fp32"}, meta, num_warps, 3,
                     f"forward {dtype} 96x96")
        compile_sm90(lgc_loss._lgc_loss_bwd_kernel, {**maps, "grad_ptr": "*fp32", "grad_local_ptr": PTR[dtype],
                                                     "grad_omega_ptr": PTR[dtype]}, meta, num_warps, 3,
                     f"backward {dtype} 96x96")


def fit_shape_cases() -> None:
    for dtype in (torch.float32, torch.float16, torch.float64):
        acc = PTR[torch.float64 if dtype == torch.float64 else torch.float32]
        types = {"x_ptr": PTR[dtype], "peak_ptr": acc, "centers_ptr": acc, "params_ptr": "*fp64", "out_ptr": acc,
                 **ints("height", "width", "n_thresholds")}
        for radius in (None, 20.0, 7.0):
            block_h, block_w = fit_shape._blocks(96, 96, radius)
            meta = dict(WINDOWED=radius is not None, ACC_FP64=dtype == torch.float64, BLOCK_H=block_h,
                        BLOCK_W=block_w)
            compile_sm90(fit_shape._fit_shape_stats_kernel, types, meta, 4, 3, f"{dtype} window {radius}")


def dilated_conv_cases() -> None:
    """The first two configs the autotuner keeps for the release's 136 -> 128 channels, per dtype."""
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"),
                             (torch.float64, "ieee")):
        vec = 16 // torch.tensor([], dtype=dtype).element_size()
        acc = PTR[torch.float64 if dtype == torch.float64 else torch.float32]
        types = {"x_ptr": PTR[dtype], "w_ptr": PTR[dtype], "scale_ptr": acc, "shift_ptr": acc,
                 "keep_ptr": "*u8", "y_ptr": PTR[dtype],
                 **ints("n_pix", "height", "width", "c_in", "c_out", "sx_n", "sx_c", "sx_h", "sx_w",
                        "sy_n", "sy_c", "sy_h", "sy_w", "sk_n", "sk_c", "sk_h", "sk_w")}
        named_args = {"c_in": 136, "c_out": 128, "x_ptr": torch.empty(0, dtype=dtype)}
        for config in dilated_conv.prune_configs(dilated_conv.gpu_configs(), named_args)[:2]:
            meta = dict(DILATION=4, EPILOGUE=True, CLAMP_ABOVE=False, HAS_MASK=True, INPUT_PRECISION=precision,
                        ACC_FP64=dtype == torch.float64, DOT_IN_FP32=False, USE_INT64=False, VEC=vec, OUT_VEC=vec,
                        **config.kwargs)
            bound = dilated_conv.shared_bytes_bound(config, torch.tensor([], dtype=dtype).element_size())
            compile_sm90(dilated_conv.dilated_conv_kernel, types, meta, config.num_warps, config.num_stages,
                         f"{dtype} {config.kwargs}", extra={"shared_bound_bytes": bound})


def fused_conv_cases() -> None:
    """The first two configs the autotuner keeps for the release's 3x3 dilation-4 128 -> 128 channels, per dtype:
    the forward as a plain convolution and with the BatchNorm / ReLU / dropout prologue and the statistics, the input
    gradient with BatchNorm backward's apply and the gate epilogue, both with and without storing the prologue's
    result, and the filter gradient on plain operands, with the activation's prologue and with both prologues; each
    descriptor's box is its config's tile. 128 channels make every chunk whole (WHOLE_*: no masks); in bfloat16 the
    two stored modes also compile for chunks that may run past the channels (the general path, as for 136)."""
    k = fused_conv
    modes = [("forward plain", k.PROLOGUE_NONE, k.EPILOGUE_STATS, False),
             ("forward prologue", k.PROLOGUE_BN, k.EPILOGUE_STATS, False),
             ("forward prologue stored", k.PROLOGUE_BN, k.EPILOGUE_STATS, True),
             ("input gradient", k.PROLOGUE_DBN, k.EPILOGUE_GATE, False),
             ("input gradient stored", k.PROLOGUE_DBN, k.EPILOGUE_GATE, True)]
    wgrad_modes = [("plain", False, False), ("prologue", True, False), ("both prologues", True, True)]
    for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"),
                             (torch.float64, "ieee")):
        acc = PTR[torch.float64 if dtype == torch.float64 else torch.float32][1:]
        element_size = torch.tensor([], dtype=dtype).element_size()
        common = dict(KSIZE=3, DILATION=4, ACC_FP64=dtype == torch.float64, INPUT_PRECISION=precision,
                      DOT_IN_FP32=False, USE_INT64=False)
        partial = [(f"{name}, partial chunks", *rest, False) for name, *rest in modes if rest[-1]]
        for name, prologue, epilogue, store, whole in [(*m, True) for m in modes] + (
                partial if dtype == torch.bfloat16 else []):
            for config in k.kept_configs(k.gpu_configs(), 128, element_size, prologue, epilogue, store)[:2]:
                meta = dict(common, PROLOGUE=prologue, HAS_KEEP=prologue == k.PROLOGUE_BN, EPILOGUE=epilogue,
                            E_HAS_KEEP=epilogue == k.EPILOGUE_GATE, STORE_PROLOGUE=store, WHOLE_K=whole,
                            WHOLE_N=whole, **config.kwargs)
                bound = k.shared_bytes_bound(config, element_size, prologue, epilogue, store)
                compile_sm90(k.fused_conv_kernel, k.signature_types(PTR[dtype][1:], acc, config), meta,
                             config.num_warps, config.num_stages, f"{dtype} {config.kwargs} {name}",
                             extra={"shared_bound_bytes": bound})
        wgrad = fused_conv_wgrad
        for name, prologue, dbn in wgrad_modes:
            for config in wgrad.kept_configs(wgrad.gpu_configs(), 128, 128, element_size, dbn, prologue)[:2]:
                meta = dict(common, PROLOGUE=prologue, HAS_KEEP=prologue, DBN=dbn, WHOLE_M=True, WHOLE_N=True,
                            **config.kwargs)
                compile_sm90(wgrad.fused_conv_wgrad_kernel, wgrad.signature_types(PTR[dtype][1:], acc, config), meta,
                             config.num_warps, config.num_stages, f"{dtype} {config.kwargs} filter gradient {name}",
                             extra={"shared_bound_bytes": wgrad.shared_bytes_bound(config, element_size, dbn,
                                                                                   prologue)})


def bn_relu_dropout_cases() -> None:
    """The four epilogue kernels for a channels_last 128-channel map in every dtype with seeded dropout, for a
    contiguous one in bfloat16 with a mask tensor and a channels_last one with keep bits, and the mask kernel; the
    channel stride 1 (channels_last) or pixel stride 1 (contiguous) as the launcher specialises it."""
    module = bn_relu_dropout
    kernels = {
        "_moments_kernel": ("z", "part"),
        "_apply_kernel": ("z", "keep", "seed", "y", "scale", "shift"),
        "_grad_sums_kernel": ("dy", "z", "keep", "seed", "scale", "shift", "center", "part"),
        "_grad_apply_kernel": ("dy", "z", "keep", "seed", "dz", "scale", "shift", "k1", "k0"),
    }
    strided = {"z": "z", "dy": "dy", "keep": "k", "y": "y", "dz": "dz"}
    cases = [(d, True, module.SEEDED) for d in (torch.bfloat16, torch.float32, torch.float16, torch.float64)]
    cases += [(torch.bfloat16, False, module.MASK), (torch.bfloat16, True, module.BITS)]
    for dtype, channels_last, dropout in cases:
        fp64 = dtype == torch.float64
        z = torch.empty(16, 128, 96, 96, dtype=dtype)
        if channels_last:
            z = z.to(memory_format=torch.channels_last)
        block_p, block_c = module.tile_shape(z)
        acc = PTR[torch.float64 if fp64 else torch.float32]
        maps = {"keep": "*u8", "seed": "*i64", "z": PTR[dtype], "dy": PTR[dtype], "y": PTR[dtype], "dz": PTR[dtype]}
        for name, pointers in kernels.items():
            types = {f"{p}_ptr": maps.get(p, acc) for p in pointers}
            constexprs = dict(ACC=tl.float64 if fp64 else tl.float32, BLOCK_P=block_p, BLOCK_C=block_c)
            for p in pointers:
                if p in strided:
                    prefix = strided[p]
                    types.update(ints(f"{prefix}_sn", f"{prefix}_sc", f"{prefix}_sp"))
                    constexprs[f"{prefix}_sc" if channels_last else f"{prefix}_sp"] = 1
            types.update(ints("C", "P", "NPB"), out_scale="fp64", dropout_p="fp32")
            if "keep" in pointers:
                constexprs["DROPOUT"] = dropout
            if name == "_grad_apply_kernel":
                constexprs["CENTERED"] = True
            for arg in constexprs:
                types.pop(arg, None)
            compile_sm90(getattr(module, name), types, constexprs, 8, 3,
                         f"{dtype} {'channels_last' if channels_last else 'contiguous'} dropout mode {dropout}")
    block_p, block_c = module.tile_shape(torch.empty(16, 128, 96, 96, dtype=torch.uint8))
    compile_sm90(module._keep_mask_kernel, {"seed_ptr": "*i64", "dropout_p": "fp32", "out_ptr": "*u8",
                                            **ints("C", "P", "NPB", "o_sn", "o_sc"), "o_sp": "i32"},
                 dict(BLOCK_P=block_p, BLOCK_C=block_c, o_sp=1), 8, 3, "uint8 contiguous")


def unusable() -> str | None:
    """Why this Triton cannot compile the cases, or None."""
    if ASTSource is None:
        return f"triton {triton.__version__} has no GPUTarget / ASTSource compiler API"
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return "this Triton installation has no NVIDIA backend"
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return f"triton {triton.__version__}'s compiler API predates ASTSource(constexprs=), which this script uses"
    return None


if __name__ == "__main__":
    reason = unusable()
    print(json.dumps({"triton": triton.__version__, "skip": reason,
                      "tensor_descriptors": fused_conv.TensorDescriptor is not None}), flush=True)
    if reason is not None:
        sys.exit(0)
    for cases in (kernel_conv_cases, lgc_loss_cases, fit_shape_cases, dilated_conv_cases, bn_relu_dropout_cases):
        cases()
    if fused_conv.TensorDescriptor is not None:  # Triton 3.4 on
        fused_conv_cases()
    sys.exit(0)
