"""``lgc-fast export``: the network as an ONNX graph of standard operators, checked against PyTorch.

The kernel convolution (eq. 1) is a custom op in PyTorch; in the graph it becomes ordinary convolutions:
``separable`` (default) uses K = (1/5) sum_s g_s g_s^T: a depthwise 1x45 convolution producing the five Gaussian
rows per channel, a depthwise 45x1 convolution, and a grouped 1x1 convolution summing the five with weight 1/5 (450
multiply-adds per pixel and channel instead of 2025); ``dense`` is the literal depthwise 45x45 convolution.
Input ``image`` (N, 1, H, W) grey levels in [0, 255], any N, H, W; outputs ``local`` and ``omega`` (N, C, H, W).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lgc_fast._io import atomic_write_bytes, make_output_file_folder
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN
from lgc_fast.ops.kernel_conv import KERNEL_SIZE, RADIUS, WEIGHT, kernel_2d, kernel_taps

KERNEL_FORMS = ("separable", "dense")
OPSET = 17
# What the TorchScript exporter writes (torch.onnx.export(dynamo=False), torch 2.4 and later) and onnxruntime runs:
# below 7 the graph does not run there, above 20 the exporter fails or warns that it does not support the opset.
OPSETS = range(7, 21)
CHECK_TOLERANCE = 1e-4  # max |onnx - torch| relative to max |omega|


class KernelConv2d(nn.Module):
    """The kernel convolution of eq. 1 on `channels` channels times the constant `scale`, written with standard
    convolutions only (exportable); the scale rides on the last convolution's weights.
    x: (N, channels, H, W) -> scale * (K * x): (N, channels, H, W), zero padding."""

    def __init__(self, channels: int, form: str = "separable", scale: float = 1.0):
        super().__init__()
        if form not in KERNEL_FORMS:
            raise ValueError(f"form must be one of {', '.join(KERNEL_FORMS)}, not {form!r}")
        self.channels, self.form = int(channels), form
        if form == "dense":
            self.register_buffer("weight", (scale * kernel_2d()).float().expand(channels, 1, KERNEL_SIZE, KERNEL_SIZE)
                                 .contiguous())
        else:
            taps = kernel_taps(torch.float32)  # (5, 45)
            n = taps.shape[0]
            self.register_buffer("row", taps.repeat(channels, 1).reshape(channels * n, 1, 1, KERNEL_SIZE))
            self.register_buffer("col", taps.repeat(channels, 1).reshape(channels * n, 1, KERNEL_SIZE, 1))
            self.register_buffer("mix", torch.full((channels, n, 1, 1), scale * WEIGHT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "dense":
            return F.conv2d(x, self.weight, padding=RADIUS, groups=self.channels)
        rows = F.conv2d(x, self.row, padding=(0, RADIUS), groups=self.channels)  # (N, 5C, H, W)
        both = F.conv2d(rows, self.col, padding=(RADIUS, 0), groups=rows.shape[1])
        return F.conv2d(both, self.mix, groups=self.channels)


class ExportableLGCN(nn.Module):
    """``LGCN.forward`` itself, run on ``model.folded()`` (a copy with every BatchNorm and activation scale folded into
    its convolution, so the graph holds Conv + Relu where the model has Conv, BatchNormalization, Relu and Mul) whose
    kernel-convolution submodule is KernelConv2d.

    The copy keeps the buffers of KernelConv2d out of `model` and its state_dict. ``check_equivalence`` (run by every
    export and by the tests) compares the copy with `model`.
    """

    def __init__(self, model: LGCN, form: str = "separable"):
        super().__init__()
        # standard ONNX nodes: planar (no layout copies or batched products) and F.conv2d, whatever a GPU measured
        self.net = model.folded().to(memory_format=torch.contiguous_format).use_conv_via("fprop")
        # LGCN.forward convolves C-channel maps
        self.net.kernel = KernelConv2d(model.n_landmarks, form, scale=model.kernel.scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zeros)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    return float(np.abs(actual - expected).max() / (scale if scale > 0 else 1.0))


def check_equivalence(wrapper: ExportableLGCN, model: LGCN, image: torch.Tensor) -> float:
    """Relative max error between the wrapper's omega and the model's on image (N, 1, H, W)."""
    with torch.no_grad():
        _, expected = model(image)
        _, actual = wrapper(image)
    return relative_error(actual.numpy(), expected.numpy())


def export_onnx(model: LGCN, path, form: str = "separable", opset: int = OPSET, probe: torch.Tensor | None = None):
    """Write `model` (eval mode, CPU) as ONNX to `path` atomically, dynamic in N, H and W.

    probe: an image (N, 1, H, W) to trace with and to check the rebuilt forward against the model on (default: a
    96 x 96 ramp). Returns the wrapper's relative error against the model. LgcError when it exceeds the tolerance or
    is NaN (the model's output is not finite), or for an opset outside OPSETS.
    """
    if opset not in OPSETS:
        raise LgcError(f"opset must be in {OPSETS.start}..{OPSETS.stop - 1} (what torch's TorchScript exporter "
                       f"writes and onnxruntime runs), got {opset}")
    model = model.cpu().eval()
    wrapper = ExportableLGCN(model, form).eval()
    if probe is None:
        probe = torch.linspace(0, 255, 96 * 96).reshape(1, 1, 96, 96)
    error = check_equivalence(wrapper, model, probe)
    if not error <= CHECK_TOLERANCE:  # NaN too: nothing is checked when the outputs are not finite
        raise LgcError(f"the exportable network ({form} KernelConv2d) differs from the model or its output is not "
                       f"finite (relative error {error:.2e})")
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "local": {0: "batch", 2: "height", 3: "width"},
               "omega": {0: "batch", 2: "height", 3: "width"}}

    def write(f) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of dynamo=True, which needs onnxscript (not a
            # dependency); this graph (convolutions, ReLU, slicing) is within what the TorchScript exporter handles.
            warnings.simplefilter("ignore", DeprecationWarning)
            # LGCN.forward's input-shape check reads the traced shape; it holds for every image the graph accepts.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (probe,), f, input_names=["image"], output_names=["local", "omega"],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)

    atomic_write_bytes(path, write)
    return error


def onnx_check(path, model: LGCN, images: list[torch.Tensor]) -> float | None:
    """Max relative error of onnxruntime's omega against the PyTorch model over `images` (each (N, 1, H, W)), NaN
    when any is; None when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    for image in images:
        with torch.no_grad():
            _, expected = model.cpu().eval()(image)
        _, omega = session.run(None, {"image": image.numpy().astype(np.float32)})
        errors.append(relative_error(omega, expected.numpy()))
    return float(np.max(errors))  # unlike max(), NaN wins


def face_probe() -> torch.Tensor:
    """The bundled astronaut's face as the network sees it: the 96 x 96 grey crop of its known box, (1, 1, 96, 96)."""
    from lgc_fast.data.geometry import box_to_square, crop_transform, warp_image
    from lgc_fast.demo import DEMO_IMAGE, demo_box
    from lgc_fast.detect import CROP, load_gray

    cx, cy, size = box_to_square(demo_box())
    crop = warp_image(load_gray(DEMO_IMAGE), crop_transform((cx, cy), size, CROP), CROP)
    return torch.from_numpy(crop)[None, None]


def add_arguments(parser) -> None:
    parser.add_argument("--onnx", required=True, type=Path, metavar="FILE", help="the ONNX file to write")
    parser.add_argument("--weights", type=Path, help="checkpoint or exported weights (default: the bundled model)")
    parser.add_argument("--kernel", choices=KERNEL_FORMS, default="separable",
                        help="how the 45x45 kernel convolution is written in the graph (default: separable)")
    parser.add_argument("--opset", type=int, default=OPSET,
                        help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default {OPSET})")


def run(args) -> int:
    from lgc_fast.checkpoint import load_model
    from lgc_fast.detect import ASSETS_DIR, WEIGHTS_FILE

    weights = args.weights if args.weights is not None else ASSETS_DIR / WEIGHTS_FILE
    if args.weights is None and not weights.is_file():
        raise LgcError(f"bundled weights {weights} not found (this installation ships without trained assets): "
                       "pass --weights PATH")
    make_output_file_folder(args.onnx, "--onnx")
    model = load_model(weights)
    face = face_probe()
    # The graph is written beside --onnx and takes its place only once onnxruntime agrees: a graph that fails the
    # check never replaces an earlier file.
    staged = args.onnx.with_name(f".{args.onnx.name}.unchecked")
    try:
        error = export_onnx(model, staged, args.kernel, args.opset, probe=face)
        print(f"exported ({args.kernel} kernel convolution, opset {args.opset}); rebuilt forward vs PyTorch: "
              f"{error:.1e}")
        wide = torch.nn.functional.interpolate(face, size=(120, 150), mode="bilinear", align_corners=False)
        checked = onnx_check(staged, model, [face, wide.repeat(2, 1, 1, 1)])
        if checked is None:
            print("onnxruntime is not installed: the exported graph was not run (pip install onnxruntime)")
        else:
            print(f"onnxruntime vs PyTorch on a real face (96x96, and 2x120x150): max relative error {checked:.1e}")
            if not checked <= CHECK_TOLERANCE:
                print(f"lgc-fast export: error: onnxruntime disagrees with PyTorch beyond {CHECK_TOLERANCE:g}; "
                      f"{args.onnx} was not written", file=sys.stderr)
                return 1
        os.replace(staged, args.onnx)
    finally:
        staged.unlink(missing_ok=True)
    print(f"wrote {args.onnx}")
    return 0
