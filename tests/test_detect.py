"""Detector: box-based landmarks (crop geometry and batching) and the detection-free multi-face pipeline (section 4.3).

A random network cannot find faces, so the pipeline is driven by stand-in networks that output what a perfect one
would: kernel-shaped blobs (eq. 1) at the true landmarks of known faces, at the pyramid level where each face is about
96 px wide. Faces and their shapes come from the real trainset; the shape model is fitted on real .pts files.
"""
import cv2
import numpy as np
import pytest
import torch
from conftest import DATA_DIR

from lgc_fast import detect as D
from lgc_fast import multiface as M
from lgc_fast.data import MIRROR_68, box_to_square, crop_transform, face_box, read_pts, square_to_box, transform_points
from lgc_fast.data.geometry import invert_affine
from lgc_fast.data.composite import clutter_background, paste_faces, random_placements
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN
from lgc_fast.ops.kernel_conv import RADIUS, SIGMAS
from lgc_fast.shape import ShapeModel

needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"real data not found at {DATA_DIR}")


def render(shape_hw, points, peak: float = 0.9) -> np.ndarray:
    """(C, h, w) maps with peak x K (the 45x45 kernel of eq. 1) centred at each of points (C, 2) (sub-pixel)."""
    h, w = shape_hw
    maps = np.zeros((len(points), h, w), np.float32)
    for j, (x, y) in enumerate(points):
        x0, x1 = max(int(np.floor(x)) - RADIUS, 0), min(int(np.ceil(x)) + RADIUS + 1, w)
        y0, y1 = max(int(np.floor(y)) - RADIUS, 0), min(int(np.ceil(y)) + RADIUS + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = np.meshgrid(np.arange(x0, x1) - x, np.arange(y0, y1) - y)
        k = sum(np.exp(-(dx**2 + dy**2) / (2 * s * s)) for s in SIGMAS) / len(SIGMAS)
        maps[j, y0:y1, x0:x1] = np.maximum(maps[j, y0:y1, x0:x1], peak * k)
    return maps


@pytest.fixture(scope="module")
def shape_model():
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}")
    shapes = np.stack([read_pts(p) for p in sorted(DATA_DIR.glob("*.pts"))[:600]])
    return ShapeModel.fit(shapes, n_modes=12)


@pytest.fixture(scope="module")
def faces(shape_model):
    """12 typical real faces (image path, points (68, 2)): the closest to the mean shape of 60 spread over the set
    (some frames are strong profiles or rough annotations; the pipeline tests want ordinary faces)."""
    paths = sorted(DATA_DIR.glob("*.pts"))[::57][:60]
    points = [read_pts(p) for p in paths]
    mean = shape_model.mean[:, 0] + 1j * shape_model.mean[:, 1]

    def residual(pts):
        z = pts[:, 0] + 1j * pts[:, 1]
        z = z - z.mean()
        q = (np.conj(mean) @ z) / (np.conj(mean) @ mean)  # best similarity of the mean onto the face
        return np.linalg.norm(z - q * mean) / np.linalg.norm(z)

    order = np.argsort([residual(p) for p in points], kind="stable")[:12]
    return [(paths[i].with_suffix(".jpg"), points[i]) for i in order]


class QueueNet(torch.nn.Module):
    """Stands in for the network on 96 x 96 crops: the i-th crop it sees gets blobs at the i-th queued point set."""

    receptive_radius = 0

    def __init__(self, queue):
        super().__init__()
        self.queue = list(queue)
        self.n_landmarks = 68

    def forward(self, x):
        assert x.shape[1:] == (1, M.CROP, M.CROP)
        maps = torch.stack([torch.from_numpy(render((M.CROP, M.CROP), self.queue.pop(0))) for _ in range(len(x))])
        return maps, maps


class PyramidNet(torch.nn.Module):
    """Stands in for the network on pyramid levels: answers each expected level image with its prepared maps."""

    receptive_radius = 0

    def __init__(self, levels_in, levels_out):
        super().__init__()
        self.levels = list(zip(levels_in, levels_out))
        self.n_landmarks = 68
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for image, maps in self.levels:
            if tuple(x.shape[2:]) == image.shape:
                assert torch.equal(x[0, 0], torch.from_numpy(image)), "not the expected pyramid level image"
                return maps[None], maps[None]
        raise AssertionError(f"unexpected input size {tuple(x.shape)}")


# ---- box-based landmarks ----

@needs_data
def test_crop_and_inverse_map_round_trip(faces):
    for _, points in faces:
        cx, cy, size = face_box(points)
        affine = crop_transform((cx, cy), size, M.CROP)
        back = transform_points(transform_points(points, affine), invert_affine(affine))
        np.testing.assert_allclose(back, points, atol=1e-9)
        np.testing.assert_allclose(D.square_hull(affine), (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2),
                                   atol=1e-9)


def _square_box(points, enlarge=1.17):
    return square_to_box(*face_box(points, enlarge=enlarge))


def _crop_points(points, box):
    cx, cy, size = box_to_square(box)
    return transform_points(points, crop_transform((cx, cy), size, M.CROP))


@needs_data
def test_landmarks_maps_points_back_to_the_image(faces):
    """Two images (a path and an RGB array), the first with two boxes (its training box and a wider, shifted,
    non-square one): every face gets its own points back, in order, in image pixels."""
    (path_a, pts_a), (path_b, pts_b) = faces[0], faces[1]
    box_a1 = _square_box(pts_a)
    cx, cy, size = face_box(pts_a)
    box_a2 = (cx - 0.7 * size + 5, cy - 0.6 * size, cx + 0.7 * size + 5, cy + 0.6 * size)
    box_b = _square_box(pts_b)
    expected = [(pts_a, box_a1), (pts_a, box_a2), (pts_b, box_b)]
    det = D.Detector(weights=QueueNet([_crop_points(p, b) for p, b in expected]), decode="argmax", fit=False)
    images = [str(path_a), cv2.cvtColor(cv2.imread(str(path_b)), cv2.COLOR_BGR2RGB)]
    result = det.landmarks(images, [[box_a1, box_a2], box_b])
    assert [len(r) for r in result] == [2, 1]
    for face, (pts, box) in zip(result[0] + result[1], expected):
        cx, cy, side = box_to_square(box)
        # argmax lands on the nearest crop pixel: at most half a crop pixel per axis
        assert np.abs(face.points - pts).max() <= 0.5 * side / M.CROP + 1e-6
        assert face.points.shape == (68, 2) and face.confidence.shape == (68,)
        assert 0.85 < face.score <= 0.9 + 1e-6  # blobs of peak 0.9 sampled near their centres
        np.testing.assert_allclose(face.box, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), atol=1e-9)
    det = D.Detector(weights=QueueNet([_crop_points(pts_b, box_b)]), decode="argmax", fit=False)
    single = det.landmarks(images[1], box_b)
    assert len(single) == 1 and np.allclose(single[0].points, result[1][0].points)


@needs_data
def test_landmarks_with_shape_fit(faces, shape_model):
    chosen = faces[:4]
    boxes = [_square_box(pts) for _, pts in chosen]
    queue = [_crop_points(pts, box) for (_, pts), box in zip(chosen, boxes)]
    fit_only = D.Detector(weights=QueueNet(queue), shape_model=shape_model, decode="argmax", fit=True)
    refined = D.Detector(weights=QueueNet(queue), shape_model=shape_model, decode="kernel_deconv", fit=True)
    paths = [str(p) for p, _ in chosen]
    for (a,), (b,), (_, pts), box in zip(fit_only.landmarks(paths, boxes), refined.landmarks(paths, boxes), chosen,
                                         boxes):
        side = box[2] - box[0]
        err_fit = np.linalg.norm(a.points - pts, axis=1)
        assert err_fit.mean() < 0.025 * side and err_fit.max() < 0.06 * side  # 12 PCA modes: ~1-3 crop px
        # confident peaks (0.9 > blend's upper end) take the local sub-pixel estimate: far closer than the fit
        err_refined = np.linalg.norm(b.points - pts, axis=1)
        assert err_refined.max() < 0.3 * side / M.CROP and err_refined.mean() < 0.5 * err_fit.mean()


@needs_data
def test_landmarks_with_a_random_network(faces, shape_model):
    """The real network class end to end (random weights: only shapes, ranges and finiteness can be checked)."""
    torch.manual_seed(0)
    net = LGCN("release", width=8, local_layers=(3,))
    det = D.Detector(weights=net, shape_model=shape_model, device="cpu")
    (path, pts), = faces[:1]
    result = det.landmarks(str(path), [_square_box(pts), _square_box(pts, enlarge=1.5)])
    assert len(result) == 2
    for face in result:
        assert face.points.shape == (68, 2) and np.isfinite(face.points).all()
        assert ((face.confidence >= 0) & (face.confidence <= 1)).all() and 0 <= face.score <= 1


@needs_data
def test_mirror_averaging_recovers_the_faces_points(faces):
    """A perfect network answers the mirrored crop with mirrored blobs in relabelled channels; averaging maps them
    back onto the original blobs, so the points are those without mirroring."""
    chosen = faces[:2]
    boxes = [_square_box(pts) for _, pts in chosen]
    crop_points = [_crop_points(pts, box) for (_, pts), box in zip(chosen, boxes)]
    mirrored = [np.column_stack((M.CROP - 1 - p[:, 0], p[:, 1]))[MIRROR_68] for p in crop_points]
    plain = D.Detector(weights=QueueNet(crop_points), decode="kernel_deconv", fit=False)
    both = D.Detector(weights=QueueNet([crop_points[0], mirrored[0], crop_points[1], mirrored[1]]),
                      decode="kernel_deconv", fit=False, mirror=True, max_memory_bytes=1)  # one crop per batch
    paths = [str(p) for p, _ in chosen]
    for (a,), (b,) in zip(plain.landmarks(paths, [[box] for box in boxes]),
                          both.landmarks(paths, [[box] for box in boxes])):
        np.testing.assert_allclose(b.points, a.points, atol=1e-4)


def test_bundled_pipeline_settings_come_from_the_metadata(monkeypatch, tmp_path):
    from lgc_fast.checkpoint import save_checkpoint

    net = LGCN("release", width=4, local_layers=(3,))
    save_checkpoint(tmp_path / D.WEIGHTS_FILE, {"config": net.config, "model": net.state_dict()})
    monkeypatch.setattr(D, "ASSETS_DIR", tmp_path)
    det = D.Detector(fit=False)  # no metadata
    assert (det.decode, det.fit_threshold) == (D.DEFAULT_DECODE, D.FIT_THRESHOLD)
    (tmp_path / D.METADATA_FILE).write_text('{"pipeline": {"decode": "argmax", "fit_threshold": 0.5}}')
    det = D.Detector(fit=False)
    assert (det.decode, det.fit_threshold) == ("argmax", 0.5)
    det = D.Detector(fit=False, decode="local_gaussian", fit_threshold=0.2)
    assert (det.decode, det.fit_threshold) == ("local_gaussian", 0.2)
    det = D.Detector(weights=tmp_path / D.WEIGHTS_FILE, fit=False)  # other weights: the general defaults
    assert (det.decode, det.fit_threshold) == (D.DEFAULT_DECODE, D.FIT_THRESHOLD)
    for bad, message in (('{"decode": "best"}', "decode must be one of"), ('{"fit_threshold": 1.5}', "in \\[0, 1\\)"),
                         ('{"windows": 3}', "decode, fit_threshold and/or point_offsets"), ('[1]', "must be an object"),
                         ('{"point_offsets": [[1, 2, 3]]}', r"point_offsets must be a \(C, 2\) list"),
                         ('{"point_offsets": "none"}', r"point_offsets must be a \(C, 2\) list")):
        (tmp_path / D.METADATA_FILE).write_text(f'{{"pipeline": {bad}}}')
        with pytest.raises(LgcError, match=f"metadata.json: pipeline .*{message}"):
            D.Detector(fit=False)
    (tmp_path / D.METADATA_FILE).write_text(f'{{"pipeline": {{"point_offsets": {[[0.5, -0.25]] * 68}}}}}')
    np.testing.assert_array_equal(D.Detector(fit=False).point_offsets, [[0.5, -0.25]] * 68)
    assert D.Detector(weights=tmp_path / D.WEIGHTS_FILE, fit=False).point_offsets is None  # the bundled weights' only
    with pytest.raises(LgcError, match=r"point_offsets must have shape \(68, 2\)"):
        D.Detector(weights=net, point_offsets=np.zeros((5, 2)))
    with pytest.raises(LgcError, match=r"point_offsets must have shape \(68, 2\) and be finite"):
        D.Detector(weights=net, point_offsets=np.full((68, 2), np.nan))
    with pytest.raises(ValueError, match="fit_threshold"):
        D.Detector(weights=net, fit_threshold=-0.1)
    with pytest.raises(LgcError, match="mirror needs a network with 68 landmarks"):
        D.Detector(weights=LGCN("release", width=4, n_landmarks=5, local_layers=(3,)), mirror=True)


def test_point_offsets_follow_each_faces_size_and_rotation():
    """The correction is removed in each face's frame: a face turned by 90 degrees at 2/3 of the size gets the
    first face's correction turned by 90 degrees at 2/3 of the length."""
    rng = np.random.default_rng(0)
    template = rng.uniform(-1, 1, (68, 2))
    shape_model = ShapeModel.fit(template + rng.normal(0, 0.02, (40, 68, 2)), n_modes=4)
    offsets = rng.normal(0, 0.05, (68, 2))
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])
    faces = [40 + 24 * template, 52 + 16 * template @ turn.T]
    heat = torch.from_numpy(np.stack([render((96, 96), points) for points in faces]))
    plain = D.Detector(weights=QueueNet([]), shape_model=shape_model, decode="argmax")
    corrected = D.Detector(weights=QueueNet([]), shape_model=shape_model, decode="argmax", point_offsets=offsets)
    before, _, fitted, _ = plain.points_from_heatmaps(heat)
    after, _, _, _ = corrected.points_from_heatmaps(heat)
    assert fitted.all()
    shift = (before - after).numpy()
    assert np.abs(shift[0]).max() > 0.1  # a correction of a few tenths of a pixel was made
    np.testing.assert_allclose(shift[1], (16 / 24) * shift[0] @ turn.T, atol=0.02 * np.abs(shift[0]).max())


def test_bad_boxes_and_images_rejected():
    det = D.Detector(weights=QueueNet([]), fit=False)
    image = np.zeros((50, 60), np.uint8)
    with pytest.raises(LgcError, match="x0 < x1"):
        det.landmarks(image, (10, 10, 5, 20))
    with pytest.raises(LgcError, match="one entry per image"):
        det.landmarks([image, image], [(0, 0, 10, 10)])
    with pytest.raises(LgcError, match=r"\(K, 4\)"):
        det.landmarks(image, [(0, 0, 10)])
    with pytest.raises(LgcError, match="nope.png"):
        det.landmarks("nope.png", (0, 0, 10, 10))
    with pytest.raises(LgcError, match="shape"):
        det.landmarks(np.zeros((4, 4, 2)), (0, 0, 1, 1))
    with pytest.raises(LgcError, match="device 'gpu0'"):
        D.Detector(weights=QueueNet([]), device="gpu0")
    assert det.landmarks(image, np.zeros((0, 4))) == []


def test_missing_bundled_assets_named(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "ASSETS_DIR", tmp_path)
    with pytest.raises(LgcError, match="lgcn.pt"):
        D.Detector()
    det = D.Detector(weights=QueueNet([]))
    with pytest.raises(LgcError, match="shape_model.npz"):
        det.shape_model


# ---- the multi-face pipeline, piece by piece ----

def test_pyramid_shapes_follow_the_paper():
    assert M.pyramid_shapes(480, 640) == [(480, 640), (240, 320), (120, 160), (60, 80)]  # section 4.3's example
    assert M.pyramid_shapes(95, 300) == [(95, 300)]
    assert M.pyramid_shapes(96, 97) == [(96, 97), (48, 49)]
    assert M.pyramid_shapes(1080, 1920)[-1] == (68, 120) and len(M.pyramid_shapes(1080, 1920)) == 5
    root2 = 2 ** 0.5  # an optional finer pyramid: every other level is the paper's
    assert M.pyramid_shapes(480, 640, step=root2) == [(480, 640), (340, 453), (240, 320), (170, 227), (120, 160),
                                                      (85, 114)]
    for too_fine in (1.0, 1.0001, 1.09):  # 1.0001 asked for over 20 000 levels of a 1080p frame
        with pytest.raises(ValueError, match="pyramid step must be at least 1.1"):
            M.pyramid_shapes(1080, 1920, step=too_fine)
    assert len(M.pyramid_shapes(1080, 1920, step=M.MIN_PYRAMID_STEP)) == 27
    levels = M.build_pyramid(np.full((201, 333), 77.0, np.float32))
    assert [lv.shape for lv in levels] == M.pyramid_shapes(201, 333)
    assert all(np.allclose(lv, 77.0) for lv in levels)


def test_a_huge_pyramid_step_keeps_levels_of_at_least_one_pixel():
    """A step of 1e12 or inf (lgc-fast predict --pyramid-step) gave a 0 x 0 level, on which OpenCV's resize failed."""
    for step in (1e12, float("inf")):
        assert M.pyramid_shapes(270, 312, step=step) == [(270, 312), (1, 1)]
        assert [lv.shape for lv in M.build_pyramid(np.zeros((270, 312), np.float32), step=step)] == [(270, 312), (1, 1)]


def test_combination_is_the_max_of_upsampled_levels():
    g = torch.Generator().manual_seed(0)
    height, width = 37, 50
    levels = [torch.rand((3, h, w), generator=g) for h, w in M.pyramid_shapes(height, width, min_side=10)]
    values, winner = M.combine_levels(levels, height, width)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    sampled, sampled_winner = M.sample_levels(levels, height, width, torch.stack((xs, ys), -1))
    assert torch.allclose(values, sampled, atol=1e-5)
    ups = torch.stack([torch.nn.functional.interpolate(lv[None], size=(height, width), mode="bilinear")[0]
                       for lv in levels])
    assert torch.equal(values, ups.amax(dim=0))
    assert torch.equal(winner.long(), ups.argmax(dim=0))
    assert (sampled_winner == winner.long()).float().mean() > 0.99  # ties at 1e-7 may go either way
    # bilinear upsampling reproduces a linear ramp exactly: level-1 pixel u sits at x = (u + 0.5) * 2 - 0.5
    ramp = torch.arange(25, dtype=torch.float32).expand(1, 19, 25).clone()
    flat = [torch.zeros((1, height, width)), ramp]
    values, winner = M.combine_levels(flat, height, width)
    x = torch.arange(2, 47, dtype=torch.float32)
    assert torch.allclose(values[0, 5, 2:47], (x + 0.5) * 25 / 50 - 0.5, atol=1e-5)
    assert (winner[0, :, 2:47] == 1).all()


@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 1, 6), (4, 5, 1), (1, 2, 2)])
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_square_max_is_the_stride_1_max_pool(shape, radius):
    values = torch.rand(shape, generator=torch.Generator().manual_seed(radius))
    pooled = torch.nn.functional.max_pool2d(values[None], 2 * radius + 1, stride=1, padding=radius)[0]
    assert torch.equal(M.square_max(values, radius), pooled)


def test_candidates_are_local_maxima_above_threshold():
    height, width = 120, 160
    level1 = np.zeros((4, 60, 80), np.float32)
    level1[:2] = render((60, 80), [(20.0, 15.0), (50.0, 40.0)])  # channels 0 and 1
    level1[2] = render((60, 80), [(30.0, 30.0)], peak=0.15)[0]  # below the threshold
    level1[3] = np.maximum(render((60, 80), [(10.0, 10.0)])[0], render((60, 80), [(70.0, 50.0)], peak=0.6)[0])
    levels = [torch.zeros((4, height, width)), torch.from_numpy(level1)]
    found = M.find_candidates(levels, height, width, threshold=0.2)
    expect = {(0, 40.5, 30.5), (1, 100.5, 80.5), (3, 20.5, 20.5), (3, 140.5, 100.5)}  # x_full = 2 u + 0.5
    assert len(found) == 4
    for channel, x, y, value, level in found:
        match = [e for e in expect if e[0] == channel and abs(e[1] - x) <= 0.5 and abs(e[2] - y) <= 0.5]
        assert match and level == 1 and value > 0.5
    strongest = M.find_candidates(levels, height, width, threshold=0.2, per_channel=1)
    assert sorted(strongest[:, 0].tolist()) == [0, 1, 3]
    assert strongest[strongest[:, 0] == 3][0, 1] < 30  # channel 3 keeps its stronger blob


def _place(points, box_size, centre):
    """points moved and scaled so that their training box (tight box x 1.17) has side box_size at centre."""
    cx, cy, size = face_box(points)
    return (points - (cx, cy)) * (box_size / size) + centre


def synthetic_levels(height, width, shapes, peak=0.9):
    """Pyramid maps for faces given in image pixels: each rendered at the level where it is ~96 px wide."""
    sizes = M.pyramid_shapes(height, width)
    levels = [np.zeros((68, h, w), np.float32) for h, w in sizes]
    for pts in shapes:
        level = int(np.clip(round(np.log2(face_box(pts)[2] / M.CROP)), 0, len(sizes) - 1))
        h, w = sizes[level]
        u = (pts + 0.5) * (w / width, h / height) - 0.5
        levels[level] = np.maximum(levels[level], render((h, w), u, peak))
    return [torch.from_numpy(lv) for lv in levels]


def _match(found, truth, tolerance):
    """Each true face has exactly one found face whose points are within tolerance x its box size on average and
    whose box is close to its training box."""
    assert len(found) == len(truth), f"found {len(found)} faces, expected {len(truth)}"
    for pts in truth:
        size = face_box(pts)[2]
        errs = [np.linalg.norm(f.points - pts, axis=1).mean() / size for f in found]
        assert min(errs) < tolerance, f"best mean error {min(errs):.3f} x box size"
        assert M.box_iou(found[int(np.argmin(errs))].box, _square_box(pts)) > 0.8


@needs_data
def test_votes_cluster_into_one_hypothesis_per_face(faces, shape_model):
    height, width = 300, 420
    truth = [_place(faces[2][1], 100, (80, 80)), _place(faces[3][1], 200, (290, 180))]
    levels = synthetic_levels(height, width, truth)
    scales = np.array([(width / lv.shape[2] + height / lv.shape[1]) / 2 for lv in levels])
    mean_crop, _ = M.canonical_mean(shape_model)
    found = M.find_candidates(levels, height, width, threshold=0.2)
    votes = M.face_votes(found, mean_crop, scales)
    labels = M.cluster_votes(votes, found[:, 3], scales[found[:, 4].astype(int)])
    sizes = np.sort(np.bincount(labels[labels >= 0]))[::-1]
    assert sizes[0] + sizes[1] >= 0.9 * len(found) and sizes[1] >= 55  # stray jaw points may form tiny clusters
    assert len(sizes) == 2 or sizes[2] < 8  # ... too small to become hypotheses
    hypotheses = M.face_hypotheses(found, labels, mean_crop, scales)
    assert len(hypotheses) == 2
    for pts in truth:
        cx, cy, size = face_box(pts)
        box = [D.square_hull(a) for a in hypotheses]
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in box]
        best = int(np.argmin([np.hypot(x - cx, y - cy) for x, y in centres]))
        assert np.hypot(centres[best][0] - cx, centres[best][1] - cy) < 0.08 * size
        side = M.CROP / np.sqrt(abs(np.linalg.det(hypotheses[best][:, :2])))  # the crop square's side in image px
        assert abs(side / size - 1) < 0.15


@needs_data
def test_faces_from_levels_finds_each_face_and_rejects_clutter(faces, shape_model):
    height, width = 300, 420
    truth = [_place(faces[2][1], 100, (80, 80)), _place(faces[4][1], 110, (90, 230)),
             _place(faces[5][1], 200, (290, 180))]
    rng = np.random.default_rng(0)
    scrambled = _place(faces[6][1], 95, (360, 60))[rng.permutation(68)]  # face-like layout, wrong identities
    levels = synthetic_levels(height, width, truth + [scrambled])
    noise = np.zeros((68, height, width), np.float32)
    for j in rng.integers(0, 68, 25):  # isolated activations scattered over the image
        noise[j] = np.maximum(noise[j], render((height, width), [rng.uniform((0, 0), (width, height))], 0.5)[0])
    levels[0] = torch.maximum(levels[0], torch.from_numpy(noise))
    det = D.Detector(weights=QueueNet([]), shape_model=shape_model)
    found = det.faces_from_levels(levels, (height, width))
    _match(found, truth, tolerance=0.03)
    assert all(0.5 < f.score <= 0.9 for f in found)


@needs_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steps_3_to_6_run_on_the_gpu_maps(faces, shape_model):
    """detect keeps the pyramid maps on the GPU when they fit: the candidates, clustering, crops and fits then run
    there and find the faces the CPU finds."""
    height, width = 300, 420
    truth = [_place(faces[2][1], 100, (80, 80)), _place(faces[5][1], 200, (290, 180))]
    levels = synthetic_levels(height, width, truth)
    det = D.Detector(weights=QueueNet([]), shape_model=shape_model, device="cuda")
    assert det.maps_device([lv.shape[1:] for lv in levels]).type == "cuda"
    on_cpu = det.faces_from_levels(levels, (height, width))
    on_gpu = det.faces_from_levels([lv.cuda() for lv in levels], (height, width))
    assert len(on_gpu) == len(on_cpu) == 2
    for a, b in zip(on_cpu, on_gpu):
        np.testing.assert_allclose(b.points, a.points, atol=0.05)
        assert isinstance(b.points, np.ndarray) and b.score == pytest.approx(a.score, abs=1e-3)


@needs_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_landmarks_decode_and_fit_on_the_gpu_maps(faces, shape_model):
    """landmarks keeps the crops' maps on the GPU when they fit: decoding and the shape fit run there and give the
    CPU's points."""
    chosen = faces[:4]
    boxes = [_square_box(pts) for _, pts in chosen]
    queue = [_crop_points(pts, box) for (_, pts), box in zip(chosen, boxes)]
    paths = [str(p) for p, _ in chosen]
    found = {}
    for device in ("cpu", "cuda"):
        det = D.Detector(weights=QueueNet(list(queue)), shape_model=shape_model, decode="kernel_deconv", fit=True,
                         device=device)
        assert det.maps_device([(det.crop, det.crop)] * len(boxes)).type == device
        found[device] = det.landmarks(paths, boxes)
    for (a,), (b,) in zip(found["cpu"], found["cuda"]):
        assert isinstance(b.points, np.ndarray)
        np.testing.assert_allclose(b.points, a.points, atol=0.05)
        np.testing.assert_allclose(b.confidence, a.confidence, atol=1e-3)


@needs_data
def test_plausibility_filters(faces, shape_model):
    height, width = 200, 200
    det = D.Detector(weights=QueueNet([]), shape_model=shape_model)
    face = _place(faces[7][1], 100, (100, 100))
    # support: 18 clear landmarks, the other 50 weak (as if occluded): enough to form a hypothesis, too few
    # supporting points to be a face by default
    partial = synthetic_levels(height, width, [face])
    weak = synthetic_levels(height, width, [face], peak=0.1)
    partial[0][:27], partial[0][45:] = weak[0][:27], weak[0][45:]
    assert det.faces_from_levels(partial, (height, width)) == []
    assert len(det.faces_from_levels(partial, (height, width), min_support=15)) == 1
    # Mahalanobis: an exaggerated face, 4 standard deviations along six modes at once
    q = shape_model.mean + np.einsum("k,kcd->cd", 4 * shape_model.stddev[:6], shape_model.modes[:6])
    odd = _place(q, 100, (100, 100))
    levels = synthetic_levels(height, width, [odd])
    assert det.faces_from_levels(levels, (height, width)) == []
    assert len(det.faces_from_levels(levels, (height, width), max_mahalanobis=np.inf)) == 1
    # scale: the fitted face must match the crop's size within the tolerance (no real face is exactly canonical)
    normal = synthetic_levels(height, width, [face])
    assert len(det.faces_from_levels(normal, (height, width))) == 1
    assert det.faces_from_levels(normal, (height, width), scale_tolerance=1.0 + 1e-9) == []


def test_overlapping_faces_keep_the_best():
    def face(x0, score):
        return M.Face(np.zeros((68, 2)), np.zeros(68), score, (x0, 0.0, x0 + 100.0, 100.0))

    inner = M.Face(np.zeros((68, 2)), np.zeros(68), 0.6, (30.0, 30.0, 50.0, 50.0))  # inside the strongest: IoU 0.04
    kept = M.suppress_overlaps([face(0, 0.5), face(10, 0.7), face(300, 0.1), inner, face(160, 0.2)], max_iou=0.3)
    assert [f.score for f in kept] == [0.7, 0.6, 0.2, 0.1]
    assert M.box_iou(face(0, 0).box, face(50, 0).box) == 1 / 3


def test_random_scenes_place_faces_inside_without_overlap():
    rng = np.random.default_rng(3)
    background = clutter_background(rng, 240, 320)
    assert background.shape == (240, 320, 3) and background.dtype == np.uint8 and background.std() > 10
    placed = random_placements(rng, 4, 240, 320, 40, 120)
    assert len(placed) >= 2
    for i, (size, (cx, cy)) in enumerate(placed):
        half = 0.75 * size  # the pasted square
        assert 40 <= size <= 120 and half <= cx <= 320 - half and half <= cy <= 240 - half
        for other, (ox, oy) in placed[i + 1:]:
            assert max(abs(cx - ox), abs(cy - oy)) > half + 0.75 * other
    with pytest.raises(ValueError, match="min_box"):
        random_placements(rng, 1, 100, 100, 50, 10)


def test_pasted_points_follow_the_pixels():
    """A white square drawn at one landmark of a synthetic face lands where paste_faces maps that landmark."""
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    points = np.stack([100 + 40 * np.cos(t), 110 + 50 * np.sin(t)], axis=1)
    image = np.zeros((220, 200, 3), np.uint8)
    x, y = np.round(points[20]).astype(int)
    image[y - 2:y + 3, x - 2:x + 3] = 255
    canvas, (mapped,) = paste_faces([(image, points)], [(70.0, (150.0, 90.0))], 200, 260)
    weights = (canvas[..., 0].astype(np.float64) - 90).clip(min=0)
    ys, xs = np.nonzero(weights > 20)
    centroid = np.array([np.average(xs, weights=weights[ys, xs]), np.average(ys, weights=weights[ys, xs])])
    assert np.abs(centroid - mapped[20]).max() < 0.6
    assert np.allclose(face_box(mapped)[:2], (150.0, 90.0)) and np.isclose(face_box(mapped)[2], 70.0)


@needs_data
def test_detect_end_to_end_on_a_composite_image(faces, shape_model):
    height, width = 300, 420
    canvas, truth = paste_faces(faces[8:11], [(100, (80, 80)), (110, (90, 230)), (200, (290, 180))], height, width)
    gray = D.load_gray(canvas)
    net = PyramidNet(M.build_pyramid(gray), synthetic_levels(height, width, truth))
    found = D.Detector(weights=net, shape_model=shape_model, precision="float32").detect(canvas)
    assert net.calls == len(M.pyramid_shapes(height, width))  # one forward per level: each fits the memory budget
    _match(found, truth, tolerance=0.03)


@needs_data
def test_detect_runs_the_real_network_class(faces, shape_model):
    """A random network finds no real faces; this checks the plumbing (pyramid, tiling, fitting) end to end."""
    torch.manual_seed(0)
    net = LGCN("release", width=8, local_layers=(3,))
    det = D.Detector(weights=net, shape_model=shape_model, device="cpu", max_memory_bytes=1 << 27,
                     precision="float32")
    canvas, _ = paste_faces(faces[:2], [(100, (60, 60)), (90, (150, 130))], 180, 220)
    gray = D.load_gray(canvas)
    levels = det.pyramid_heatmaps(gray)  # level 0 needs 2 x 3 tiles within this budget
    assert [tuple(lv.shape[1:]) for lv in levels] == M.pyramid_shapes(180, 220)
    with torch.no_grad():
        direct = net(torch.from_numpy(gray)[None, None])[1][0]
    assert torch.allclose(levels[0], direct, atol=1e-5 * direct.abs().max().item())
    threshold = float(np.quantile(levels[0].numpy(), 0.999))  # a random net's scale: some candidates, not all
    found = det.faces_from_levels(levels, gray.shape, threshold=threshold, min_landmarks=3, min_support=0,
                                  max_mahalanobis=np.inf, scale_tolerance=100.0)  # detect() minus the forward
    for face in found:
        assert face.points.shape == (68, 2) and np.isfinite(face.points).all() and 0 <= face.score <= 1


# ---- with the bundled trained weights (skipped where the installation ships without them) ----

needs_assets = pytest.mark.skipif(not (D.ASSETS_DIR / D.WEIGHTS_FILE).is_file() or
                                  not (D.ASSETS_DIR / D.SHAPE_FILE).is_file(), reason="no bundled weights")


def _inside(points, box, margin):
    x0, y0, x1, y1 = box
    m = margin * (x1 - x0)
    return ((points[:, 0] >= x0 - m) & (points[:, 0] <= x1 + m) & (points[:, 1] >= y0 - m) & (points[:, 1] <= y1 + m))


def _face_like(points):
    """Coarse anatomy of 68 iBUG points in an upright face: jaw ends left/right, eyes above the nose tip above the
    mouth, the chin lowest of the jaw."""
    eyes, nose_tip, mouth = points[36:48, 1].mean(), points[33, 1], points[48:68, 1].mean()
    return points[0, 0] < points[16, 0] and eyes < nose_tip < mouth and points[8, 1] > mouth


@needs_assets
def test_bundled_model_on_the_demo_face():
    from lgc_fast.demo import DEMO_BOX, DEMO_IMAGE

    det = D.Detector(device="cpu")
    (face,) = det.landmarks(str(DEMO_IMAGE), DEMO_BOX)
    assert _inside(face.points, DEMO_BOX, 0.1).all() and _face_like(face.points)
    found = det.detect(str(DEMO_IMAGE))
    best = max((M.box_iou(f.box, DEMO_BOX), f) for f in found) if found else (0.0, None)
    assert best[0] > 0.5, "the astronaut's face was not among the detections"
    assert _face_like(best[1].points)


def test_crop_size_comes_from_the_checkpoint(tmp_path):
    from lgc_fast.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = LGCN("release", width=8, local_layers=(3,))
    save_checkpoint(tmp_path / "w.pt", {"config": net.config, "model": net.state_dict(), "image_size": 64})
    assert D.Detector(weights=tmp_path / "w.pt", fit=False).crop == 64
    assert D.Detector(weights=tmp_path / "w.pt", fit=False, image_size=80).crop == 80
    assert D.Detector(weights=net, fit=False).crop == M.CROP
    calls = []
    det = D.Detector(weights=tmp_path / "w.pt", fit=False)
    det.network.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    (face,) = det.landmarks(np.zeros((100, 120), np.uint8), (10, 20, 60, 70))
    assert calls == [(1, 1, 64, 64)]
    np.testing.assert_allclose(face.box, (10, 20, 60, 70), atol=1e-9)


def test_detector_runs_the_folded_network():
    torch.manual_seed(0)
    net = LGCN("release", width=8, n_landmarks=68, local_layers=(3, 3))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.05, 0.05)
                module.running_var.uniform_(0.002, 0.02)
                module.weight.uniform_(0.5, 1.5)
    net.eval()
    det = D.Detector(weights=net, fit=False, device="cpu", precision="float32")
    assert det.model is net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.network.modules())
    weight = det.network.global_features[0].conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    crops = torch.rand(2, 1, 40, 36) * 255
    with torch.no_grad():
        want = net(crops)[1]
    got = det.heatmaps(crops)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    half = D.Detector(weights=net, fit=False, device="cpu", precision="bfloat16")
    assert half.network.global_features[0].conv.weight.dtype == torch.bfloat16 and det.model is net
    got = half.heatmaps(crops)
    assert got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 3e-2  # bfloat16 keeps 8 bits of each value
    with pytest.raises(ValueError, match="precision must be one of auto, float32, float16, bfloat16"):
        D.Detector(weights=net, fit=False, precision="half")


def test_precision_auto_is_bfloat16_only_on_a_cpu_with_hardware_bfloat16(monkeypatch):
    net = LGCN("release", width=4, n_landmarks=5, local_layers=(3,)).eval()
    for native, want_cpu in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(D, "native_bf16_cpu", lambda native=native: (native, "patched"))
        assert D.resolve_precision("auto", torch.device("cpu")) == want_cpu
        assert D.resolve_precision("auto", "cuda") == "float32"
        det = D.Detector(weights=net, fit=False, device="cpu")
        assert det.precision == want_cpu
        assert det.network.global_features[0].conv.weight.dtype == D.PRECISIONS[want_cpu]
        for name in D.PRECISIONS:  # a named precision is kept whatever the CPU
            assert D.resolve_precision(name, "cpu") == name
    with pytest.raises(ValueError, match="precision must be one of auto, float32, float16, bfloat16, not 'fp8'"):
        D.resolve_precision("fp8", "cpu")


def test_native_bf16_cpu_reads_the_kernels_flags_without_torch_cpu_capabilities(monkeypatch):
    from lgc_fast import _backend

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags line on this machine (not Linux on x86)")
    want = [name for name in _backend.BF16_CPU_FLAGS if name in flags]
    want = (bool(want), ", ".join(want) or "no AVX512-BF16 or AMX-BF16")
    _backend.native_bf16_cpu.cache_clear()
    try:
        if hasattr(torch.cpu, "get_capabilities"):  # torch's own detection agrees with the kernel's flags
            assert _backend.native_bf16_cpu() == want
            _backend.native_bf16_cpu.cache_clear()
            monkeypatch.delattr(torch.cpu, "get_capabilities")  # as in older torch
        assert _backend.native_bf16_cpu() == want
    finally:
        _backend.native_bf16_cpu.cache_clear()
