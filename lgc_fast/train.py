"""``lgc-fast train``: train the LGCN on a 300-W style folder (paper section 4 with the authors' release settings).

- Data: every NAME.jpg + NAME.pts under --data, split by person into train and validation (--val-fraction); crops of
  --image-size px around the box (ground truth + 17 %), augmented by mirroring, +-12.5 % scaling and +-30 degree
  rotation (on the CPU in the DataLoader workers; on CUDA on the device, one grid_sample per batch).
- Backgrounds (paper section 4.3, for detection-free use): --backgrounds DIR (images of any kind, read as grey;
  unreadable ones are named and skipped or stop the run, as --on-bad-data says for faces) or --backgrounds synthetic
  (procedural clutter) makes --background-fraction (default 0.1) of every epoch's training samples non-faces, mixed
  into the same batches: a random square crop (side >= --image-size where the image allows, else the whole image)
  scaled to --image-size, with all 68 landmarks labelled and far outside the crop, so eq. 3 weighs each of its
  channels 1/10 against a zero target. Backgrounds never enter validation.
- Fine-tuning: --init FILE starts a new run (fresh optimiser, epoch 0) from the weights of a checkpoint or exported
  weights file of the same architecture (--variant, --width, --local-layers, 68 landmarks).
- Loss: 0.05 (the release's scale) x the mean over faces of eq. 4 (``lgc_fast.ops.lgc_loss``).
- Optimiser: SGD with momentum 0.9, the global gradient L2 norm clipped to --clip-norm (default 100), and the
  release's step schedule from --lr (1e-3) down to 2e-5: factors 1, 0.2, 0.1, 0.02 from the epochs nearest to 0, 50,
  75 and 90 % of --epochs (for 100 epochs: epochs 1-50 at 1e-3, 51-75 at 2e-4, 76-90 at 1e-4, 91-100 at 2e-5; the
  first epoch always runs at --lr).
  Why clip at 100: the first gradients of the full network reach norms of several thousand (about 4500 measured at
  batch 8, from the large 45x45-blurred heatmap errors), which would move the weights by about their own norm in
  one momentum step; clipping bounds a step to lr x 100. Later norms are a few hundred (measured on small CPU
  models), so the clip still scales those steps down by a small factor.
- Validation after every --eval-every epochs (and the last): inter-ocular NME over 68 points of the --decode'd
  output on the unaugmented validation crops. best.pt keeps the best so far; last.pt is written after every epoch and
  when the run stops early (--max-steps, Ctrl-C / SIGTERM), so --resume continues exactly: model, optimiser, epoch,
  step (even within an epoch), data order and augmentation, and every RNG (torch, CUDA, numpy, random, the device
  augmentation generator) on every process.
- Logs: log.csv and log.json in --out (one row per epoch), a status line on stderr.
- Several processes: start the same command with torchrun (DistributedDataParallel; gloo on CPU, NCCL on CUDA);
  --batch-size is per process and only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lgc_fast import metrics
from lgc_fast._backend import native_bf16_cpu
from lgc_fast._io import atomic_write_text, make_output_folder
from lgc_fast.checkpoint import load_checkpoint, model_from_state, rng_state, save_checkpoint, set_rng_state
from lgc_fast.data import (SYNTHETIC, BackgroundDataset, FacesAndBackgrounds, LandmarkDataset, augment_batch,
                           background_count, scan_backgrounds, split_by_person)
from lgc_fast.decode import DECODERS
from lgc_fast.distributed import ProcessGroup
from lgc_fast.errors import LgcError
from lgc_fast.evaluate import (add_loading_arguments, check_workers, load_faces, predict, readable_images,
                               report_problems)
from lgc_fast.model import VARIANTS, LGCN, default_local_layers
from lgc_fast.ops import lgc_loss
from lgc_fast.ops.bn_relu_dropout import fused_backend

LOSS_SCALE = 0.05
LR_STEPS = ((0.0, 1.0), (0.5, 0.2), (0.75, 0.1), (0.9, 0.02))  # (fraction of --epochs, factor of --lr)
# Settings that define the run; --resume refuses to continue under different ones.
RUN_SETTINGS = ("variant", "width", "local_layers", "dropout", "image_size", "batch_size", "lr", "momentum",
                "clip_norm", "seed", "val_fraction", "limit", "augment", "world_size", "backgrounds",
                "background_fraction")
# Settings that change only the floating-point details; --resume warns that the result is no longer bit-identical.
NUMERIC_SETTINGS = ("amp", "channels_last", "device_augment", "compile", "fused_epilogue", "conv_stacks",
                    "deterministic")
# The numeric options whose None means "not given": --resume then keeps the run's own value.
DEFAULTED_NUMERIC_OPTIONS = ("amp", "channels_last", "compile", "fused_epilogue", "conv_stacks", "deterministic")
# What a run recorded before a setting existed ran with.
NUMERIC_SETTING_BEFORE = {"conv_stacks": False, "deterministic": False}
STACK_PIECES = ("cudnn", "triton")  # --conv-stacks PIECES: LGCN.use_conv_stacks(graphs=...)
DEFAULT_BACKGROUND_FRACTION = 0.1
N_LANDMARKS = 68
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
LOG_COLUMNS = ("epoch", "step", "lr", "train_loss", "val_nme", "samples_per_s", "epoch_time_s", "val_time_s", "best")


def _kernel_sizes(text: str) -> list[int]:
    try:
        return [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated kernel sizes like 5,3,3, got {text!r}") from None


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, type=Path, help="folder with NAME.jpg + NAME.pts (300-W layout)")
    p.add_argument("--out", required=True, type=Path, help="run folder: last.pt, best.pt, log.csv, log.json")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16, help="faces per step and process")
    p.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (stepped down to 0.02x)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip-norm", type=float, default=100.0, help="clip the gradient's global L2 norm to this")
    p.add_argument("--variant", choices=VARIANTS, default="release")
    p.add_argument("--width", type=int, default=128, help="filters per conv layer")
    p.add_argument("--local-layers", type=_kernel_sizes, default=None,
                   help="kernel sizes of the local layers, e.g. 5,3,3 (default: the variant's 15 layers)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=96, help="crop size in pixels")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of faces (whole people) for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const="last", metavar="CHECKPOINT",
                   help="continue from --out/last.pt (or the given checkpoint)")
    p.add_argument("--init", type=Path, metavar="CHECKPOINT",
                   help="start a new run (fresh optimiser, epoch 0) from the weights of this checkpoint or exported "
                        "weights file; its architecture must match --variant, --width and --local-layers")
    p.add_argument("--backgrounds", metavar="SOURCE",
                   help=f"add non-face samples: a folder of images (any kind, read as grey) or '{SYNTHETIC}' "
                        f"(procedural clutter); all landmarks labelled and outside the crop (paper section 4.3)")
    p.add_argument("--background-fraction", type=float, metavar="F",
                   help=f"share of each epoch's training samples that are backgrounds (default "
                        f"{DEFAULT_BACKGROUND_FRACTION} with --backgrounds)")
    add_loading_arguments(p)
    p.add_argument("--max-steps", type=int, help="stop (saving last.pt) after this many steps in all")
    p.add_argument("--limit", type=int, help="use only the first N faces (in path order) of --data")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA and on a CPU with AVX512-BF16 or AMX-BF16, where a "
                        "step was 1.5-1.9x faster; off on other CPUs, which emulate bfloat16)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the forward pass and the loss as one graph; MODE is torch.compile's mode "
                        f"({', '.join(COMPILE_MODES)}; default: default). reduce-overhead adds CUDA graphs")
    p.add_argument("--fused-epilogue", action=argparse.BooleanOptionalAction, default=None,
                   help="run every conv block's BatchNorm + ReLU + scale + dropout as one op "
                        "(lgc_fast.ops.bn_relu_dropout: CUDA C++ or Triton on CUDA, C++ on the CPU) instead of "
                        "torch's modules (default: where its compiled kernels were measured faster than the modules: "
                        f"C++ on the CPU, CUDA C++ on a GPU at --batch-size {FUSED_EPILOGUE_MIN_CUDA_BATCH} or more; "
                        "off where only Triton's would run: see the README's performance table)")
    p.add_argument("--conv-stacks", nargs="?", const="cudnn", choices=STACK_PIECES, default=None, metavar="PIECES",
                   help="in training, run each run of like conv blocks as lgc_fast.ops.conv_stack (BatchNorm, ReLU "
                        "and dropout inside the convolutions) on PIECES: cudnn (the default PIECES), cuDNN's fused "
                        "graphs where a CUDA build has them (LGC_FAST_CUDNN_GRAPHS=auto or 1) and they build (on an "
                        "H100 with cuDNN 9.19 none built); triton, lgc_fast's own Triton kernels (Triton 3.4+, CUDA; "
                        "not yet timed on a GPU); blocks whose pieces do not run here run as before (default: off)")
    p.add_argument("--no-conv-stacks", dest="conv_stacks", action="store_const", const=False,
                   help="run the conv blocks as modules (to resume a run that had --conv-stacks without them)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="on a GPU, the same run gives the same weights bit for bit, also stopped and resumed: "
                        "cuDNN's deterministic algorithms, no benchmark-mode search, convolutions on the forward "
                        "kernels (same_conv2d's timed choice of family can differ between processes); slower "
                        "(default: off; the CPU is deterministic either way)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--log-every", type=int, default=20, help="steps between loss read-backs and status updates")
    p.add_argument("--decode", default="argmax", choices=sorted(DECODERS), help="decoder for the validation NME")


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lgc-fast train")
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def learning_rate(base: float, epoch: int, epochs: int) -> float:
    """The step schedule: base x the factor of the last LR_STEPS entry whose start epoch, the fraction of `epochs`
    rounded to the nearest epoch (at least epoch 1: the first epoch always runs at base), has been reached."""
    factor = 1.0
    for start, f in LR_STEPS:
        if epoch >= max(1 if start > 0 else 0, math.floor(start * epochs + 0.5)):
            factor = f
    return base * factor


@dataclass
class TrainResult:
    model: LGCN
    history: list = field(default_factory=list)
    best_nme: float = math.inf
    step: int = 0
    finished: bool = False  # all epochs done (False: stopped by --max-steps or a signal)
    interrupted: bool = False  # stopped by SIGINT/SIGTERM


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a plain line per update otherwise."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.tty = enabled and stream.isatty()
        self.shown = 0.0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and (force or now - self.shown > 0.2):
            self.stream.write("\r" + text[:200].ljust(100))
            self.stream.flush()
            self.shown = now
        elif not self.tty and force:
            self.stream.write(text + "\n")
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + text.ljust(100 if self.tty else 0) + "\n")
            self.stream.flush()


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed and epoch) that can start its epoch after `skip` of this rank's samples."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop stops after the current step (with several processes: after the step that
    ends the current log interval) and saves last.pt. A second signal interrupts at once, without saving."""

    def __init__(self):
        self.set = False
        self.previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.set:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.set = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# Per process; on an H100 the fused step was 1.28-1.36x faster than the modules at batch 64-256 (session 14), 1.15x at
# 32 and 1.02x at 16, inside the runs' spread, where the host's work per block bounds the step (session 29,
# bench/results/nvidia-h100-80gb-hbm3.train_step_small_batches.json).
FUSED_EPILOGUE_MIN_CUDA_BATCH = 32


def _default_fused_epilogue(device: torch.device, batch_size: int) -> bool:
    """Automatic --fused-epilogue: where the op runs compiled kernels and they were measured faster than torch's
    modules: C++ on the CPU; CUDA C++ on a GPU from FUSED_EPILOGUE_MIN_CUDA_BATCH faces a step. Off for Triton alone,
    measured slower."""
    backend = fused_backend(device)
    if backend == "cuda":
        return batch_size >= FUSED_EPILOGUE_MIN_CUDA_BATCH
    return backend == "cpu"


def stack_pieces(value) -> str | bool:
    """--conv-stacks as recorded: "cudnn" or "triton", or False (off); runs recorded before PIECES existed hold True,
    which was cuDNN's graphs."""
    if value is True:
        return "cudnn"
    return value or False


def default_amp(device: torch.device) -> bool:
    """bfloat16 autocast on CUDA and on a CPU that multiplies bfloat16 in hardware (``native_bf16_cpu``); other CPUs
    emulate it, slower than float32."""
    return device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()[0])


def _settings(args, world: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "variant": args.variant, "width": args.width, "local_layers": args.local_layers, "dropout": args.dropout,
        "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
        "clip_norm": args.clip_norm, "seed": args.seed, "val_fraction": args.val_fraction, "limit": args.limit,
        "augment": args.augment, "world_size": world, "backgrounds": _background_source(args),
        "background_fraction": _background_fraction(args),
        "amp": default_amp(device) if args.amp is None else bool(args.amp),
        "channels_last": cuda if args.channels_last is None else bool(args.channels_last),
        "device_augment": cuda and args.augment, "compile": args.compile or False,
        "fused_epilogue": _default_fused_epilogue(device, args.batch_size) if args.fused_epilogue is None
        else bool(args.fused_epilogue),
        "conv_stacks": stack_pieces(args.conv_stacks), "deterministic": bool(args.deterministic),
        "epochs": args.epochs, "data": str(args.data), "device": str(device), "decode": args.decode,
        "init": None if args.init is None else str(Path(args.init).resolve()),
    }


def _background_source(args) -> str | None:
    """SYNTHETIC, the absolute background folder (so --resume matches from any working directory), or None."""
    if args.backgrounds is None or args.backgrounds == SYNTHETIC:
        return args.backgrounds
    return str(Path(args.backgrounds).resolve())


def _background_fraction(args) -> float | None:
    if args.backgrounds is None:
        return None
    return DEFAULT_BACKGROUND_FRACTION if args.background_fraction is None else args.background_fraction


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "width", "image_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            raise LgcError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise LgcError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    check_workers(args.workers)
    if args.max_steps is not None and args.max_steps < 1:
        raise LgcError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.limit is not None and args.limit < 2:
        raise LgcError(f"--limit must be >= 2, got {args.limit}")
    if not (args.lr > 0 and args.clip_norm > 0 and 0 <= args.momentum < 1):
        raise LgcError("--lr and --clip-norm must be > 0 and --momentum in [0, 1)")
    if args.background_fraction is not None:
        if args.backgrounds is None:
            raise LgcError("--background-fraction needs --backgrounds (a folder of images or 'synthetic')")
        if not 0.0 < args.background_fraction < 1.0:
            raise LgcError(f"--background-fraction must be in (0, 1), got {args.background_fraction}")
    if args.init is not None and args.resume is not None:
        raise LgcError("--init starts a new run and --resume continues one; pass only one of them")


def _make_optimizer(params, lr: float, momentum: float):
    try:  # one fused kernel for the whole update where torch has it, else the multi-tensor (foreach) path
        return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader worker init: ignore SIGINT/SIGTERM. A signal to the whole process group (Ctrl-C, `kill -- -PGID`,
    a batch scheduler) reaches the workers too; dying of it would make the trainer raise on its lost worker instead of
    finishing the step, saving last.pt and closing the workers itself. Workers started by ``start_workers`` hold
    the signals blocked until here, where a pending one is discarded."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader):
    """iter(loader), its worker processes started with SIGINT/SIGTERM blocked (they inherit the mask), so a signal to
    the process group that arrives while a worker starts, before its init ignores the signals, cannot kill it (such
    a signal used to end the run with a traceback at an epoch boundary). This process gets the signal right after."""
    if not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def forward_loss(net, images, points, labelled, amp: bool) -> torch.Tensor:
    """The scaled training loss of one batch: net forward (bfloat16 autocast if amp) + lgc_loss, mean over faces.

    images: (N, 1, H, W) in [0, 255]; points: (N, 68, 2) crop pixels; labelled: (N, 68) bool. Returns a 0-d tensor.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        local, omega = net(images)
    return lgc_loss(local, omega, points, labelled).mean() * LOSS_SCALE


def compiled_forward_loss(mode: str):
    """forward_loss under torch.compile(mode=mode): the network and the loss in one graph, so the elementwise BN,
    ReLU, dropout and loss-mean passes fuse (lgc_fast's ops are registered custom ops, so compile keeps them, a
    conv_stack on Triton's pieces included; one on cuDNN's pieces runs between its graphs)."""
    compiled = torch.compile(forward_loss, mode=mode)
    if mode in ("reduce-overhead", "max-autotune"):  # the modes that capture CUDA graphs
        def step_loss(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
            return compiled(*args)
        return step_loss
    return compiled


def train_step(net, optimizer, images, points, labelled, amp: bool, clip_norm: float,
               loss_fn=forward_loss) -> torch.Tensor:
    """One optimisation step without host synchronisation; returns the (detached) batch loss on the device.

    images: (N, 1, H, W) in [0, 255]; points: (N, 68, 2) crop pixels; labelled: (N, 68) bool;
    loss_fn: forward_loss or compiled_forward_loss(mode).
    """
    loss = loss_fn(net, images, points, labelled, amp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    optimizer.step()
    return loss.detach()


def _resume_state(args, settings: dict, progress: Progress) -> dict | None:
    path = None if args.resume is None else args.out / "last.pt" if args.resume == "last" else Path(args.resume)
    # The run in --out continues only from its own checkpoints: any other start would overwrite its last.pt.
    if (args.out / "last.pt").exists() and (path is None or path.resolve().parent != args.out.resolve()):
        raise LgcError(f"{args.out} already holds a run (last.pt); pass --resume (or --resume with a checkpoint in "
                       f"{args.out}) to continue it or choose another --out")
    if path is None:
        return None
    state = load_checkpoint(path)
    if "optimizer" not in state:
        raise LgcError(f"--resume {path}: exported weights cannot be resumed (no optimiser state); use a last.pt")
    saved = dict(state.get("settings", {}))
    if "conv_stacks" in saved:  # True in runs recorded before --conv-stacks named its pieces
        saved["conv_stacks"] = stack_pieces(saved["conv_stacks"])
    # Numeric options not given on this command line continue as the run started, on the same kind of device, even
    # where their defaults have changed since.
    if str(saved.get("device", "")).split(":")[0] == settings["device"].split(":")[0]:
        for key in DEFAULTED_NUMERIC_OPTIONS:
            if getattr(args, key) is None and key in saved:
                settings[key] = saved[key]
    changed = [k for k in RUN_SETTINGS if saved.get(k) != settings[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
        raise LgcError(f"--resume {path}: the run was started with other settings ({diffs})")
    numeric = [k for k in NUMERIC_SETTINGS if saved.get(k, NUMERIC_SETTING_BEFORE.get(k)) != settings[k]]
    if numeric:
        progress.line(f"note: resuming with different {', '.join(numeric)}; the result will not be bit-identical "
                      f"to an uninterrupted run")
    state["path"] = str(path)
    settings["init"] = saved.get("init")  # the weights the run started from, not an argument of this call
    return state


def _init_weights(args) -> dict | None:
    """--init: the state_dict (float32) of a checkpoint or exported weights file whose network has the run's
    architecture; LgcError naming the file when it is missing, unreadable or of another architecture."""
    if args.init is None:
        return None
    try:
        source = model_from_state(load_checkpoint(args.init), args.init)
    except LgcError as exc:
        raise LgcError(f"--init: {exc}") from None
    want = {"variant": args.variant, "width": args.width, "n_landmarks": N_LANDMARKS,
            "local_layers": list(default_local_layers(args.variant) if args.local_layers is None
                                 else args.local_layers)}
    diffs = [f"{k} {source.config[k]!r} (here {v!r})" for k, v in want.items() if source.config[k] != v]
    if diffs:
        raise LgcError(f"--init {args.init}: the network there has another architecture: {', '.join(diffs)}")
    return source.state_dict()


def _background_set(args, n_faces: int, on_error: str) -> tuple[BackgroundDataset | None, list[str]]:
    """The epoch's backgrounds for n_faces training faces (None without --backgrounds) and the unreadable files."""
    if args.backgrounds is None:
        return None, []
    problems = []
    if args.backgrounds == SYNTHETIC:
        source = SYNTHETIC
    else:
        source, problems = readable_images(scan_backgrounds(args.backgrounds), args.on_bad_data, args.workers,
                                           path_of=Path)
        if not source:
            raise LgcError(f"--backgrounds {args.backgrounds}: none of the images can be read (first: "
                           f"{problems[0]})")
    count = background_count(n_faces, _background_fraction(args))
    return BackgroundDataset(source, count, args.image_size, args.seed, on_error, N_LANDMARKS), problems


def _write_logs(out: Path, settings: dict, history: list) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LOG_COLUMNS)
    for row in history:
        writer.writerow(["" if row.get(k) is None else row[k] for k in LOG_COLUMNS])
    atomic_write_text(out / "log.csv", buffer.getvalue())
    atomic_write_text(out / "log.json", json.dumps({"settings": settings, "epochs": history}, indent=2) + "\n")


def _validate(model, loader, dist_: ProcessGroup, settings: dict, method: str) -> float:
    """Mean inter-ocular NME (68 points) over this rank's share of the validation set, summed over ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    batches = start_workers(loader)
    for batch, points in predict(model, batches, dist_.device, method, settings["amp"], settings["channels_last"]):
        e = metrics.nme(points.cpu().numpy(), batch["points"].numpy(), batch["labelled"].numpy())
        e = e[~np.isnan(e)]
        total += torch.tensor([e.sum(), e.size], dtype=torch.float64)
    total = dist_.sum(total).cpu()
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


def train(args) -> TrainResult:
    """Run `lgc-fast train` with parsed arguments; returns the trained model (on its device) and the log."""
    _check_args(args)
    dist_ = ProcessGroup(args.device)
    try:
        return _train(args, dist_)
    finally:
        dist_.close()


def _train(args, dist_: ProcessGroup) -> TrainResult:
    device, rank, world = dist_.device, dist_.rank, dist_.world
    progress = Progress(dist_.main)
    settings = _settings(args, world, device)
    resume = _resume_state(args, settings, progress)
    init = _init_weights(args)

    records, problems = load_faces(args.data, None, args.on_bad_data, args.workers, args.limit)
    train_records, val_records = split_by_person(records, args.val_fraction, args.seed)
    if len(train_records) < args.batch_size * world:
        raise LgcError(f"{args.data}: {len(train_records)} training faces, fewer than one batch "
                       f"({args.batch_size} x {world} processes)")
    on_error = "raise" if args.on_bad_data == "stop" else "skip"
    backgrounds, background_problems = _background_set(args, len(train_records), on_error)
    problems += background_problems
    if dist_.main:
        make_output_folder(args.out, "--out")
        report_problems(problems, "train")
        if problems:
            atomic_write_text(args.out / "data_problems.txt", "\n".join(problems) + "\n")
        atomic_write_text(args.out / "settings.json", json.dumps(settings, indent=2) + "\n")
        extra = "" if backgrounds is None else f" + {len(backgrounds)} backgrounds per epoch"
        progress.line(f"{len(train_records)} training faces{extra}, {len(val_records)} validation faces "
                      f"({len(problems)} skipped), {world} process(es) on {device}")

    cpu_augment = args.augment and not settings["device_augment"]
    train_set = LandmarkDataset(train_records, args.image_size, augment=cpu_augment, seed=args.seed, on_error=on_error)
    if backgrounds is not None:
        train_set = FacesAndBackgrounds(train_set, backgrounds)
    val_set = LandmarkDataset(val_records, args.image_size, augment=False, on_error=on_error)
    sampler = ResumableSampler(train_set, world, rank, args.seed)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=args.batch_size,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            worker_init_fn=leave_stop_signals_to_the_trainer)
    steps_per_epoch = len(sampler) // args.batch_size

    torch.manual_seed(args.seed)
    model = LGCN(args.variant, args.width, N_LANDMARKS, args.dropout, args.local_layers)
    if init is not None:
        model.load_state_dict(init)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).fuse_epilogues(settings["fused_epilogue"])
    model.use_conv_stacks(bool(settings["conv_stacks"]), graphs=settings["conv_stacks"] or "cudnn")
    if settings["deterministic"]:
        model.use_conv_via("fprop")
    if device.type == "cuda":
        # fixed crop and batch shapes: pick each conv's fastest algorithm once, unless the run must repeat exactly
        torch.backends.cudnn.benchmark = not settings["deterministic"]
        torch.backends.cudnn.deterministic = settings["deterministic"]
    optimizer = _make_optimizer(model.parameters(), args.lr, args.momentum)
    augment_generator = torch.Generator(device).manual_seed(args.seed + 7919 * rank) \
        if settings["device_augment"] else None
    # Per-rank randomness (dropout) differs; the initial weights above are the same on every rank.
    torch.manual_seed(args.seed + 1000003 * rank)

    epoch, step, skip, history, best = 0, 0, 0, [], math.inf
    partial = {"loss_sum": 0.0, "samples": 0, "time": 0.0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        epoch, step, skip = resume["epoch"], resume["step"], resume["batch_in_epoch"]
        history, best = list(resume["history"]), resume["best_nme"]
        partial = dict(resume["partial"])
        set_rng_state(resume["rng"][rank], augment_generator)
        progress.line(f"resumed from {resume['path']} at epoch {epoch + 1}, step {step}")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    loss_fn = compiled_forward_loss(settings["compile"]) if settings["compile"] else forward_loss

    def checkpoint_state(batch_in_epoch: int) -> dict:
        rng = dist_.gather(rng_state(augment_generator))  # every rank takes part; rank 0 writes
        return {"config": model.config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "partial": partial,
                "rng": rng, "history": history, "best_nme": best, "settings": settings,
                "image_size": args.image_size}

    if args.max_steps is not None and step >= args.max_steps:
        progress.line(f"nothing to do: step {step} >= --max-steps {args.max_steps}")
        return TrainResult(model, history, best, step, finished=epoch >= args.epochs)
    stop = _StopFlag()
    stop.install()
    try:
        while epoch < args.epochs:
            lr = learning_rate(args.lr, epoch, args.epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.skip = skip * args.batch_size
            # The loader's own generator seeds its workers, so creating it never draws from the global RNG.
            loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                num_workers=args.workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(args.seed * 100003 + epoch),
                                worker_init_fn=leave_stop_signals_to_the_trainer)
            net.train()
            loss_sum = torch.tensor(partial["loss_sum"], dtype=torch.float32, device=device)
            samples, batch_in_epoch = partial["samples"], skip
            started = time.perf_counter() - partial["time"]
            stop_now = False
            for batch in start_workers(loader):
                images = batch["image"].to(device, non_blocking=True)
                points = batch["points"].to(device, non_blocking=True)
                labelled = batch["labelled"].to(device, non_blocking=True)
                if augment_generator is not None:
                    images, points, labelled = augment_batch(images, points, labelled, augment_generator)
                images = images.contiguous(memory_format=memory_format)
                loss = train_step(net, optimizer, images, points, labelled, settings["amp"], args.clip_norm, loss_fn)
                loss_sum += loss * images.shape[0]
                samples += images.shape[0] * world
                step += 1
                batch_in_epoch += 1
                out_of_steps = args.max_steps is not None and step >= args.max_steps
                if step % args.log_every == 0 or batch_in_epoch == steps_per_epoch or out_of_steps:
                    # The one host sync per log interval: the loss so far, and whether any rank was signalled.
                    flags = dist_.sum([loss_sum.item(), float(stop.set)])
                    stop_now = bool(flags[1] > 0)  # the same decision on every rank
                    last_loss = float(flags[0]) / max(samples, 1)
                    if not math.isfinite(last_loss):
                        raise LgcError(f"training diverged: the loss is {last_loss} at step {step} (epoch "
                                       f"{epoch + 1}); last.pt holds the last finished epoch. Try a lower --lr or "
                                       f"--clip-norm")
                    elapsed = time.perf_counter() - started
                    done = batch_in_epoch / steps_per_epoch
                    bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
                    progress.update(f"epoch {epoch + 1}/{args.epochs} [{bar}] {batch_in_epoch}/{steps_per_epoch} "
                                    f"loss {last_loss:.4f} {samples / max(elapsed, 1e-9):.1f} samples/s", force=True)
                else:
                    progress.update(f"epoch {epoch + 1}/{args.epochs} {batch_in_epoch}/{steps_per_epoch}")
                    # One process decides alone, at once; several agree at the next log interval's all-reduce.
                    stop_now = stop.set if world == 1 else stop_now
                if (stop_now or out_of_steps) and batch_in_epoch < steps_per_epoch:
                    partial = {"loss_sum": float(loss_sum), "samples": samples,
                               "time": time.perf_counter() - started}
                    state = checkpoint_state(batch_in_epoch)
                    if dist_.main:
                        save_checkpoint(args.out / "last.pt", state)
                        progress.line(f"stopped at step {step} (epoch {epoch + 1}, batch {batch_in_epoch}); "
                                      f"saved {args.out / 'last.pt'}; continue with --resume")
                    return TrainResult(model, history, best, step, finished=False, interrupted=stop_now)
            train_time = time.perf_counter() - started
            train_loss = float(dist_.sum([float(loss_sum)])[0]) / max(samples, 1)
            val_nme, val_time = None, 0.0
            if val_records and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                t0 = time.perf_counter()
                dist_.broadcast_buffers(model)
                val_nme = _validate(model, val_loader, dist_, settings, args.decode)
                val_time = time.perf_counter() - t0
            improved = val_nme is not None and val_nme < best
            best = val_nme if improved else best
            history.append({"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": train_loss,
                            "val_nme": val_nme, "samples_per_s": samples / max(train_time, 1e-9),
                            "epoch_time_s": train_time, "val_time_s": val_time, "best": improved})
            epoch, skip = epoch + 1, 0
            partial = {"loss_sum": 0.0, "samples": 0, "time": 0.0}
            state = checkpoint_state(0)
            if dist_.main:
                save_checkpoint(args.out / "last.pt", state)
                if improved:
                    save_checkpoint(args.out / "best.pt", state)
                _write_logs(args.out, settings, history)
                progress.line(f"epoch {epoch}/{args.epochs}: loss {train_loss:.4f}, val NME "
                              f"{'-' if val_nme is None else f'{val_nme:.4f}'}{' (best)' if improved else ''}, "
                              f"lr {lr:g}, {history[-1]['samples_per_s']:.1f} samples/s, {train_time:.0f} s")
            if stop_now or (args.max_steps is not None and step >= args.max_steps):
                return TrainResult(model, history, best, step, finished=epoch >= args.epochs, interrupted=stop_now)
    finally:
        stop.restore()
    return TrainResult(model, history, best, step, finished=True)


def run(args) -> int:
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        best = f"{result.best_nme:.4f}" if math.isfinite(result.best_nme) else "-"
        state = "finished" if result.finished else "stopped early"
        print(f"{state} after {result.step} steps; best validation NME {best}; run folder {args.out}")
    return 130 if result.interrupted else 0
