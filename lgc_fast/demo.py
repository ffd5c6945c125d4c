"""``lgc-fast demo``: the bundled model on the bundled image, offline, on the CPU.

The image is scikit-image's ``astronaut`` (Eileen Collins, NASA; public domain), 512 x 512 RGB. Its face box is known
(``demo_box``; assets/metadata.json may override it with ``"demo_box": [x0, y0, x1, y1]``), so the demo does not
depend on multi-face detection; ``--detect`` runs that instead.
"""
from __future__ import annotations

from pathlib import Path

from lgc_fast._io import make_output_folder
from lgc_fast.errors import LgcError

DEMO_IMAGE = Path(__file__).resolve().parent / "assets" / "astronaut.png"
# The training box of the face (tight box around the 68 points enlarged by 17 %, see data.face_box), read off the
# image: jaw ~183..268 px, brows ~90 px, chin ~172 px.
DEMO_BOX = (176.0, 81.0, 275.0, 181.0)


def demo_box() -> tuple[float, float, float, float]:
    """The face box of the bundled image: assets metadata's "demo_box" when present, else DEMO_BOX."""
    from lgc_fast.detect import ASSETS_DIR, METADATA_FILE, read_metadata

    box = read_metadata(ASSETS_DIR / METADATA_FILE).get("demo_box", DEMO_BOX)
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise LgcError(f"assets metadata: demo_box must be [x0, y0, x1, y1], got {box!r}")
    return tuple(float(v) for v in box)


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the overlay PNG (default: here)")
    parser.add_argument("--weights", type=Path, help="checkpoint or exported weights (default: the bundled model)")
    parser.add_argument("--shape-model", type=Path, help="shape model .npz (default: the bundled one)")
    parser.add_argument("--detect", action="store_true", help="find the face without its known box (section 4.3)")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the network's arithmetic (default auto: bfloat16 on a CPU with hardware bfloat16)")


def run(args) -> int:
    import cv2

    from lgc_fast.detect import Detector
    from lgc_fast.draw import draw_faces, save_image

    if not DEMO_IMAGE.is_file():
        raise LgcError(f"the demo image {DEMO_IMAGE} is missing from this installation")
    make_output_folder(args.out, "--out")
    detector = Detector(weights=args.weights, shape_model=args.shape_model, device="cpu", precision=args.precision)
    print(f"network in {detector.precision} on the CPU")
    if args.detect:
        faces = detector.detect(str(DEMO_IMAGE))
        if not faces:
            print("no face found")
            return 1
    else:
        faces = detector.landmarks(str(DEMO_IMAGE), demo_box())
    face = faces[0]
    print(f"{DEMO_IMAGE.name}: score {face.score:.3f}, box {', '.join(f'{v:.1f}' for v in face.box)}")
    print("point      x        y   confidence   (0-based pixels)")
    for index, ((x, y), c) in enumerate(zip(face.points, face.confidence), start=1):
        print(f"{index:5d} {x:8.2f} {y:8.2f}   {c:.3f}")
    overlay = args.out / "astronaut_landmarks.png"
    save_image(overlay, draw_faces(cv2.imread(str(DEMO_IMAGE)), [f.to_dict() for f in faces]))
    print(f"wrote {overlay}")
    return 0
