"""The data pipeline: .pts files, folder scanning, boxes, crops and augmentation geometry, the split, the Dataset."""
import json
import math
import os
import pickle

import cv2
import numpy as np
import pytest
import torch

from lgc_fast.data import (MIRROR_68, FaceRecord, LandmarkDataset, affines_from_draws, apply_affines, augment_batch,
                           box_to_square, compose, crop_transform, face_box, load_boxes, person_of, random_affines,
                           read_pts, scan_folder, split_by_person, square_to_box, transform_points, warp_image,
                           write_pts)
from lgc_fast.errors import LgcError

from conftest import CV2_WARP_ROUNDING_PX, devices

# ---------------------------------------------------------------------------------------------------- helpers


def render_blobs(points, height, width, sigma=2.5, peak=200.0):
    """(H, W) float32 image: a Gaussian blob centred exactly on each (x, y) (pixel centres at integers)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width))
    for x, y in points:
        image += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return image.astype(np.float32)


def blob_errors(image, expected, radius):
    """Distances from each expected (x, y) to the intensity centroid of the disc of `radius` around it; discs that
    leave the image are not measured."""
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    errors = []
    for x, y in expected:
        if x - radius < 0 or y - radius < 0 or x + radius > w - 1 or y + radius > h - 1:
            continue
        weight = image * (((xx - round(x)) ** 2 + (yy - round(y)) ** 2) <= radius**2)
        errors.append(math.hypot((weight * xx).sum() / weight.sum() - x, (weight * yy).sum() / weight.sum() - y))
    return np.array(errors)


def blob_grid(rng, spacing, lo, hi):
    """Jittered grid points, `spacing` apart, in [lo, hi]^2."""
    g = np.arange(lo, hi + 1e-9, spacing)
    gx, gy = np.meshgrid(g, g)
    return np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(-0.5, 0.5, (gx.size, 2))


def face_points(rng, cx=60.0, cy=55.0, radius=30.0):
    """68 distinct points of a rough face layout (a jittered ellipse), 0-based."""
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    pts = np.stack([cx + radius * np.cos(angles), cy + 1.2 * radius * np.sin(angles)], axis=1)
    return pts + rng.uniform(-2, 2, pts.shape)


def write_face(folder, name, rng, size=(110, 120), suffix=".png"):
    """A noise image NAME.png and its .pts beside it; returns the 0-based points."""
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{name}{suffix}"), rng.integers(0, 256, size, dtype=np.uint8))
    pts = face_points(rng)
    write_pts(folder / f"{name}.pts", pts)
    return pts


PTS_HEADER = "version: 1\nn_points: 3\n{\n"

# ---------------------------------------------------------------------------------------------------- .pts files


def test_pts_round_trip_is_one_based_on_disk_and_keeps_nan(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3, 300, (68, 2))
    pts[[5, 40]] = np.nan
    path = tmp_path / "face.pts"
    write_pts(path, pts)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["version: 1", "n_points: 68", "{"] and lines[-1] == "}"
    assert [float(v) for v in lines[3].split()] == pytest.approx(pts[0] + 1, abs=1e-12)
    assert lines[3 + 5] == "nan nan"
    back = read_pts(path, n_points=68)
    assert back.dtype == np.float64 and back.shape == (68, 2)
    np.testing.assert_allclose(back, pts, atol=1e-12)
    assert np.isnan(back[[5, 40]]).all() and not np.isnan(np.delete(back, [5, 40], axis=0)).any()
    assert [p.name for p in tmp_path.iterdir()] == ["face.pts"]  # no temp file left


def test_read_pts_real_file_is_zero_based(trainset_dir):
    pts = read_pts(trainset_dir / "Abdel_Aziz_Al-Hakim_00.pts", n_points=68)
    first = (trainset_dir / "Abdel_Aziz_Al-Hakim_00.pts").read_text().splitlines()[3]
    np.testing.assert_array_equal(pts[0], [float(v) - 1 for v in first.split()])


def test_read_pts_tolerates_blank_lines_crlf_and_extra_headers(tmp_path):
    path = tmp_path / "ok.pts"
    path.write_bytes(b"version: 1\r\nimage_size_x: 40\r\nn_points: 2\r\n\r\n{\r\n1 2\r\n  NaN   nan \r\n}\r\n\r\n")
    pts = read_pts(path)
    np.testing.assert_array_equal(pts[0], [0.0, 1.0])
    assert np.isnan(pts[1]).all()


@pytest.mark.parametrize("body, line, fragment", [
    (PTS_HEADER + "1 2\n3 x\n5 6\n}\n", 5, "not a number"),
    (PTS_HEADER + "1 2\n3 4 5\n5 6\n}\n", 5, "two coordinates"),
    (PTS_HEADER + "1 2\n3 nan\n5 6\n}\n", 5, "both"),
    (PTS_HEADER + "1 2\ninf 4\n5 6\n}\n", 5, "infinite"),
    (PTS_HEADER + "1 2\n3 4\n5 6\n", 6, "closing"),
    (PTS_HEADER + "1 2\n3 4\n5 6\n}\nextra\n", 8, "after the closing"),
    ("version: 1\nn_points: three\n{\n}\n", 2, "integer"),
    ("version: 1\n{\n1 2\n}\n", 2, "n_points"),
    ("version 1\nn_points: 1\n{\n1 2\n}\n", 1, "key: value"),
])
def test_read_pts_malformed_names_file_and_line(tmp_path, body, line, fragment):
    path = tmp_path / "bad.pts"
    path.write_text(body)
    with pytest.raises(LgcError, match=fragment) as info:
        read_pts(path)
    assert f"{path}:{line}:" in str(info.value)


@pytest.mark.parametrize("body, n_points, fragment", [
    (PTS_HEADER + "1 2\n3 4\n}\n", None, "n_points: 3 but 2 point lines"),
    (PTS_HEADER + "1 2\n3 4\n5 6\n7 8\n}\n", None, "n_points: 3 but 4 point lines"),
    (PTS_HEADER + "1 2\n3 4\n5 6\n}\n", 68, "has 3 points, expected 68"),
    ("version: 1\nn_points: 1\n", None, "no '{'"),
])
def test_read_pts_count_mismatch_and_structure_name_the_file(tmp_path, body, n_points, fragment):
    path = tmp_path / "count.pts"
    path.write_text(body)
    with pytest.raises(LgcError, match=fragment) as info:
        read_pts(path, n_points=n_points)
    assert str(path) in str(info.value)


def test_read_pts_missing_file(tmp_path):
    with pytest.raises(LgcError, match="missing.pts"):
        read_pts(tmp_path / "missing.pts")


def test_write_pts_rejects_bad_points_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.pts"
    write_pts(path, np.zeros((3, 2)))
    before = path.read_text()
    for bad in (np.zeros((3, 3)), np.array([[np.inf, 0.0]]), np.array([[np.nan, 1.0]])):
        with pytest.raises(ValueError, match="points"):
            write_pts(path, bad)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_pts(path, np.ones((3, 2)))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pts"]

# ---------------------------------------------------------------------------------------------------- scanning


def test_scan_folder_reports_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    good_b = write_face(tmp_path, "Bob_01", rng)
    good_a = write_face(tmp_path / "sub", "Alice_00", rng, suffix=".jpg")
    write_face(tmp_path, "Carl_00", rng, suffix=".BMP")
    cv2.imwrite(str(tmp_path / "no_pts.png"), np.zeros((20, 20), np.uint8))
    write_face(tmp_path, "bad", rng)
    (tmp_path / "bad.pts").write_text(PTS_HEADER + "1 2\n")
    write_face(tmp_path, "short", rng)
    write_pts(tmp_path / "short.pts", np.ones((5, 2)))
    write_face(tmp_path, "unlabelled", rng)
    write_pts(tmp_path / "unlabelled.pts", np.full((68, 2), np.nan))
    write_pts(tmp_path / "orphan.pts", np.ones((68, 2)))
    (tmp_path / "notes.txt").write_text("not an image")

    records, problems = scan_folder(tmp_path)
    assert [r.image_path.relative_to(tmp_path).as_posix() for r in records] == [
        "Bob_01.png", "Carl_00.BMP", "sub/Alice_00.jpg"]
    np.testing.assert_allclose(records[0].points, good_b, atol=1e-12)
    np.testing.assert_allclose(records[2].points, good_a, atol=1e-12)
    assert records[0].labelled.dtype == bool and records[0].labelled.all() and records[0].box is None
    assert len(problems) == 5 and all("\n" not in p for p in problems)
    for name in ("no_pts.png", "bad.pts", "short.pts", "unlabelled.pts", "orphan.pts"):
        assert sum(name in p for p in problems) == 1, (name, problems)
    again, again_problems = scan_folder(tmp_path)
    assert [r.image_path for r in again] == [r.image_path for r in records] and again_problems == problems

    with pytest.raises(LgcError, match="bad.pts"):  # the first problem in path order
        scan_folder(tmp_path, on_error="raise")
    with pytest.raises(LgcError, match="not a folder"):
        scan_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="on_error"):
        scan_folder(tmp_path, on_error="ignore")


def test_scan_folder_boxes_json_and_text(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    write_face(data, "A_00", rng)
    write_face(data / "x", "B_00", rng)
    write_face(data, "C_00", rng)
    (tmp_path / "boxes.json").write_text(json.dumps({"A_00.png": [1, 2, 30, 40], "x/B_00.png": [5, 6, 50, 70]}))
    (tmp_path / "boxes.txt").write_text("# name x0 y0 x1 y1\n\nA_00.png 1 2 30 40\nx/B_00.png 5 6 50 70\n")
    for source in ("boxes.json", "boxes.txt"):
        records, problems = scan_folder(data, boxes=tmp_path / source)
        assert problems == []
        assert {r.image_path.name: r.box for r in records} == {
            "A_00.png": (1.0, 2.0, 30.0, 40.0), "C_00.png": None, "B_00.png": (5.0, 6.0, 50.0, 70.0)}
    assert load_boxes({"a b.png": (0, 0, 2, 3)}) == {"a b.png": (0.0, 0.0, 2.0, 3.0)}


@pytest.mark.parametrize("name, text, fragment", [
    ("b.txt", "A.png 1 2 3\n", "b.txt:1: expected"),
    ("b.txt", "# c\nA.png 1 2 zero 4\n", "b.txt:2: a box must be four numbers"),
    ("b.txt", "A.png 5 2 3 4\n", "x1 > x0"),
    ("b.json", "{\"A.png\": [1, 2, 3]}", "entry 'A.png'"),
    ("b.json", "[1, 2]", "JSON object"),
    ("b.json", "{\n\"A.png\": [1, 2, 3, 4],,}", "b.json:2: not valid JSON"),
])
def test_bad_boxes_file_names_file(tmp_path, name, text, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(LgcError, match=fragment.replace("[", r"\[")):
        load_boxes(tmp_path / name)

# ---------------------------------------------------------------------------------------------------- geometry


def test_face_box_is_tight_square_enlarged_by_17_percent():
    pts = np.array([[10.0, 20.0], [50.0, 30.0], [30.0, 90.0], [500.0, 500.0]])
    labelled = np.array([True, True, True, False])
    cx, cy, size = face_box(pts, labelled)
    assert (cx, cy) == pytest.approx((30.0, 55.0)) and size == pytest.approx(70 * 1.17)
    pts[3] = np.nan
    assert face_box(pts) == pytest.approx((30.0, 55.0, 81.9))
    assert face_box(pts, labelled, enlarge=1.0)[2] == pytest.approx(70.0)
    with pytest.raises(LgcError, match="no labelled points"):
        face_box(pts, np.zeros(4, bool))
    with pytest.raises(LgcError, match="span no area"):
        face_box(pts[:1])


def test_square_to_box_inverts_box_to_square_on_squares():
    assert square_to_box(30.0, 55.0, 70.0) == pytest.approx((-5.0, 20.0, 65.0, 90.0))
    assert box_to_square(square_to_box(30.0, 55.0, 70.0)) == pytest.approx((30.0, 55.0, 70.0))


def test_crop_transform_maps_box_edges_to_crop_edges():
    a = crop_transform((100.0, 60.0), 50.0, out_size=96)
    corners = transform_points([[75.0, 35.0], [125.0, 85.0], [100.0, 60.0]], a)
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [95.5, 95.5], [47.5, 47.5]], atol=1e-12)
    m = crop_transform((100.0, 60.0), 50.0, out_size=96, mirror=True)
    (x, y), = transform_points([[80.0, 70.0]], a)
    np.testing.assert_allclose(transform_points([[80.0, 70.0]], m)[0], [95 - x, y], atol=1e-12)
    r = crop_transform((100.0, 60.0), 50.0, out_size=96, scale=2.0, angle_deg=90.0)
    # scale 2 then +90 degrees (x towards y): a point 1 px right of the centre lands 2 * 96/50 px below it
    np.testing.assert_allclose(transform_points([[101.0, 60.0]], r)[0], [47.5, 47.5 + 2 * 96 / 50], atol=1e-12)
    assert np.isnan(transform_points([[np.nan, np.nan]], a)).all()
    np.testing.assert_allclose(transform_points([[3.0, 4.0]], compose(r, a)),
                               transform_points(transform_points([[3.0, 4.0]], a), r), atol=1e-12)


@pytest.mark.parametrize("size, scale, angle, mirror", [
    (96.0, 1.0, 0.0, False),  # pure sub-pixel translation
    (130.3, 1.0, 0.0, False),
    (130.3, 1.1, 17.0, False),
    (140.7, 0.875, -29.0, True),
    (61.0, 1.125, 30.0, True),  # magnification
])
def test_warp_keeps_points_on_features(size, scale, angle, mirror):
    affine = crop_transform((120.2, 100.3), size, 96, scale, angle, mirror)
    zoom = 96 / size * scale
    # blobs of sigma 2 px in the crop, 10 sigma apart; placed in the source image through the inverse affine
    crop_pts = blob_grid(np.random.default_rng(3), 20.0, 12.0, 84.0)
    pts = transform_points(crop_pts, cv2.invertAffineTransform(affine))
    image = render_blobs(pts, 200, 240, sigma=2.0 / zoom)
    crop = warp_image(image, affine)
    assert crop.dtype == np.float32 and crop.shape == (96, 96)
    errors = blob_errors(crop, transform_points(pts, affine), radius=8)
    assert len(errors) == 16
    assert errors.max() < 0.01 + math.sqrt(2) * CV2_WARP_ROUNDING_PX, errors


def test_warp_image_fills_outside_with_zero_and_rejects_colour():
    crop = warp_image(np.full((10, 10), 7, np.uint8), crop_transform((4.5, 4.5), 40.0, 16))
    assert crop.dtype == np.float32 and crop[8, 8] == pytest.approx(7.0) and crop[0, 0] == 0.0
    gray = np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)
    affine = crop_transform((20.3, 14.1), 25.0, 16, 1.1, 13.0)
    np.testing.assert_array_equal(warp_image(gray, affine, 16), warp_image(gray.astype(np.float32), affine, 16))
    with pytest.raises(ValueError, match="gray"):
        warp_image(np.zeros((10, 10, 3), np.uint8), np.eye(2, 3))

# ---------------------------------------------------------------------------------------------------- mirroring


def test_mirror_permutation_is_an_involution_fixing_the_symmetry_axis():
    assert sorted(MIRROR_68) == list(range(68))
    np.testing.assert_array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    assert set(np.flatnonzero(MIRROR_68 == np.arange(68))) == {8, 27, 28, 29, 30, 33, 51, 57, 62, 66}
    assert list(MIRROR_68[[0, 17, 21, 31, 36, 39, 40, 41, 48, 55, 60, 65]]) == [16, 26, 22, 35, 45, 42, 47, 46, 54,
                                                                                 59, 64, 67]
    with pytest.raises(ValueError):
        MIRROR_68[0] = 0


def _normalised(shape):
    shape = shape - shape.mean(axis=0)
    return shape / np.sqrt((shape**2).sum())


def _rotate_onto(shape, ref):
    u, _, vt = np.linalg.svd(shape.T @ ref)
    return shape @ (u @ np.diag([1.0, np.sign(np.linalg.det(u @ vt))]) @ vt)


def test_mirror_permutation_matches_real_face_symmetry(trainset_dir):
    files = sorted(trainset_dir.glob("*.pts"))[::10]
    shapes = [_normalised(read_pts(f, 68)) for f in files]
    mean = shapes[0]
    for _ in range(5):  # generalised Procrustes mean shape
        mean = _normalised(np.mean([_rotate_onto(s, mean) for s in shapes], axis=0))
    iod = np.linalg.norm(mean[36:42].mean(axis=0) - mean[42:48].mean(axis=0))

    def asymmetry(perm):
        mirrored = _rotate_onto(_normalised((mean * [-1.0, 1.0])[perm]), mean)
        return np.linalg.norm(mirrored - mean, axis=1).max() / iod

    assert asymmetry(MIRROR_68) < 0.06
    lids_unswapped = MIRROR_68.copy()
    lids_unswapped[[40, 41, 46, 47]] = [46, 47, 40, 41]  # the classic mistake: lower lids in the upper lids' order
    nose_fixed = MIRROR_68.copy()
    nose_fixed[[32, 34]] = [32, 34]
    for wrong in (np.arange(68), lids_unswapped, nose_fixed):
        assert asymmetry(wrong) > 0.12

# ---------------------------------------------------------------------------------------------------- split


def test_person_names():
    assert person_of("Abdel_Aziz_Al-Hakim_01") == "Abdel_Aziz_Al-Hakim"
    assert person_of("Bob_00") == "Bob"
    for own in ("image_0001", "2960256451_1", "indoor_001", "1234_05", "plain"):
        assert person_of(own) == own


def test_real_data_scan_split_and_items(trainset_dir):
    records, problems = scan_folder(trainset_dir)
    assert problems == [] and len(records) == len(list(trainset_dir.glob("*.jpg")))
    train, val = split_by_person(records)
    assert len(train) + len(val) == len(records)
    assert 0.1 <= len(val) / len(records) < 0.12
    train_people = {person_of(r.image_path.stem) for r in train}
    val_people = {person_of(r.image_path.stem) for r in val}
    assert train_people.isdisjoint(val_people) and len(val_people) > 10
    again = split_by_person(list(reversed(records)))
    assert {r.image_path for r in again[1]} == {r.image_path for r in val}
    assert [r.image_path for r in split_by_person(records)[0]] == [r.image_path for r in train]
    other = split_by_person(records, seed=1)[1]
    assert {r.image_path for r in other} != {r.image_path for r in val}
    assert split_by_person(records, val_fraction=0.0) == (records, [])
    with pytest.raises(LgcError, match="1 person"):
        split_by_person(records[:3])
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_person(records, val_fraction=1.0)
    dataset = LandmarkDataset(train[:8], augment=True, on_error="raise")
    batch = torch.utils.data.default_collate([dataset[i] for i in range(8)])
    assert batch["image"].shape == (8, 1, 96, 96) and batch["image"].std() > 10
    inside = batch["points"][batch["labelled"]]
    assert ((inside > -10) & (inside < 106)).float().mean() > 0.95  # faces stay in their crops

# ---------------------------------------------------------------------------------------------------- dataset


@pytest.fixture
def face_folder(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(6):
        write_face(tmp_path, f"P{i // 2}_0{i % 2}", rng)
    return tmp_path


def test_dataset_items_match_the_crop_geometry(face_folder):
    records, _ = scan_folder(face_folder)
    records[1].points[3] = np.nan
    records[1].labelled[3] = False
    records[2].box = (10.0, 12.0, 90.0, 80.0)
    dataset = LandmarkDataset(records, augment=True, seed=5)
    mirrored_seen = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i, record in enumerate(records):
            item = dataset[i]
            assert item["image"].shape == (1, 96, 96) and item["image"].dtype == torch.float32
            assert item["points"].shape == (68, 2) and item["points"].dtype == torch.float32
            assert item["labelled"].shape == (68,) and item["labelled"].dtype == torch.bool
            assert item["affine"].shape == (2, 3) and item["affine"].dtype == torch.float32 and item["index"] == i
            assert 0 <= item["image"].min() and item["image"].max() <= 255
            factor, angle, mirrored = dataset.augmentation(i)
            if record.box is None:
                cx, cy, size = face_box(record.points, record.labelled)
            else:  # the box's centre and its longer side
                cx, cy, size = 50.0, 46.0, 80.0
            affine = crop_transform((cx, cy), size, 96, factor, angle, mirrored)
            np.testing.assert_allclose(item["affine"].numpy(), affine, rtol=1e-6, atol=1e-5)
            gray = cv2.imread(str(record.image_path), cv2.IMREAD_GRAYSCALE)
            np.testing.assert_allclose(item["image"][0].numpy(), warp_image(gray, affine), atol=1e-4)
            order = MIRROR_68 if mirrored else np.arange(68)
            expected = transform_points(record.points, affine)[order]
            labelled = record.labelled[order]
            np.testing.assert_array_equal(item["labelled"].numpy(), labelled)
            np.testing.assert_allclose(item["points"].numpy()[labelled], expected[labelled], atol=1e-4)
            assert (item["points"].numpy()[~labelled] == 0).all()
            assert item["mirrored"] == mirrored
            mirrored_seen.add(mirrored)
            assert 0.875 <= factor <= 1.125 and -30 <= angle <= 30
    assert mirrored_seen == {False, True}
    plain = LandmarkDataset(records)[0]
    cx, cy, size = face_box(records[0].points)
    assert not plain["mirrored"]
    np.testing.assert_allclose(plain["affine"].numpy(), crop_transform((cx, cy), size), rtol=1e-6, atol=1e-5)


def test_dataset_augmentation_is_reproducible_per_seed_epoch_index(face_folder):
    records, _ = scan_folder(face_folder)

    def draws(seed, epoch):
        dataset = LandmarkDataset(records, augment=True, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["affine"].numpy() for i in range(len(records))]

    first = draws(0, 3)
    np.testing.assert_array_equal(np.stack(first), np.stack(draws(0, 3)))
    assert not np.allclose(np.stack(first), np.stack(draws(0, 4)))
    assert not np.allclose(np.stack(first), np.stack(draws(1, 3)))
    shuffled = LandmarkDataset(records, augment=True)
    shuffled.set_epoch(3)
    np.testing.assert_array_equal(shuffled[4]["affine"].numpy(), first[4])  # order of access does not matter
    grid = LandmarkDataset(records, augment=True, grid=True)
    values = set()
    for epoch in range(6):
        grid.set_epoch(epoch)
        values |= {grid.augmentation(i)[:2] for i in range(len(records))}
    assert {f for f, _ in values} <= {0.875, 1.0, 1.125} and {a for _, a in values} <= {-30.0, 0.0, 30.0}


def test_dataset_collates_with_the_default_collate(face_folder):
    records, _ = scan_folder(face_folder)
    loader = torch.utils.data.DataLoader(LandmarkDataset(records, augment=True), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 96, 96) and batch["points"].shape == (4, 68, 2)
    assert batch["labelled"].shape == (4, 68) and batch["affine"].shape == (4, 2, 3)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["mirrored"].dtype == torch.bool
    copy = pickle.loads(pickle.dumps(loader.dataset))  # what DataLoader workers receive
    assert torch.equal(copy[2]["image"], loader.dataset[2]["image"])


def test_dataset_unreadable_image_skip_and_raise(face_folder):
    records, _ = scan_folder(face_folder)
    broken = records[1].image_path
    broken.write_bytes(b"not a png")
    records[3].image_path.unlink()
    skipping = LandmarkDataset(records, on_error="skip")
    assert skipping[1]["index"] == 2 and skipping[3]["index"] == 4
    assert torch.equal(skipping[1]["image"], skipping[2]["image"])
    assert skipping[1]["index"] == 2  # reported once, not again
    assert len(skipping.problems) == 2 and str(broken) in skipping.problems[0]
    assert str(records[3].image_path) in skipping.problems[1]
    assert LandmarkDataset(records[:2])[-1]["index"] == 0  # wraps around
    with pytest.raises(LgcError, match=str(broken).replace("\\", "\\\\")):
        LandmarkDataset(records, on_error="raise")[1]
    with pytest.raises(LgcError, match="none of the 1 images"):
        LandmarkDataset(records[1:2])[0]
    with pytest.raises(IndexError):
        skipping[len(records)]


def test_dataset_rejects_faces_without_box_or_points(face_folder):
    records, _ = scan_folder(face_folder)
    records[0].labelled[:] = False
    with pytest.raises(LgcError, match=records[0].image_path.name):
        LandmarkDataset(records)
    short = FaceRecord(records[1].image_path, np.zeros((5, 2)), np.ones(5, bool), (0, 0, 10, 10))
    with pytest.raises(LgcError, match="68 iBUG points"):
        LandmarkDataset([short], augment=True)
    assert LandmarkDataset([short])[0]["points"].shape == (5, 2)

# ---------------------------------------------------------------------------------------------------- batch


def test_affines_from_draws_match_crop_transform():
    factor = torch.tensor([1.0, 0.9, 1.125, 0.875])
    angle = torch.tensor([0.0, 12.0, -30.0, 29.0])
    mirror = torch.tensor([False, True, False, True])
    theta, point_affine = affines_from_draws(factor, angle, mirror, size=96)
    for i in range(4):
        expected = crop_transform((47.5, 47.5), 96.0, 96, float(factor[i]), float(angle[i]), bool(mirror[i]))
        np.testing.assert_allclose(point_affine[i].numpy(), expected, atol=1e-12)
    identity = affines_from_draws(torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool))[0]
    np.testing.assert_allclose(identity[0].numpy(), np.eye(2, 3), atol=1e-12)


def test_random_affines_ranges_and_determinism():
    gen = torch.Generator().manual_seed(7)
    theta, point_affine, flags = random_affines(256, gen)
    assert theta.shape == (256, 2, 3) and point_affine.shape == (256, 2, 3) and flags.dtype == torch.bool
    det = torch.linalg.det(point_affine[:, :, :2].double())
    zoom = det.abs().sqrt()
    assert ((zoom > 0.875 - 1e-5) & (zoom < 1.125 + 1e-5)).all()
    assert torch.equal(det < 0, flags) and 50 < int(flags.sum()) < 206
    lin = point_affine[:, :, :2].double() / zoom[:, None, None]
    angle = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 1, 1]))
    assert angle.abs().max() <= 30 + 1e-3 and angle.abs().max() > 25
    again = random_affines(256, torch.Generator().manual_seed(7))
    assert torch.equal(again[0], theta) and torch.equal(again[2], flags)
    none = random_affines(8, gen, mirror=False)[2]
    assert not none.any()


@pytest.mark.parametrize("device", devices())
def test_augment_batch_keeps_points_on_features(device):
    rng = np.random.default_rng(8)
    gx, gy = np.meshgrid(np.linspace(28, 68, 3), np.linspace(28, 68, 3))
    n = 6
    pts = np.stack([np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.5, 0.5, (9, 2)) for _ in range(n)])
    images = torch.from_numpy(np.stack([render_blobs(p, 96, 96, sigma=2.0) for p in pts]))[:, None].to(device)
    points = torch.from_numpy(pts).float().to(device)
    labelled = torch.ones(n, 9, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(9)
    out, moved, lab = augment_batch(images, points, labelled, gen, mirror=False)
    assert out.shape == images.shape and moved.shape == points.shape and lab.all()
    worst = 0.0
    for i in range(n):
        errors = blob_errors(out[i, 0].cpu().numpy(), moved[i].cpu().numpy(), radius=8)
        assert len(errors) >= 4
        worst = max(worst, errors.max())
    assert worst < 0.05


@pytest.mark.parametrize("device", devices())
def test_augment_batch_matches_the_opencv_path(device):
    rng = np.random.default_rng(10)
    yy, xx = np.mgrid[0:160, 0:180].astype(np.float64)
    smooth = (120 + 60 * np.sin(xx / 9.0 + 1.0) * np.cos(yy / 11.0) + 40 * np.cos((xx + yy) / 15.0)).astype(np.float32)
    pts = face_points(rng, cx=90, cy=80, radius=35)
    pts[10] = np.nan
    labelled = ~np.isnan(pts).any(axis=1)
    crop_affine = crop_transform(face_box(pts)[:2], face_box(pts)[2])
    crop = warp_image(smooth, crop_affine)
    crop_pts = np.where(labelled[:, None], transform_points(pts, crop_affine), 0.0)
    factor = torch.tensor([1.1, 0.9, 1.0])
    angle = torch.tensor([20.0, -25.0, 0.0])
    mirror = torch.tensor([True, False, True])
    theta, point_affine = affines_from_draws(factor, angle, mirror)
    out, moved, lab = apply_affines(
        torch.from_numpy(crop)[None, None].repeat(3, 1, 1, 1).to(device),
        torch.from_numpy(crop_pts).float()[None].repeat(3, 1, 1).to(device),
        torch.from_numpy(labelled)[None].repeat(3, 1).to(device), theta, point_affine, mirror)
    for i in range(3):
        full = crop_transform(face_box(pts)[:2], face_box(pts)[2], 96, float(factor[i]), float(angle[i]),
                              bool(mirror[i]))
        order = MIRROR_68 if mirror[i] else np.arange(68)
        expected_lab = labelled[order]
        np.testing.assert_array_equal(lab[i].cpu().numpy(), expected_lab)
        expected = transform_points(pts, full)[order]
        np.testing.assert_allclose(moved[i].cpu().numpy()[expected_lab], expected[expected_lab], atol=2e-4)
        assert (moved[i].cpu().numpy()[~expected_lab] == 0).all()
        reference = warp_image(smooth, full)
        # compare where the augmented pixel's source lies well inside the first crop (no zero border involved)
        inv = cv2.invertAffineTransform(np.asarray(point_affine[i], dtype=np.float64))
        oy, ox = np.mgrid[0:96, 0:96]
        src = transform_points(np.stack([ox.ravel(), oy.ravel()], 1), inv).reshape(96, 96, 2)
        inside = (src > 1).all(axis=2) & (src < 94).all(axis=2)
        assert inside.sum() > 3000
        diff = np.abs(out[i, 0].cpu().numpy() - reference)[inside]
        # two bilinear resamplings vs one: about 0.05 mean here; shifting theta by 0.1 px raises the mean to 0.35
        assert diff.mean() < 0.2 and diff.max() < 1.0, (diff.mean(), diff.max())


def test_augment_batch_validates_input():
    images = torch.zeros(2, 1, 96, 96)
    points = torch.zeros(2, 5, 2)
    labelled = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="68 iBUG"):
        apply_affines(images, points, labelled, *affines_from_draws(torch.ones(2), torch.zeros(2),
                                                                    torch.tensor([True, False])),
                      torch.tensor([True, False]))
    with pytest.raises(ValueError, match="images"):
        augment_batch(torch.zeros(2, 1, 96, 90), points, labelled)
    with pytest.raises(ValueError, match="points"):
        augment_batch(images, torch.zeros(3, 5, 2), labelled)
    with pytest.raises(ValueError, match="labelled"):
        augment_batch(images, points, labelled.float())
    out = augment_batch(images, points, labelled, torch.Generator().manual_seed(0), mirror=False)
    assert out[1].shape == (2, 5, 2)
