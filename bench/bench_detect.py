"""Detection without boxes (``Detector.detect``, paper section 4.3) on multi-face scenes with known truth: recall,
precision, point error and time per image, over a grid of the detector's thresholds, to calibrate its defaults.

Scenes: validation faces (the training run's 90/10 split by person, seed 0, so the network never saw them) pasted
onto cluttered backgrounds (``lgc_fast.data.composite``), one to four per scene, training boxes log-uniform between
1x and 3.5x the network's crop. A found face matches a true one when their training boxes overlap by IoU >= 0.5
(greedy, best score first); its error is the NME over 68 points normalised by the true box (sqrt(w h) of the tight
box). The pyramid forward runs once per scene, steps 3-6 up to the shape fit once per threshold, and the filters
of step 6 once per setting of the grid.

Usage: python bench/bench_detect.py [--weights W] [--shape-model S] [--scenes 24] [--pyramid-step 2] [--quick]
                                    [--out PATH]
Writes the results under "detect" (another --pyramid-step: "detect_stepS") in bench/results/<device-slug>.json
(merged with other benches).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import environment, format_table, results_path, write_results  # noqa: E402

from lgc_fast.data import face_box, scan_folder, split_by_person, square_to_box  # noqa: E402
from lgc_fast.data.composite import clutter_background, paste_faces, random_placements  # noqa: E402
from lgc_fast import multiface  # noqa: E402
from lgc_fast.detect import PRECISION_CHOICES, Detector, load_gray  # noqa: E402
from lgc_fast.multiface import box_iou, select_faces  # noqa: E402
from lgc_fast.metrics import nme  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ytf68" / "trainset"
BENCH = "detect"
GRID = {"threshold": (0.2, 0.3, 0.4, 0.5, 0.6), "min_support": (20, 30, 40, 50), "max_mahalanobis": (5.75, 8.0, 12.0)}
DEFAULTS = {"threshold": multiface.THRESHOLD, "min_support": multiface.MIN_SUPPORT,
            "max_mahalanobis": multiface.MAX_MAHALANOBIS}
MATCH_IOU = 0.5


def make_scenes(records, crop: int, count: int, seed: int):
    """count scenes (canvas RGB, [true points (68, 2)]) of 1-4 validation faces each."""
    rng = np.random.default_rng(seed)
    height, width = int(5.6 * crop), int(7.5 * crop)
    scenes = []
    for _ in range(count):
        placements = random_placements(rng, int(rng.integers(1, 5)), height, width, crop, 3.5 * crop)
        chosen = rng.choice(len(records), size=len(placements), replace=False)
        faces = [(records[i].image_path, records[i].points) for i in chosen]
        scenes.append(paste_faces(faces, placements, height, width, clutter_background(rng, height, width)))
    return scenes


def score_scene(found, truth) -> tuple[int, int, list[float]]:
    """(true faces matched, false detections, NME per matched face)."""
    boxes = [square_to_box(*face_box(t)) for t in truth]
    free = set(range(len(truth)))
    errors, false = [], 0
    for face in sorted(found, key=lambda f: -f.score):
        best = max(free, key=lambda j: box_iou(face.box, boxes[j]), default=None)
        if best is None or box_iou(face.box, boxes[best]) < MATCH_IOU:
            false += 1
            continue
        free.discard(best)
        errors.append(float(nme(face.points[None], truth[best][None], normaliser="box")[0]))
    return len(truth) - len(free), false, errors


def milliseconds(seconds: list[float]) -> dict:
    return {"median": 1e3 * float(np.median(seconds)), "p20": 1e3 * float(np.quantile(seconds, 0.2)),
            "p80": 1e3 * float(np.quantile(seconds, 0.8)), "runs": len(seconds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="300-W folder the network was trained on (default: ytf68)")
    p.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--shape-model", default=None, help="shape model .npz (default: the bundled one)")
    p.add_argument("--scenes", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pyramid-step", type=float, default=multiface.PYRAMID_STEP, help="size factor between levels")
    p.add_argument("--quick", action="store_true", help="3 scenes, the default setting only")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="the network's arithmetic (default auto, as Detector's: bfloat16 on a CPU with hardware "
                        "bfloat16, else float32)")
    p.add_argument("--out", type=Path, help="JSON file (default bench/results/<device-slug>.json)")
    args = p.parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_detect: skipped, no data at {args.data}", file=sys.stderr)
        return 0
    det = Detector(weights=args.weights, shape_model=args.shape_model, precision=args.precision)
    records, _ = scan_folder(args.data)
    _, val = split_by_person(records)
    scenes = make_scenes(val, det.crop, 3 if args.quick else args.scenes, args.seed)
    grid = [DEFAULTS] if args.quick else [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    if DEFAULTS not in grid:
        grid.append(DEFAULTS)
    tallies = [[0, 0, []] for _ in grid]  # matched, false, errors
    forward_s, post_s, n_true = [], [], 0
    for canvas, truth in scenes:
        gray = load_gray(canvas)
        start = time.perf_counter()
        with torch.no_grad():
            levels = det.pyramid_heatmaps(gray, args.pyramid_step)
        forward_s.append(time.perf_counter() - start)
        n_true += len(truth)
        hypotheses = {}
        for threshold in sorted({setting["threshold"] for setting in grid}):
            start = time.perf_counter()
            hypotheses[threshold] = det.hypotheses_from_levels(levels, gray.shape, threshold)
            post_s.append(time.perf_counter() - start)
        for setting, tally in zip(grid, tallies):
            found = select_faces(hypotheses[setting["threshold"]], setting["min_support"],
                                 setting["max_mahalanobis"])
            matched, false, errors = score_scene(found, truth)
            tally[0] += matched
            tally[1] += false
            tally[2] += errors
    rows = []
    for setting, (matched, false, errors) in zip(grid, tallies):
        recall, found = matched / n_true, matched + false
        precision = matched / found if found else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({**setting, "recall": recall, "precision": precision, "f1": f1, "false_per_image": false /
                     len(scenes), "nme_box_mean": float(np.mean(errors)) if errors else None,
                     "nme_box_median": float(np.median(errors)) if errors else None,
                     "default": setting == DEFAULTS})
    rows.sort(key=lambda r: (-r["f1"], -r["recall"]))
    print(format_table(rows, [("threshold", "threshold"), ("min_support", "support"),
                              ("max_mahalanobis", "mahalanobis"), ("recall", "recall"), ("precision", "precision"),
                              ("f1", "F1"), ("false_per_image", "false/img"), ("nme_box_mean", "NME box"),
                              ("default", "default")]))
    print(f"{len(scenes)} scenes ({scenes[0][0].shape[1]}x{scenes[0][0].shape[0]}), {n_true} faces on "
          f"{det.device}: pyramid forward median {1e3 * np.median(forward_s):.0f} ms per image, steps 3-6 median "
          f"{1e3 * np.median(post_s):.0f} ms per image and threshold")
    payload = {
        "environment": environment(det.device),
        "weights": str(args.weights or "bundled"), "crop": det.crop, "scenes": len(scenes), "faces": n_true,
        "image_size": list(scenes[0][0].shape[:2]), "seed": args.seed, "match_iou": MATCH_IOU,
        "pyramid_step": args.pyramid_step,
        "precision": det.precision, "forward_ms": milliseconds(forward_s), "steps_3_to_6_ms": milliseconds(post_s),
        "results": rows,
    }
    key = BENCH if args.pyramid_step == multiface.PYRAMID_STEP else f"{BENCH}_step{args.pyramid_step:.3g}"
    print(f"wrote {write_results(args.out or results_path(det.device), key, payload)} (key {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
