#!/usr/bin/env bash
# The first thing to run where a GPU is lent (CUDA torch and Triton already installed, no registry needed):
#   bash bench/gpu_session.sh [tests|crash|convs|cudnn|cudnn_local|stacks|stacks_tuned|ops|train|graphs|ncu|all]
#   bash bench/gpu_session.sh epilogue
#   bash bench/gpu_session.sh fused_conv
#   (default all)
# builds the CUDA extension in place (incrementally after the first call; with the cuDNN conv graphs of conv_stack,
# from torch's cuDNN headers or, where its package has none, those carried in .gpu/cudnn/include), then
#   tests  the whole test suite, the GPU tests of every op (each backend against its reference) included;
#   crash  the check of session 29's fix for the crash on native argument errors (this machine's CXX linked
#          libstdc++ statically, setup.py now links the shared one): tests/test_extension_link.py (the extension
#          needs libstdc++.so.6 and carries no copy of it), and a native op's argument error raises RuntimeError;
#   convs  which of cuDNN's kernel families (forward, or the transposed convolution's data-gradient kernels) is faster
#          for each of the network's convolution shapes, forward and input gradient, at batch 128 bf16 channels_last
#          (bench/bench_same_conv2d.py, with the choices same_conv2d's "auto" made), and what the training step gains
#          from them (lgc_fast-fused, which takes them, against lgc_fast-fused-fprop, on the forward kernels only) at
#          batch 64, 128 and 256;
#   cudnn  whether cuDNN's runtime fusion takes the conv blocks' BN + ReLU (+ dropout mask) into the convolutions
#          (bench/bench_cudnn_fusion.py): built or not, checked against float64, timed against the plain graphs and
#          against torch's conv and lgc_fast's epilogue in the same run; the question #5's target turns on. It needs
#          cuDNN's headers: where torch's nvidia.cudnn package has none, extract them before the device call
#          (pip download --no-deps -d /tmp/w nvidia-cudnn-cu13 and unzip 'nvidia/cudnn/include/*' from it, then copy
#          that include folder to .gpu/cudnn/include) and carry .gpu. The global subnet's two layer shapes; each
#          layer's probe stops at 5 minutes, keeping the cases it finished. float16 first: built for a described
#          H100 without a GPU (session 28, bench/results/*.cudnn_fusion_deviceless.json), cuDNN 9.19's precompiled
#          engines take the BN-statistics epilogue and the BN-apply + ReLU prologue (no mask) in float16 only;
#          whether the runtime-fusion engines (masks, RNG, BN backward) build needs the driver, so this machine;
#   cudnn_local  the same for the local subnet's 3x3 and 5x5 layers (a device call of its own; its layers are added
#          to the results file beside the global ones);
#   stacks conv_stack on cuDNN's fused graphs (bench/bench_conv_stack.py: the global subnet's seven blocks against
#          the modules with fused epilogues, same run; each graph on heuristics' first plan and on the fastest of
#          four timed) and the training step with them (lgc_fast-stacks) against lgc_fast-fused at batch 64, 128
#          and 256;
#   stacks_tuned  the training step with each graph on the fastest of four plans (lgc_fast-stacks-tuned) against
#          lgc_fast-fused at batch 128, into a file of its own in $LOGS;
#   ops    the op benches whose GPU figures are open: bn_relu_dropout on both kernel backends (cuda, triton), with
#          byte masks, keep bits and seeds, against eager torch and torch.compile, and its per-call overhead case;
#          kernel_conv; the layout ops (planar heads) against the torch forms they replace; conv_stack's BatchNorm
#          finalize (one launch) against its torch reference (a dozen) per call;
#   train  the training step: eager-ref, lgc_fast (torch's BN/ReLU/dropout modules), fused epilogues (the automatic
#          backend, cuda: keep bits drawn in the op) and the fused step with channels_last heads (before the planar
#          heads), at batch 16 (lgc-fast train's default, where per-call host work shows), 32
#          (FUSED_EPILOGUE_MIN_CUDA_BATCH), 64, 128 and 256;
#   graphs the compiled steps (torch.compile default, each batch size compiles anew, so batch 16 and 128 only) and the
#          fused step and the Triton stacks' step (one graph: the stacks are registered ops) under CUDA graphs
#          (--compile reduce-overhead) at batch 16 and 64, each into a file of its own in
#          $LOGS (a results key keeps one compile mode); then the profile of the fused step (bench/profile_gpu.py);
#   ncu    Nsight Compute's view (bandwidth, occupancy, stalls) of the epilogue's kernels at the training step's
#          layer shape, 128 x 128 x 96 x 96 bf16 channels_last, with keep bits drawn before and inside the op.
#   epilogue  (not in all: it rebuilds the extension for each variant but the first) the conv-block epilogue's
#          kernels compiled for more blocks a SM and/or fewer load steps a thread (csrc/cuda/bn_relu_dropout.cu's
#          LGC_EPILOGUE_* macros through LGC_FAST_NVCC_FLAGS; session 29's ncu: 25 % occupancy, 50-63 % of the DRAM
#          peak), each timed by bench_bn_relu_dropout.py at batch 128 (eager torch in the same run) and in the training
#          step at batch 128 (torch's modules, which use none of these kernels, in the same run), into
#          $LOGS/epilogue_<variant>.json and epilogue_train_<variant>.json; EPILOGUE_VARIANTS picks (default: all four;
#          two a device call keep each call under its 10 minutes); the default build is restored at the end.
#   fused_conv  (not in all) our own convolution with conv_stack's forward fusions (lgc_fast.ops.fused_conv, Triton on
#          tensor-memory loads and wgmma; compiled for sm_90 here only): its GPU tests (one autotuner config a shape;
#          every kept config of the release's 128-channel layer once, tests/test_fused_conv_configs.py), then
#          bench_fused_conv.py at batch 128 bf16 for the four layer shapes: the plain kernel against cuDNN's
#          convolution (can our own convolution keep up?) and the fused block against lgc_fast's epilogue passes plus
#          cuDNN (what it saves); the fused input- and filter-gradient kernels against cuDNN's plain gradients (the
#          filter gradient on stored operands and with them remade). Then conv_stack's Triton pieces:
#          tests/test_conv_stack_triton.py, bench_conv_stack.py (the global subnet's seven blocks, Triton pieces with
#          stored and remade operands against cuDNN's graphs and the modules in the same run) and the training step at
#          batch 128 with the blocks as Triton stacks against lgc_fast-fused and the cuDNN stacks. FUSED_CONV_STEPS
#          picks among tests, kernels, stack and train (default: all four, in that order; the tests compile every
#          kept config of each mode, so one or two steps a device call keep each call under its 10 minutes).
# Results go to bench/results/<device>.json and its Markdown table (bench/run.py --render-only); logs and copies of
# the results to ./gpu_logs, and where $OUT (the device tool's output folder, which returns 8 files at most) is set,
# all of them as $OUT/gpu_logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=gpu_logs
mkdir -p "$LOGS"
pack_logs() { [[ -n ${OUT:-} ]] && tar czf "$OUT/gpu_logs.tgz" "$LOGS" bench/results; }
trap pack_logs EXIT
what=${1:-all}
export PIP_DISABLE_PIP_VERSION_CHECK=1

export MAX_JOBS=${MAX_JOBS:-$(nproc)}  # the CUDA sources take about a minute each per architecture
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the lent GPUs are Hopper: a build of about 110 s
export LGC_FAST_CUDNN_GRAPHS=${LGC_FAST_CUDNN_GRAPHS:-auto}  # off by default (setup.py); the sections here measure them
# where setup.py's lookup (lgc_fast/cudnn_location.py) finds no cuDNN headers beside torch, the carried ones
if [[ -z ${CUDNN_ROOT:-} && -f .gpu/cudnn/include/cudnn.h ]] &&
   ! python -c "import runpy; runpy.run_path('lgc_fast/cudnn_location.py')['cudnn_paths']()" 2>/dev/null; then
  export CUDNN_ROOT=$PWD/.gpu/cudnn  # carried headers; the library stays torch's
fi
if ! LGC_FAST_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1; then
  tail -60 "$LOGS/build.log"
  exit 1
fi
lgc-fast info | tee "$LOGS/info.txt"
# What a cuDNN graph-API route (BatchNorm statistics and apply fused into the convolutions) would build on: the
# library's version, its headers beside the wheel, the Python frontend.
python - <<'PROBE' 2>&1 | tee "$LOGS/cudnn_probe.txt"
import importlib.util, pathlib, torch
print("cudnn", torch.backends.cudnn.version())
spec = importlib.util.find_spec("nvidia.cudnn") if importlib.util.find_spec("nvidia") else None
roots = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
print("cudnn headers", sorted(str(h) for r in roots for h in r.glob("include/cudnn*.h")) or "none")
print("cudnn python frontend", "yes" if importlib.util.find_spec("cudnn") else "no")
PROBE
status=0

if [[ $what == tests || $what == all ]]; then
  # The whole suite (3 minutes with 14 xdist workers on an H100 in session 14); test_cuda_glue only runs compilers.
  parallel=$(python -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")
  python -m pytest -q -rs $parallel --ignore=tests/test_cuda_glue.py >"$LOGS/gpu_tests.log" 2>&1 || status=1
  grep -E "FAILED|ERROR|passed|failed" "$LOGS/gpu_tests.log" | tail -40
fi

if [[ $what == crash || $what == all ]]; then
  {
    echo "CXX=${CXX:-c++}: $(${CXX:-c++} --version | head -1)"
    python -m pytest -q -p no:cacheprovider tests/test_extension_link.py 2>&1 | tail -1
    python -c 'import torch, lgc_fast._C; torch.ops.lgc_fast_C.kernel_conv(torch.zeros(1, 8, 8), 1.0)' 2>&1 | tail -1
  } 2>&1 | tee "$LOGS/crash.txt"
  grep -q "^1 passed" "$LOGS/crash.txt" && grep -q "^RuntimeError" "$LOGS/crash.txt" || status=1
fi

if [[ $what == convs || $what == all ]]; then
  python bench/bench_same_conv2d.py 2>&1 | tee "$LOGS/bench_same_conv2d.txt" || status=1
  python bench/bench_train_step.py --batch-sizes 64 128 256 --budget-s 4 --ref-runs 1 \
    --modes lgc_fast-fused lgc_fast-fused-fprop --out "$LOGS/train_step_conv_via.json" 2>&1 \
    | tee "$LOGS/bench_train_step_conv_via.txt" || status=1
fi

if [[ $what == cudnn || $what == cudnn_local || $what == all ]]; then
  if [[ $what != cudnn_local ]]; then
    python bench/bench_cudnn_fusion.py --layers global global_first --dtypes fp16 bf16 2>&1 |
      tee "$LOGS/bench_cudnn_fusion.txt" || status=1
  fi
  if [[ $what != cudnn ]]; then
    python bench/bench_cudnn_fusion.py --layers local3 local5 --dtypes fp16 bf16 2>&1 |
      tee "$LOGS/bench_cudnn_fusion_local.txt" || status=1
  fi
fi

if [[ $what == stacks || $what == all ]]; then
  python bench/bench_conv_stack.py 2>&1 | tee "$LOGS/bench_conv_stack.txt" || status=1
  python bench/bench_train_step.py --batch-sizes 64 128 256 --budget-s 4 --ref-runs 1 \
    --modes lgc_fast-fused lgc_fast-stacks 2>&1 | tee "$LOGS/bench_train_step_stacks.txt" || status=1
fi

# Timing four plans a graph compiles four kernels a graph (about 24 graphs a batch size): batch 128 alone, in a device
# call of its own.
if [[ $what == stacks_tuned || $what == all ]]; then
  python bench/bench_train_step.py --batch-sizes 128 --budget-s 4 --ref-runs 1 \
    --modes lgc_fast-fused lgc_fast-stacks-tuned --out "$LOGS/train_step_stacks_tuned.json" 2>&1 \
    | tee "$LOGS/bench_train_step_stacks_tuned.txt" || status=1
fi

if [[ $what == ops || $what == all ]]; then
  python bench/bench_bn_relu_dropout.py --dtypes bf16 fp32 --layouts channels_last contiguous 2>&1 \
    | tee "$LOGS/bench_bn_relu_dropout.txt" || status=1
  python bench/bench_kernel_conv.py 2>&1 | tee "$LOGS/bench_kernel_conv.txt" || status=1
  python bench/bench_layout.py 2>&1 | tee "$LOGS/bench_layout.txt" || status=1
  python bench/bench_bn_finalize.py 2>&1 | tee "$LOGS/bench_bn_finalize.txt" || status=1
fi

# Each section is meant for one call of the device tool (at most 10 minutes a command).
if [[ $what == train || $what == all ]]; then
  python bench/bench_train_step.py --batch-sizes 16 32 64 128 256 --budget-s 4 --ref-runs 3 \
    --modes eager-ref lgc_fast lgc_fast-fused lgc_fast-fused-nhwc-heads 2>&1 \
    | tee "$LOGS/bench_train_step.txt" || status=1
fi

if [[ $what == graphs || $what == all ]]; then
  python bench/bench_train_step.py --batch-sizes 16 128 --budget-s 3 --ref-runs 1 --compile default \
    --modes lgc_fast-compiled lgc_fast-fused-compiled --out "$LOGS/train_step_compiled.json" 2>&1 \
    | tee "$LOGS/bench_train_step_compiled.txt" || status=1
  python bench/bench_train_step.py --batch-sizes 16 64 --budget-s 3 --ref-runs 1 --compile reduce-overhead \
    --modes lgc_fast-fused lgc_fast-fused-compiled lgc_fast-triton-stacks-compiled \
    --out "$LOGS/train_step_reduce_overhead.json" 2>&1 \
    | tee "$LOGS/bench_train_step_reduce_overhead.txt" || status=1
  python bench/bench_train_step.py --batch-sizes 128 --budget-s 3 --ref-runs 1 --compile default \
    --modes lgc_fast-fused-compiled lgc_fast-stacks-compiled lgc_fast-triton-stacks-compiled \
    --out "$LOGS/train_step_stacks_compiled.json" 2>&1 | tee "$LOGS/bench_train_step_stacks_compiled.txt" || status=1
  python bench/profile_gpu.py --what train --modes lgc_fast-fused --repeats 3 >"$LOGS/profile_train.txt" 2>&1 ||
    status=1
fi

if [[ $what == ncu || $what == all ]]; then
  ncu --clock-control none -k 'regex:moments|grad_sums|apply_kernel|bits_kernel|channel_kernel' --launch-count 40 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    python bench/bench_bn_relu_dropout.py --batch 128 --budget-s 1 --no-compile --dtypes bf16 \
    --layouts channels_last --backends cuda --no-overhead --out "$LOGS/ncu_bench_bn_relu_dropout.json" \
    >"$LOGS/ncu_epilogue.txt" 2>&1 || status=1
  grep -E "^  [a-z_:<>, 0-9A-Za-z]+\(|Duration|DRAM Throughput|Achieved Occupancy" "$LOGS/ncu_epilogue.txt" | head -80
fi

if [[ $what == epilogue ]]; then
  steps2="-DLGC_EPILOGUE_MOMENTS_STEPS=2 -DLGC_EPILOGUE_APPLY_STEPS=2 -DLGC_EPILOGUE_GRAD_STEPS=1"
  declare -A epilogue_flags=([default]="" [blocks3]="-DLGC_EPILOGUE_MIN_BLOCKS=3"
    [steps2_blocks3]="$steps2 -DLGC_EPILOGUE_MIN_BLOCKS=3" [steps2_blocks4]="$steps2 -DLGC_EPILOGUE_MIN_BLOCKS=4")
  built=""  # the build above is the default one
  for variant in ${EPILOGUE_VARIANTS:-default steps2_blocks3 steps2_blocks4 blocks3}; do
    export LGC_FAST_NVCC_FLAGS=${epilogue_flags[$variant]?"unknown epilogue variant $variant"}
    if [[ $LGC_FAST_NVCC_FLAGS != "$built" ]]; then
      LGC_FAST_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/build_$variant.log" 2>&1 ||
        { tail -20 "$LOGS/build_$variant.log"; status=1; continue; }
      built=$LGC_FAST_NVCC_FLAGS
    fi
    python bench/bench_bn_relu_dropout.py --batch 128 --budget-s 2 --no-compile --no-overhead --dtypes bf16 \
      --layouts channels_last --backends cuda --out "$LOGS/epilogue_$variant.json" 2>&1 |
      tee "$LOGS/bench_epilogue_$variant.txt" || status=1
    python bench/bench_train_step.py --batch-sizes 128 --budget-s 3 --ref-runs 1 --modes lgc_fast lgc_fast-fused \
      --out "$LOGS/epilogue_train_$variant.json" 2>&1 | tee "$LOGS/bench_epilogue_train_$variant.txt" || status=1
  done
  unset LGC_FAST_NVCC_FLAGS
  if [[ -n $built ]]; then
    LGC_FAST_CUDA=1 python -m pip install -q --no-build-isolation --no-deps -e . >"$LOGS/build.log" 2>&1 || status=1
  fi
fi

if [[ $what == fused_conv ]]; then
  for step in ${FUSED_CONV_STEPS:-tests kernels stack train}; do
    case $step in
      tests)  # xdist workers compile the kernels' configs side by side, where xdist is installed
        parallel=$(python -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")
        python -m pytest -q -rs $parallel tests/test_fused_conv.py tests/test_fused_conv_configs.py \
          tests/test_conv_stack_triton.py >"$LOGS/gpu_tests_fused_conv.log" 2>&1 || status=1
        tail -3 "$LOGS/gpu_tests_fused_conv.log" ;;
      kernels) python bench/bench_fused_conv.py 2>&1 | tee "$LOGS/bench_fused_conv.txt" || status=1 ;;
      stack)
        python bench/bench_conv_stack.py --cudnn-plans 1 2>&1 | tee "$LOGS/bench_conv_stack.txt" || status=1 ;;
      train)
        python bench/bench_train_step.py --batch-sizes 128 --budget-s 3 --ref-runs 1 \
          --modes lgc_fast-fused lgc_fast-stacks lgc_fast-triton-stacks 2>&1 | tee "$LOGS/bench_train_triton.txt" \
          || status=1 ;;
      *) echo "FUSED_CONV_STEPS: no step '$step' (tests, kernels, stack, train)" >&2; status=1 ;;
    esac
  done
fi

python bench/run.py --render-only >"$LOGS/render.txt" 2>&1 || status=1
exit $status
