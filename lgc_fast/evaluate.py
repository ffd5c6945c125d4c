"""``lgc-fast eval``: landmark errors of a trained network on a 300-W style folder.

Every face is cropped like in training (its box from --boxes, else the tight box around its ground truth enlarged by
17 %, the paper's protocol for data without boxes), run through the network (--mirror: averaged with its mirror
image), decoded (--decode; with --fit the Detector's pipeline: PCA shape fit, blended with a local decoder) and mapped
back to image pixels, where the errors are measured (see lgc_fast.metrics: NME by inter-ocular, inter-pupil and box size, over
68 and the 51 inner points). Writes to --out: report.json (the summary), errors.csv (one row per image) and ced.png
(cumulative error curves; skipped with a note when matplotlib is missing).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch

from lgc_fast import metrics
from lgc_fast._io import atomic_write_bytes, atomic_write_text, make_output_file_folder, make_output_folder
from lgc_fast.checkpoint import load_checkpoint, model_from_state
from lgc_fast.data import LandmarkDataset, read_gray, scan_folder, split_by_person
from lgc_fast.decode import DECODERS, decode
from lgc_fast.detect import PRECISION_CHOICES, PRECISIONS, Detector, resolve_precision
from lgc_fast.detector_settings import FIT_THRESHOLD, pipeline_settings, read_json_object
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN, mirror_averaged_omega
from lgc_fast.shape import mean_point_offsets

DEFAULT_IMAGE_SIZE = 96
CED_MAX_ERROR = 0.10
SPLITS = ("all", "train", "val")  # --split: "train" and "val" index split_by_person's (train, val) after "all"


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="folder with NAME.jpg + NAME.pts (300-W layout)")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a training checkpoint (best.pt / last.pt) or exported weights")
    parser.add_argument("--out", type=Path, help="folder for report.json, errors.csv and ced.png (default: print only)")
    parser.add_argument("--decode", default="argmax", choices=sorted(DECODERS), help="heatmap decoder")
    parser.add_argument("--fit", action="store_true",
                        help="the Detector's pipeline: fit the PCA shape model to the heatmaps, then (for a local "
                             "--decode) blend the decoder's points with the fit; with argmax, the fit alone")
    parser.add_argument("--shape-model", type=Path, help="shape model .npz for --fit (default: the bundled one)")
    parser.add_argument("--fit-threshold", type=float, default=FIT_THRESHOLD,
                        help="--fit: pixels above this share of their channel's maximum enter the fit (default "
                             f"{FIT_THRESHOLD:g}; the bundled model's choice is in its metadata.json)")
    parser.add_argument("--point-offsets", type=Path, metavar="JSON",
                        help="--fit: remove the systematic point errors (pipeline.point_offsets) of this JSON file, "
                             "e.g. lgc_fast/assets/metadata.json")
    parser.add_argument("--save-point-offsets", type=Path, metavar="JSON",
                        help="--fit: measure the fitted points' systematic errors on these faces (in the shape "
                             "model's frame, lgc_fast.shape.mean_point_offsets) and write them as "
                             "pipeline.point_offsets")
    parser.add_argument("--mirror", action="store_true",
                        help="average each crop's heatmaps with its mirror image's (test-time mirroring)")
    parser.add_argument("--boxes", type=Path,
                        help="face boxes file (see lgc_fast.data.load_boxes); default: ground-truth box + 17 %%")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="the network's arithmetic, as lgc-fast predict's (default auto: bfloat16 on a CPU with "
                             "hardware bfloat16, else float32)")
    add_loading_arguments(parser)
    parser.add_argument("--limit", type=int, help="evaluate only the first N faces (in path order)")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="evaluate every Nth face of the split")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="all faces of --data, or one side of lgc-fast train's person split of it (the same "
                             "--val-fraction, --seed and --limit give the same split)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as given to lgc-fast train (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="as given to lgc-fast train (default 0)")


def resolve_device(name: str) -> torch.device:
    """--device: auto, or a torch device that works here; LgcError naming it otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LgcError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LgcError(f"--device {name}: no CUDA device is available")
    try:  # a device type this torch lacks (mps, xpu), a missing cuda:N, or meta (no data) fails only when used
        torch.zeros(1).to(device).cpu()
    except Exception as exc:  # torch raises RuntimeError, AssertionError, NotImplementedError, ... here
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LgcError(f"--device {name}: not usable here ({why})") from None
    return device


def _image_problem(record, path) -> str | None:
    """Why the record's image cannot serve: unreadable, or (for a face record) every labelled point outside it."""
    gray = read_gray(path)
    if gray is None:
        return "cannot read or decode the image"
    labelled = getattr(record, "labelled", None)
    if labelled is None or not np.any(labelled):
        return None
    xy = np.asarray(record.points)[np.asarray(labelled, dtype=bool)]
    height, width = gray.shape
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= width - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= height - 0.5)
    if not inside.any():
        return f"all {len(xy)} labelled points lie outside the {width}x{height} image (a .pts of another image?)"
    return None


def add_loading_arguments(parser) -> None:
    """--workers and --on-bad-data, which train and eval share (checked by check_workers and argparse)."""
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader processes")
    parser.add_argument("--on-bad-data", choices=("skip", "stop"), default="skip",
                        help="skip unreadable or malformed files and faces annotated wholly outside their image "
                        "(named on stderr) or stop at the first")


def check_workers(workers: int) -> None:
    if workers < 0:
        raise LgcError(f"--workers must be >= 0, got {workers}")


def readable_images(records, on_bad_data: str, workers: int = 1,
                    path_of=attrgetter("image_path")) -> tuple[list, list[str]]:
    """Decode every image once up front -> (records whose image decodes and holds the face, problems). With
    on_bad_data="stop" the first unreadable image, or face whose labelled points all lie outside its image (a .pts of
    another image), raises LgcError naming it; a run never meets it half-way (or substitutes another face for it).
    path_of(record): the record's image file (default: its ``image_path``; pass ``Path`` for plain paths)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # OpenCV decodes without the GIL
        found = list(pool.map(lambda r: _image_problem(r, path_of(r)), records))
    kept, problems = [], []
    for record, problem in zip(records, found):
        if problem is None:
            kept.append(record)
            continue
        message = f"{path_of(record)}: {problem}"
        if on_bad_data == "stop":
            raise LgcError(message)
        problems.append(message)
    return kept, problems


def load_faces(data, boxes, on_bad_data: str, workers: int, limit: int | None = None) -> tuple[list, list[str]]:
    """scan_folder + readable_images: (records in path order, problems), LgcError when no usable face is left."""
    records, problems = scan_folder(data, boxes=boxes, on_error="raise" if on_bad_data == "stop" else "skip")
    if limit is not None:
        records = records[:limit]
    records, unreadable = readable_images(records, on_bad_data, workers)
    problems += unreadable
    if not records:
        raise LgcError(f"{data}: no usable annotated faces (NAME.jpg beside NAME.pts)"
                       + (f"; first problem: {problems[0]}" if problems else ""))
    return records, problems


def report_problems(problems: list[str], command: str, shown: int = 10) -> None:
    for message in problems[:shown]:
        print(f"lgc-fast {command}: skipped {message}", file=sys.stderr)
    if len(problems) > shown:
        print(f"lgc-fast {command}: ... and {len(problems) - shown} more skipped file(s)", file=sys.stderr)


@torch.no_grad()
def predict(model, loader, device, method: str = "argmax", amp: bool = False, channels_last: bool = False,
            mirror: bool = False, to_points=None, dtype: torch.dtype = torch.float32):
    """Yield (batch, points (N, C, 2) in crop pixels) for every batch of `loader`; model in eval mode.

    The points are decode(omega, method) on the device, or to_points(omega) when given (e.g. a Detector's shape fit);
    mirror: omega averaged with the mirror images' (``model.mirror_averaged_omega``); dtype: the weights' and
    images' (a Detector's precision; amp instead autocasts a float32 network).
    """
    model.eval()
    if isinstance(model, LGCN):  # the same outputs with fewer passes: BatchNorm folded into the convolutions
        model = model.folded()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    model = model.to(dtype)
    for batch in loader:
        images = batch["image"].to(device, dtype, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            omega = mirror_averaged_omega(model, images) if mirror else model(images)[1]
        yield batch, (decode(omega.float(), method)[0] if to_points is None else to_points(omega.float()))


def crop_to_image(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """points: (N, C, 2) crop pixels, affine: (N, 2, 3) image -> crop  ->  (N, C, 2) image pixels."""
    linear, offset = affine[:, :, :2], affine[:, :, 2]
    return np.einsum("nij,ncj->nci", np.linalg.inv(linear), points - offset[:, None, :])


def evaluate(args) -> dict:
    """Run the evaluation described by the CLI arguments; returns the report (also written under --out)."""
    if args.batch_size < 1:
        raise LgcError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_workers(args.workers)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    state = load_checkpoint(args.checkpoint)
    model = model_from_state(state, args.checkpoint, device).eval()
    image_size = int(state.get("image_size", DEFAULT_IMAGE_SIZE))
    if args.limit is not None and args.limit < 1:
        raise LgcError(f"--limit must be >= 1, got {args.limit}")
    if args.every < 1:
        raise LgcError(f"--every must be >= 1, got {args.every}")
    if not args.fit and (args.point_offsets or args.save_point_offsets):
        raise LgcError("--point-offsets and --save-point-offsets need --fit (they are errors of the shape fit)")
    if args.point_offsets and args.save_point_offsets:
        raise LgcError("pass --point-offsets or --save-point-offsets, not both (measure the errors uncorrected)")
    # Output folders are made now, so that an unusable --out or --save-point-offsets fails before the evaluation
    # rather than losing it.
    if args.out is not None:
        make_output_folder(args.out, "--out")
    if args.save_point_offsets is not None:
        make_output_file_folder(args.save_point_offsets, "--save-point-offsets")
    records, problems = load_faces(args.data, args.boxes, args.on_bad_data, args.workers, args.limit)
    report_problems(problems, "eval")
    if args.split != "all":
        if not 0.0 < args.val_fraction < 1.0:
            raise LgcError(f"--val-fraction must be in (0, 1) with --split {args.split}, got {args.val_fraction}")
        records = split_by_person(records, args.val_fraction, args.seed)[SPLITS.index(args.split) - 1]
    records = records[::args.every]
    dataset = LandmarkDataset(records, out_size=image_size, augment=False, on_error="raise")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    to_points, similarities = None, []
    if args.fit:
        offsets = None
        if args.point_offsets is not None:
            offsets = pipeline_settings(read_json_object(args.point_offsets), args.point_offsets).get("point_offsets")
            if offsets is None:
                raise LgcError(f"{args.point_offsets}: no pipeline.point_offsets")
        detector = Detector(model, args.shape_model, device, args.decode, fit=True, image_size=image_size,
                            fit_threshold=args.fit_threshold, point_offsets=offsets, precision=precision)

        def to_points(omega):
            points, _, alive, shape_fit = detector.points_from_heatmaps(omega)
            similarity = torch.full((len(points), 4), math.nan, dtype=torch.float64)
            if shape_fit is not None:
                similarity[alive.cpu()] = shape_fit.similarity.double().cpu()
            similarities.append(similarity)
            return points
    n_points = model.n_landmarks
    predicted, crop_points = np.zeros((len(records), n_points, 2)), np.zeros((len(records), n_points, 2))
    crop_truth, crop_labelled = np.zeros((len(records), n_points, 2)), np.zeros((len(records), n_points), bool)
    fit_similarity = np.full((len(records), 4), math.nan)
    # channels_last as the Detector runs the network (oneDNN: 1.2x in bfloat16 on a batch of 32 here); with --fit the
    # Detector's own copy, already folded, channels_last and in the precision.
    network = detector.network if args.fit else model
    for batch, points in predict(network, loader, device, args.decode, channels_last=True, mirror=args.mirror,
                                 to_points=to_points, dtype=PRECISIONS[precision]):
        index = batch["index"].numpy()
        crop_points[index] = points.double().cpu().numpy()
        crop_truth[index], crop_labelled[index] = batch["points"].numpy(), batch["labelled"].numpy()
        if similarities:
            fit_similarity[index] = similarities.pop().numpy()
        predicted[index] = crop_to_image(crop_points[index], batch["affine"].double().numpy())
    if args.save_point_offsets is not None:
        fitted = np.isfinite(fit_similarity).all(axis=1)
        offsets = mean_point_offsets(crop_points[fitted], crop_truth[fitted], crop_labelled[fitted],
                                     fit_similarity[fitted])
        measured_on = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
                       "every": args.every, "faces": int(fitted.sum()), "fit_threshold": args.fit_threshold,
                       "decode": args.decode, "mirror": args.mirror}
        write_point_offsets(args.save_point_offsets, offsets, measured_on)
    gt = np.stack([r.points for r in records])
    labelled = np.stack([r.labelled for r in records])
    errors = metrics.all_errors(predicted, np.nan_to_num(gt), labelled)
    report = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "precision": precision, "decode": args.decode,
        "fit": args.fit,
        "fit_threshold": args.fit_threshold if args.fit else None, "mirror": args.mirror,
        "point_offsets": None if args.point_offsets is None else str(args.point_offsets), "every": args.every,
        "image_size": image_size,
        "split": args.split if args.split == "all" else {"side": args.split, "val_fraction": args.val_fraction,
                                                         "seed": args.seed, "limit": args.limit},
        "images": len(records), "skipped": problems,
        "metrics": {key: metrics.summarize(values) for key, values in errors.items()},
        "notes": "NME = mean point error / normaliser; box = sqrt(w*h) of the tight ground-truth box; "
                 "auc@t = area under the CED on [0, t] / t; failure_rate@t = fraction of images with NME > t",
    }
    names = [r.image_path.relative_to(args.data).as_posix() for r in records]
    if args.out is not None:
        write_outputs(Path(args.out), report, names, errors)
    return report


def write_point_offsets(path: Path, offsets: np.ndarray, measured_on: dict) -> None:
    """{"pipeline": {"point_offsets": offsets (C, 2)}, "measured_on": ...} as JSON, one landmark per line (atomic)."""
    rows = ",\n".join(f"   [{x:.6f}, {y:.6f}]" for x, y in offsets)
    atomic_write_text(path, f'{{\n "pipeline": {{"point_offsets": [\n{rows}\n ]}},\n'
                            f' "measured_on": {json.dumps(measured_on)}\n}}\n')


def write_outputs(out: Path, report: dict, names: list[str], errors: dict[str, np.ndarray]) -> None:
    """report.json, errors.csv and ced.png under `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(_json_safe(report), indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = list(errors)
    writer.writerow(["image"] + keys)
    for i, name in enumerate(names):
        writer.writerow([name] + ["" if math.isnan(errors[k][i]) else f"{errors[k][i]:.6f}" for k in keys])
    atomic_write_text(out / "errors.csv", buffer.getvalue())
    note = plot_ced(out / "ced.png", errors, pipeline_name(report))
    if note:
        print(f"lgc-fast eval: {note}", file=sys.stderr)


def plot_ced(path: Path, errors: dict[str, np.ndarray], title: str) -> str | None:
    """Cumulative error curves, one panel per normaliser (68 and 51 points); returns a note if it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed; {path.name} not written (pip install matplotlib)"
    # At least up to the 10 % threshold; further out when most errors are larger (an early or weak model).
    q90 = [np.nanquantile(v, 0.9) for v in errors.values() if np.isfinite(v).any()]
    x_max = float(min(0.5, max([CED_MAX_ERROR] + [1.05 * q for q in q90])))
    fig, axes = plt.subplots(1, len(metrics.NORMALISERS), figsize=(5 * len(metrics.NORMALISERS), 4), sharey=True)
    for ax, normaliser in zip(axes, metrics.NORMALISERS):
        for subset in metrics.SUBSETS:
            values = errors[f"{normaliser}/{subset}"]
            x, y = metrics.ced(values, x_max)
            summary = metrics.summarize(values)
            ax.plot(x, y, label=f"{subset} points (mean {summary['mean']:.4f}, AUC@0.1 {summary['auc@0.1']:.3f})")
        for t in metrics.THRESHOLDS:
            ax.axvline(t, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, x_max)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"NME ({normaliser.replace('_', '-')})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("fraction of images")
    fig.suptitle(f"cumulative error distribution ({title})")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    return None


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def pipeline_name(report: dict) -> str:
    """How the report's points were made, e.g. "shape fit (threshold 0.5)" or "decode argmax, mirrored"."""
    if report.get("fit"):
        name = f"shape fit (threshold {report['fit_threshold']:g})"
        name += "" if report["decode"] == "argmax" else f" + {report['decode']} blend"
    else:
        name = f"decode {report['decode']}"
    return name + (", mirrored" if report.get("mirror") else "")


def format_summary(report: dict) -> str:
    lines = [f"{report['images']} images, {pipeline_name(report)}",
             f"{'normaliser/points':22s} {'mean':>7s} {'median':>7s} {'fail@8':>7s} {'fail@10':>7s} "
             f"{'auc@8':>7s} {'auc@10':>7s}"]
    for key, s in report["metrics"].items():
        lines.append(f"{key:22s} {s['mean']:7.4f} {s['median']:7.4f} {s['failure_rate@0.08']:7.2%} "
                     f"{s['failure_rate@0.1']:7.2%} {s['auc@0.08']:7.4f} {s['auc@0.1']:7.4f}")
    return "\n".join(lines)


def run(args) -> int:
    report = evaluate(args)
    print(format_summary(report))
    if args.out is not None:
        written = [p for p in ("report.json", "errors.csv", "ced.png") if (args.out / p).exists()]
        print(f"wrote {', '.join(written)} in {args.out}")
    return 0
