"""``lgc-fast predict`` and ``lgc-fast demo`` on real files with a small random network (no trained weights here)."""
import json
import math
import shutil

import cv2
import numpy as np
import pytest
import torch

from lgc_fast import cli
from lgc_fast.checkpoint import save_checkpoint
from lgc_fast.data import face_box, read_pts
from lgc_fast.demo import DEMO_BOX, DEMO_IMAGE
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN
from lgc_fast.predict import expand_inputs, load_face_boxes
from lgc_fast.shape import ShapeModel


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A random tiny network and a shape model fitted to synthetic shapes, as files."""
    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    net = LGCN("release", width=8, local_layers=(3,))
    save_checkpoint(folder / "net.pt", {"config": net.config, "model": net.state_dict()})
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 90, (68, 2))
    shapes = base + rng.normal(0, 2.0, (40, 68, 2))
    ShapeModel.fit(shapes, n_modes=12).save(folder / "shape.npz")
    return folder / "net.pt", folder / "shape.npz"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_skips_bad_files_by_name_and_processes_the_rest(trainset_dir, assets, tmp_path, capsys):
    weights, shape = assets
    folder = tmp_path / "in"
    folder.mkdir()
    names = sorted(p.stem for p in trainset_dir.glob("*.pts"))[:2]
    for name in names:
        shutil.copy(trainset_dir / f"{name}.jpg", folder / f"{name}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image\n")
    truth = read_pts(trainset_dir / f"{names[0]}.pts")
    cx, cy, size = face_box(truth)
    box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
    (tmp_path / "boxes.json").write_text(json.dumps({f"{names[0]}.jpg": box}))
    out = tmp_path / "out"
    inputs = [folder / f"{names[0]}.jpg", folder / "broken.jpg", folder / "notes.txt", folder / f"{names[1]}.jpg"]
    code, stdout, stderr = _run(capsys, "predict", *inputs, "--boxes", tmp_path / "boxes.json", "--out", out,
                                "--weights", weights, "--shape-model", shape, "--device", "cpu", "--pts")
    assert code == 0
    skipped = [line for line in stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 2
    assert "broken.jpg" in skipped[0] and "notes.txt" in skipped[1]
    assert "2 of 4 images processed" in stdout

    record = json.loads((out / f"{names[0]}.json").read_text())
    image = cv2.imread(str(folder / f"{names[0]}.jpg"))
    assert record["mode"] == "boxes" and record["image"] == str(inputs[0])
    assert (record["height"], record["width"]) == image.shape[:2]
    (face,) = record["faces"]
    assert set(face) == {"box", "score", "points", "confidence"}
    assert np.asarray(face["points"]).shape == (68, 2) and len(face["confidence"]) == 68
    assert np.allclose(face["box"], box, atol=0.01) and 0 <= face["score"] <= 1
    # the .pts round-trips through the 300-W reader (1-based on disk)
    assert np.allclose(read_pts(out / f"{names[0]}.pts"), face["points"], atol=1e-3)
    overlay = cv2.imread(str(out / f"{names[0]}.png"))
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)

    other = json.loads((out / f"{names[1]}.json").read_text())
    assert other["mode"] == "detect" and isinstance(other["faces"], list)
    assert not (out / "broken.json").exists() and not (out / "notes.json").exists()


def test_predict_fails_only_when_nothing_was_processed(assets, tmp_path, capsys):
    weights, shape = assets
    (tmp_path / "a.png").write_bytes(b"garbage")
    code, _, stderr = _run(capsys, "predict", tmp_path / "a.png", tmp_path / "missing.jpg", "--out", tmp_path / "o",
                           "--weights", weights, "--shape-model", shape, "--device", "cpu")
    assert code == 1
    assert "a.png" in stderr and "missing.jpg" in stderr


@pytest.mark.parametrize("step", ["1", "1.0001"])
def test_predict_rejects_a_pyramid_that_does_not_shrink_enough(tmp_path, capsys, step):
    """1.0001 used to build thousands of levels until the memory ran out."""
    code, _, stderr = _run(capsys, "predict", DEMO_IMAGE, "--out", tmp_path / "o", "--pyramid-step", step)
    assert code == 2 and "--pyramid-step must be at least 1.1" in stderr and len(stderr.strip().splitlines()) == 1


def test_predict_without_bundled_weights_says_what_to_pass(tmp_path, capsys, monkeypatch):
    from lgc_fast import detect

    monkeypatch.setattr(detect, "ASSETS_DIR", tmp_path)
    code, _, stderr = _run(capsys, "predict", DEMO_IMAGE, "--out", tmp_path / "o")
    assert code == 2 and "lgcn.pt" in stderr and "weights" in stderr and len(stderr.strip().splitlines()) == 1


def test_face_box_files(tmp_path):
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"a.jpg": [1, 2, 30, 40], "dir/b.jpg": [[0, 0, 5, 5], [10, 10, 20, 30]]}))
    assert load_face_boxes(js) == {"a.jpg": [(1, 2, 30, 40)], "dir/b.jpg": [(0, 0, 5, 5), (10, 10, 20, 30)]}
    txt = tmp_path / "b.txt"
    txt.write_text("# name x0 y0 x1 y1\nmy face.jpg 1 2 3 4\nmy face.jpg 5 6 7 8\n\nz.png 0 0 1 1\n")
    assert load_face_boxes(txt) == {"my face.jpg": [(1, 2, 3, 4), (5, 6, 7, 8)], "z.png": [(0, 0, 1, 1)]}
    bad = tmp_path / "bad.txt"
    bad.write_text("x.jpg 5 5 1 1\n")
    with pytest.raises(LgcError, match=r"bad.txt:1"):
        load_face_boxes(bad)
    with pytest.raises(LgcError, match="cannot read"):
        load_face_boxes(tmp_path / "none.json")


def test_folders_expand_to_their_images(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"")
    (tmp_path / "a.PNG").write_bytes(b"")
    (tmp_path / "c.txt").write_text("")
    assert expand_inputs([tmp_path, tmp_path / "c.txt"]) == [tmp_path / "a.PNG", tmp_path / "b.jpg", tmp_path / "c.txt"]


def test_demo_prints_68_points_and_writes_an_overlay(assets, tmp_path, capsys):
    weights, shape = assets
    code, stdout, _ = _run(capsys, "demo", "--out", tmp_path, "--weights", weights, "--shape-model", shape)
    assert code == 0
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, 69))
    points = np.array([[float(r[1]), float(r[2])] for r in rows])
    assert np.isfinite(points).all()
    overlay = cv2.imread(str(tmp_path / "astronaut_landmarks.png"))
    assert overlay.shape == (512, 512, 3)


def test_an_unusable_out_folder_is_one_line_before_any_work(assets, tmp_path, capsys):
    weights, shape = assets
    (tmp_path / "taken").write_text("a file")
    for argv, why in ((("demo", "--out", tmp_path / "taken"), "a file, not a folder"),
                      (("demo", "--out", tmp_path / "taken" / "sub"), "cannot make this folder"),
                      (("predict", DEMO_IMAGE, "--out", tmp_path / "taken"), "a file, not a folder")):
        code, stdout, stderr = _run(capsys, *argv, "--weights", weights, "--shape-model", shape)
        assert code == 2
        assert stderr.count("\n") == 1 and f"--out {tmp_path / 'taken'}" in stderr and why in stderr
        assert "score" not in stdout  # failed before the landmarks were computed


def test_demo_box_frames_the_bundled_face():
    """The known box is the training-style box of the astronaut's face: square-ish, about 100 px, inside the image."""
    image = cv2.imread(str(DEMO_IMAGE))
    assert image is not None and image.shape == (512, 512, 3)
    x0, y0, x1, y1 = DEMO_BOX
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512 and 80 <= x1 - x0 <= 120 and abs((x1 - x0) - (y1 - y0)) < 5


def test_predict_mirror_and_decode_reach_the_detector(assets, tmp_path, capsys):
    from lgc_fast.detect import Detector

    weights, shape = assets
    image = np.random.default_rng(3).integers(0, 256, (120, 100), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "face.png"), image)
    box = [10.0, 20.0, 90.0, 100.0]
    (tmp_path / "boxes.json").write_text(json.dumps({"face.png": box}))
    code, _, _ = _run(capsys, "predict", tmp_path / "face.png", "--boxes", tmp_path / "boxes.json", "--out",
                      tmp_path / "out", "--weights", weights, "--shape-model", shape, "--device", "cpu", "--mirror",
                      "--decode", "local_gaussian", "--no-overlay")
    assert code == 0
    (face,) = json.loads((tmp_path / "out" / "face.json").read_text())["faces"]
    expected = {}
    for mirror in (True, False):
        (expected[mirror],) = Detector(weights, shape, "cpu", "local_gaussian", mirror=mirror).landmarks(image, box)
    np.testing.assert_allclose(face["points"], expected[True].points, atol=2e-3)
    assert np.abs(expected[True].points - expected[False].points).max() > 0.01


def test_predict_outputs_never_collide_nor_replace_input_images(assets, tmp_path, capsys):
    """a.png's outputs skip the stem of a_2.jpg; an --out where an overlay would replace an input image is refused
    before anything is written (the image would be lost, and read back as the overlay)."""
    weights, shape = assets
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "a.png", "a_2.jpg"):
        cv2.imwrite(str(folder / name), rng.integers(0, 256, (40, 48), dtype=np.uint8))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    common = ["--weights", weights, "--shape-model", shape, "--device", "cpu"]
    code, _, stderr = _run(capsys, "predict", folder, "--out", folder, *common)
    assert code == 2 and "a.png would overwrite the input image" in stderr and len(stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    code, stdout, _ = _run(capsys, "predict", folder, "--out", tmp_path / "out", *common)
    assert code == 0 and "3 of 3 images processed" in stdout
    written = {p.stem: json.loads(p.read_text())["image"] for p in (tmp_path / "out").glob("*.json")}
    assert written == {"a": str(folder / "a.jpg"), "a_2": str(folder / "a_2.jpg"), "a_3": str(folder / "a.png")}


def test_predict_skips_an_image_whose_box_misses_it(assets, tmp_path, capsys):
    """A box outside its image, or so large that the image fills less than a pixel of the crop, gives no made-up
    points (the latter crashed drawing the overlay)."""
    weights, shape = assets
    rng = np.random.default_rng(1)
    for name in ("outside.png", "huge.png", "fine.png"):
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 256, (50, 60), dtype=np.uint8))
    boxes = {"outside.png": [100, 5, 140, 45], "huge.png": [0, 0, 1e30, 1e30], "fine.png": [5, 5, 45, 45]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    code, stdout, stderr = _run(capsys, "predict", *(tmp_path / name for name in boxes), "--boxes",
                                tmp_path / "boxes.json", "--out", tmp_path / "out", "--weights", weights,
                                "--shape-model", shape, "--device", "cpu")
    assert code == 0 and "1 of 3 images processed" in stdout
    skipped = stderr.strip().splitlines()
    assert len(skipped) == 2 and "outside.png: box" in skipped[0] and "outside the 60 x 50 image" in skipped[0]
    assert "huge.png: box" in skipped[1] and "too large" in skipped[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.json", "fine.png"]


def test_predict_refuses_weights_that_are_not_finite(tmp_path, capsys):
    """NaN weights gave NaN scores (invalid JSON) and points stuck on the box corner, without any error."""
    net = LGCN("release", width=8, local_layers=(3,))
    state = {k: v.fill_(math.nan) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_checkpoint(tmp_path / "nan.pt", {"config": net.config, "model": state})
    (tmp_path / "boxes.txt").write_text(f"{DEMO_IMAGE.name} {' '.join(map(str, DEMO_BOX))}\n")
    code, _, stderr = _run(capsys, "predict", DEMO_IMAGE, "--boxes", tmp_path / "boxes.txt", "--out", tmp_path / "o",
                           "--weights", tmp_path / "nan.pt", "--device", "cpu")
    assert code == 2 and "nan.pt: the weights hold NaN or infinite values" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_predict_names_a_device_that_is_not_usable_here(tmp_path, capsys):
    code, _, stderr = _run(capsys, "predict", DEMO_IMAGE, "--out", tmp_path / "o", "--device", "meta")
    assert code == 2 and "--device meta: not usable here" in stderr and len(stderr.strip().splitlines()) == 1


def test_predict_refuses_a_bad_shape_model_before_writing(assets, tmp_path, capsys):
    """A shape model that does not load was reported once per image as a skip (exit 1), after --out was made."""
    weights, _ = assets
    (tmp_path / "shape.npz").write_bytes(b"not a zip file")
    code, _, stderr = _run(capsys, "predict", DEMO_IMAGE, DEMO_IMAGE, "--out", tmp_path / "o", "--weights", weights,
                           "--shape-model", tmp_path / "shape.npz", "--device", "cpu")
    assert code == 2 and "shape.npz is not a readable .npz file" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
