"""``lgc-fast predict``: landmarks for image files, written as JSON (+ overlay PNG, + optional 300-W .pts).

Per input image STEM.EXT the output folder gets STEM.json::

    {"image": "path/as/given.jpg", "width": W, "height": H, "mode": "boxes" | "detect",
     "coordinates": "0-based pixels, pixel centres at integers",
     "faces": [{"box": [x0, y0, x1, y1], "score": s, "points": [[x, y] x 68], "confidence": [c x 68]}, ...]}

faces sorted by score; STEM.png, the image with the faces drawn (unless --no-overlay); and with --pts, STEM.pts
holding the best face in the 300-W layout (1-based; none when no face was found), so that results feed back into a
training folder. Stems that
repeat among the inputs get _2, _3, ... appended (never another input's stem); an --out where an output would replace
an input image is refused. Images listed in --boxes use their boxes; the others (and every image without --boxes)
are searched for faces (section 4.3). An image that cannot be read, or whose box misses it, is reported by name on
stderr and skipped; the exit status is nonzero only when no image at all could be processed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from lgc_fast.errors import LgcError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _box(values, where: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise LgcError(f"{where}: a box must be four numbers x0 y0 x1 y1, got {values!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[2] > box[0] and box[3] > box[1]):
        raise LgcError(f"{where}: a box must be four finite numbers x0 y0 x1 y1 with x1 > x0 and y1 > y0, "
                       f"got {values!r}")
    return box


def load_face_boxes(path) -> dict[str, list[tuple[float, float, float, float]]]:
    """Face boxes per image from `path`: ``*.json`` {"KEY": [x0, y0, x1, y1] or [[x0, y0, x1, y1], ...]}; any other
    file is text, one box per line ``KEY x0 y0 x1 y1`` (a KEY may repeat: several faces; '#' starts a comment line).
    KEY is the image path as given on the command line or its file name. 0-based pixel coordinates."""
    from lgc_fast.data.records import read_boxes_file

    boxes: dict[str, list] = {}
    for key, value, where in read_boxes_file(path, expected="boxes"):
        many = isinstance(value, list) and value and all(isinstance(v, (list, tuple)) for v in value)
        boxes.setdefault(key, []).extend(_box(v, where) for v in (value if many else [value]))
    return boxes


def expand_inputs(inputs) -> list[Path]:
    """Files as given; a folder stands for the images directly inside it (sorted)."""
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(item)
    return paths


def _unique_stems(paths: list[Path]) -> list[str]:
    """One output stem per path: its own stem the first time, then STEM_2, STEM_3, ..., skipping every stem that
    another input has (a.jpg, a.png, a_2.jpg -> a, a_3, a_2), so that no two inputs share output files."""
    taken = {path.stem for path in paths}
    seen: set[str] = set()
    stems = []
    for path in paths:
        stem = path.stem
        if stem in seen:
            count = 2
            while f"{stem}_{count}" in taken:
                count += 1
            stem = f"{stem}_{count}"
            taken.add(stem)
        seen.add(path.stem)
        stems.append(stem)
    return stems


def _check_outputs_spare_inputs(paths: list[Path], outputs: list[Path]) -> None:
    """LgcError when an output file would replace an input image (--out is the images' folder and an overlay
    STEM.png is one of them): the image would be lost, and read back as the overlay if it comes later."""
    inputs = {path.resolve(): path for path in paths}
    for output in outputs:
        if output.resolve() in inputs:
            raise LgcError(f"--out {output.parent}: {output.name} would overwrite the input image "
                           f"{inputs[output.resolve()]}; choose another --out (or --no-overlay)")


def read_color(path: Path):
    """(H, W, 3) BGR uint8, or None when the file cannot be read or decoded."""
    import cv2

    try:
        encoded = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if encoded.size else None
    return image if image is not None and image.size else None


def _check_box_on_image(box, width: int, height: int, crop: int, path: Path) -> None:
    """LgcError naming the image when the network's crop of `box` would hold none of it or less than one of the crop's
    pixels: the points would be made up (and far off, the overlay could not be drawn)."""
    x0, y0, x1, y1 = box
    if x1 <= -0.5 or y1 <= -0.5 or x0 >= width - 0.5 or y0 >= height - 0.5:
        raise LgcError(f"{path}: box {list(box)} lies outside the {width} x {height} image")
    if max(x1 - x0, y1 - y0) > crop * max(width, height):
        raise LgcError(f"{path}: box {list(box)} is too large for the {width} x {height} image (the image would "
                       f"fill less than one pixel of the network's {crop} px crop)")


def predict_image(detector, path: Path, boxes, detect_options: dict) -> dict:
    """The JSON record of one image (see the module docstring). LgcError when the image cannot be read or a box
    misses it."""
    from lgc_fast.detect import load_gray

    gray = load_gray(path)
    for box in boxes or ():
        _check_box_on_image(box, gray.shape[1], gray.shape[0], detector.crop, path)
    if boxes is None:
        faces, mode = detector.detect(gray, **detect_options), "detect"
    else:
        faces, mode = detector.landmarks(gray, boxes), "boxes"
    faces = sorted(faces, key=lambda f: -f.score)
    return {"image": str(path), "width": int(gray.shape[1]), "height": int(gray.shape[0]), "mode": mode,
            "coordinates": "0-based pixels, pixel centres at integers", "faces": [f.to_dict() for f in faces]}


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files or folders of images")
    parser.add_argument("--boxes", type=Path, metavar="FILE",
                        help="face boxes (JSON or 'KEY x0 y0 x1 y1' lines); images not listed are searched")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument("--weights", type=Path, help="checkpoint or exported weights (default: the bundled model)")
    parser.add_argument("--shape-model", type=Path, help="shape model .npz (default: the bundled one)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    from lgc_fast.detect import DECODERS, DEFAULT_DECODE, FIT_THRESHOLD, PRECISION_CHOICES
    from lgc_fast.multiface import MIN_PYRAMID_STEP, PYRAMID_STEP, THRESHOLD

    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="the network's arithmetic (default auto: bfloat16 on a CPU with hardware bfloat16, "
                             "about twice as fast there, else float32; float16 is faster on a GPU and very slow on "
                             "a CPU; see the README's inference table)")
    parser.add_argument("--decode", choices=sorted(DECODERS),
                        help="heatmap decoder (default: the bundled model's choice in its metadata, for other "
                             f"weights {DEFAULT_DECODE})")
    parser.add_argument("--no-fit", action="store_true", help="decode only, without the PCA shape fit")
    parser.add_argument("--fit-threshold", type=float,
                        help="pixels above this share of their channel's maximum enter the shape fit (default: the "
                             f"bundled model's choice in its metadata, for other weights {FIT_THRESHOLD:g})")
    parser.add_argument("--mirror", action="store_true",
                        help="average each boxed face's heatmaps with its mirror image's (twice the network time)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="heatmap threshold of the face search")
    parser.add_argument("--pyramid-step", type=float, default=PYRAMID_STEP,
                        help=f"size factor between the face search's pyramid levels (default {PYRAMID_STEP:g}, the "
                             "paper's; 1.41 finds more faces between the trained sizes, at 1.5x the time; at least "
                             f"{MIN_PYRAMID_STEP:g})")
    parser.add_argument("--pts", action="store_true", help="also write STEM.pts (300-W, 1-based) with the best face")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay PNGs")


def run(args) -> int:
    from lgc_fast._io import atomic_write_text, make_output_folder
    from lgc_fast.data.pts import write_pts
    from lgc_fast.detect import Detector
    from lgc_fast.multiface import check_pyramid_step
    from lgc_fast.draw import draw_faces, save_image
    from lgc_fast.evaluate import resolve_device

    check_pyramid_step(args.pyramid_step, "--pyramid-step")  # before the model loads
    boxes = load_face_boxes(args.boxes) if args.boxes is not None else {}
    paths = expand_inputs(args.images)
    if not paths:
        raise LgcError("no images: the given folders hold no image files")
    stems = _unique_stems(paths)
    suffixes = [".json"] + [".pts"] * args.pts + [".png"] * (not args.no_overlay)
    _check_outputs_spare_inputs(paths, [args.out / f"{stem}{suffix}" for stem in stems for suffix in suffixes])
    device = None if args.device is None else resolve_device(args.device)
    detector = Detector(weights=args.weights, shape_model=args.shape_model, device=device,
                        decode=args.decode, fit=not args.no_fit, mirror=args.mirror,
                        fit_threshold=args.fit_threshold, precision=args.precision)
    if args.shape_model is not None:
        detector.shape_model  # noqa: B018 - loads and checks the file now: one error, before --out is made
    make_output_folder(args.out, "--out")
    done = 0
    for path, stem in zip(paths, stems):
        given = boxes.get(str(path), boxes.get(path.name))
        try:
            search = {"threshold": args.threshold, "pyramid_step": args.pyramid_step}
            record = predict_image(detector, path, given, search)
        except LgcError as exc:
            print(f"lgc-fast predict: skipped: {exc}", file=sys.stderr)  # the message names the file
            continue
        atomic_write_text(args.out / f"{stem}.json", json.dumps(record, indent=1) + "\n")
        if args.pts and record["faces"]:
            write_pts(args.out / f"{stem}.pts", np.asarray(record["faces"][0]["points"]))
        if not args.no_overlay:
            color = read_color(path)
            if color is not None:
                save_image(args.out / f"{stem}.png", draw_faces(color, record["faces"]))
        print(f"{path}: {len(record['faces'])} face(s) ({record['mode']})")
        done += 1
    print(f"{done} of {len(paths)} images processed; results in {args.out}")
    return 0 if done else 1
