"""The PCA shape model and the batched shape fit against the per-face, pixel-level NumPy oracle."""
import functools
import math

import numpy as np
import pytest
import torch

from conftest import available_backends, devices
from lgc_fast.errors import LgcError
from lgc_fast.ops import kernel_conv, splat_heatmaps, target_maps_ref
from lgc_fast.ops.fit_shape import ShapeFit, fit_shape, fit_shape_ref, fit_shape_stats, fit_shape_stats_ref
from lgc_fast.decode import argmax
from lgc_fast.shape import ShapeModel, mean_point_offsets, remove_point_offsets

MAP = 96


def read_pts(path) -> np.ndarray:
    """300-W .pts: the lines between '{' and '}' are 1-based 'x y' -> (P, 2) 0-based."""
    text = path.read_text()
    body = text[text.index("{") + 1:text.index("}")]
    return np.array(body.split(), dtype=np.float64).reshape(-1, 2) - 1.0


def synthetic_shapes(count: int, seed: int = 0, n_true_modes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(count, 68, 2) shapes = random similarity of (base + 5 random deformations); also the deformation basis."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-1.0, 1.0, (68, 2))
    basis = rng.normal(0.0, 1.0, (n_true_modes, 68, 2)) * 0.02
    coeffs = rng.normal(0.0, 1.0, (count, n_true_modes)) * np.linspace(1.0, 0.3, n_true_modes)
    local = base + np.einsum("sk,kcd->scd", coeffs, basis)
    angle = rng.uniform(-0.5, 0.5, count)
    scale = rng.uniform(20.0, 40.0, count)
    rot = np.stack((np.stack((np.cos(angle), -np.sin(angle)), -1), np.stack((np.sin(angle), np.cos(angle)), -1)), -2)
    return scale[:, None, None] * np.einsum("sij,scj->sci", rot, local) + rng.uniform(30, 60, (count, 1, 2)), basis


@functools.lru_cache(maxsize=None)
def _model(folder) -> ShapeModel:
    if folder is None:
        return ShapeModel.fit(synthetic_shapes(400)[0])
    files = sorted(folder.glob("*.pts"))[:1500]
    return ShapeModel.fit(np.stack([read_pts(f) for f in files]))


@pytest.fixture
def model(request) -> ShapeModel:
    """The shape model of the real training shapes, or of synthetic shapes where the data is absent."""
    try:
        folder = request.getfixturevalue("trainset_dir")
    except pytest.skip.Exception:
        folder = None
    return _model(folder)


def render_targets(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """T = K * G of every point (N, C, 2) -> (N, C, H, W) float64, as ``target_maps_ref`` but with the fast
    ``kernel_conv`` (the dense reference takes seconds per face)."""
    labelled = torch.ones(points.shape[:2], dtype=torch.bool)
    return kernel_conv(splat_heatmaps(points.double(), labelled, height, width))


def random_faces(model: ShapeModel, n: int, seed: int, spread: float = 1.0):
    """Model shapes with coefficients within +-spread sigma, placed so the face spans about 70 of 96 px."""
    g = torch.Generator().manual_seed(seed)
    k = model.n_modes
    coeffs = (torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor(model.stddev) * spread
    span = float(np.ptp(model.mean, axis=0).max())
    scale = 70.0 / span * (0.9 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    angle = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.6
    shift = 47.5 + 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    sim = torch.stack((scale * torch.cos(angle), scale * torch.sin(angle), shift[:, 0], shift[:, 1]), dim=1)
    return model.reconstruct(coeffs, sim), coeffs, sim


# ---------------------------------------------------------------------------------------------------------------------
# ShapeModel

def _gauge(mean):
    return np.stack([np.tile([1.0, 0.0], len(mean)), np.tile([0.0, 1.0], len(mean)), mean.ravel(),
                     np.stack((-mean[:, 1], mean[:, 0]), -1).ravel()])


def _check_model_frame(m: ShapeModel):
    c, k = m.n_landmarks, m.n_modes
    flat = m.modes.reshape(k, -1)
    assert np.allclose(m.mean.mean(axis=0), 0.0, atol=1e-12)
    assert math.isclose((m.mean**2).sum(), c, rel_tol=1e-12)
    assert np.allclose(flat @ flat.T, np.eye(k), atol=1e-10)
    assert np.abs(flat @ _gauge(m.mean).T).max() < 1e-9
    assert (np.diff(m.stddev) <= 1e-12).all() and (m.stddev >= 0).all()


def test_shape_model_recovers_synthetic_modes():
    shapes, basis = synthetic_shapes(300, seed=1)
    m = ShapeModel.fit(shapes, n_modes=8)
    _check_model_frame(m)
    # Five true deformation modes; alignment makes them slightly non-linear, hence a small rest.
    assert m.stddev[5] < 0.02 * m.stddev[4]
    # Similarity changes of the training shapes leave the model unchanged.
    turned = shapes @ np.array([[0.0, 1.0], [-1.0, 0.0]]) * 0.5 + 7.0
    assert np.allclose(ShapeModel.fit(turned, n_modes=8).stddev, m.stddev, atol=1e-9)


def test_shape_model_on_real_shapes(trainset_dir):
    shapes = np.stack([read_pts(f) for f in sorted(trainset_dir.glob("*.pts"))[:1500]])
    assert shapes.shape[1:] == (68, 2)
    m = ShapeModel.fit(shapes)
    _check_model_frame(m)
    assert m.n_modes == 12 and m.stddev[0] > 2 * m.stddev[11] > 0
    # Leaving out 10 % of the points changes the model little (their coordinates are imputed from the others).
    labelled = np.random.default_rng(0).random(shapes.shape[:2]) > 0.1
    partial = ShapeModel.fit(shapes, labelled)
    _check_model_frame(partial)
    z, zp = m.mean @ [1, 1j], partial.mean @ [1, 1j]
    turn = np.vdot(zp, z) / abs(np.vdot(zp, z))  # the mean's rotation is arbitrary
    assert np.abs(turn * zp - z).max() < 0.02
    assert np.allclose(partial.stddev[:3], m.stddev[:3], rtol=0.05)


def test_shape_model_input_errors():
    shapes = synthetic_shapes(20)[0]
    with pytest.raises(ValueError, match="shapes"):
        ShapeModel.fit(shapes[..., :1])
    with pytest.raises(ValueError, match="labelled"):
        ShapeModel.fit(shapes, np.ones((20, 67), dtype=bool))
    lab = np.ones((20, 68), dtype=bool)
    lab[3, 2:] = False
    with pytest.raises(ValueError, match="labelled"):
        ShapeModel.fit(shapes, lab)
    bad = shapes.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="shapes"):
        ShapeModel.fit(bad)
    with pytest.raises(ValueError, match="n_modes"):
        ShapeModel.fit(shapes, n_modes=20)


def test_shape_model_save_load(tmp_path):
    m = ShapeModel.fit(synthetic_shapes(50)[0], n_modes=6)
    path = tmp_path / "model.npz"
    m.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind
    back = ShapeModel.load(path)
    for name in ("mean", "modes", "stddev"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))


def test_shape_model_load_errors(tmp_path):
    with pytest.raises(LgcError, match="does not exist"):
        ShapeModel.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(LgcError, match="junk.npz"):
        ShapeModel.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(LgcError, match="not an lgc_fast shape model"):
        ShapeModel.load(other)
    m = ShapeModel.fit(synthetic_shapes(50)[0], n_modes=6)
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, format=np.array("lgc_fast.shape_model.v1"), mean=m.mean, modes=m.modes[:, :60],
             stddev=m.stddev)
    with pytest.raises(LgcError, match="mismatched.npz.*do not match"):
        ShapeModel.load(mismatched)
    missing_key = tmp_path / "nokey.npz"
    np.savez(missing_key, format=np.array("lgc_fast.shape_model.v1"), mean=m.mean, modes=m.modes)
    with pytest.raises(LgcError, match="stddev"):
        ShapeModel.load(missing_key)
    for name, mean in (("zero", np.zeros_like(m.mean)), ("point", np.full_like(m.mean, 3.5))):
        degenerate = tmp_path / f"{name}.npz"
        np.savez(degenerate, format=np.array("lgc_fast.shape_model.v1"), mean=mean, modes=m.modes, stddev=m.stddev)
        with pytest.raises(LgcError, match=f"{name}.npz: mean must be a shape of at least 3 points"):
            ShapeModel.load(degenerate)


def test_reconstruct(model):
    k = model.n_modes
    sim = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 5.0, -3.0]], dtype=torch.float64)
    coeffs = torch.zeros(2, k, dtype=torch.float64)
    coeffs[1, 0] = 0.3
    pts = model.reconstruct(coeffs, sim)
    np.testing.assert_allclose(pts[0].numpy(), model.mean, atol=1e-12)
    q = model.mean + 0.3 * model.modes[0]
    expected = 2.0 * np.stack((-q[:, 1], q[:, 0]), -1) + [5.0, -3.0]  # 90 degrees, scale 2
    np.testing.assert_allclose(pts[1].numpy(), expected, atol=1e-12)
    with pytest.raises(ValueError, match="coeffs"):
        model.reconstruct(coeffs[:, :-1], sim)
    with pytest.raises(ValueError, match="similarity"):
        model.reconstruct(coeffs, sim[:, :3])


# ---------------------------------------------------------------------------------------------------------------------
# The statistics pass

def test_renderer_matches_target_maps_ref():
    pts = torch.tensor([[[5.3, 7.9], [0.2, 30.5], [31.6, 2.4], [-0.5, 10.0], [16.25, 16.75]]], dtype=torch.float64)
    expected = target_maps_ref(pts, torch.ones(1, 5, dtype=torch.bool), 32, 40)
    torch.testing.assert_close(render_targets(pts, 32, 40), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_stats_backends_match_ref(device, dtype):
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 3, 17, 21, generator=g).to(device=device, dtype=dtype)
    peak = maps.amax(dim=(2, 3))
    centers = (torch.rand(2, 3, 2, generator=g) * 26 - 3).to(device)
    cases = [(None, 0.0, (0.1, 0.6)), (centers, 4.5, (0.0,)), (centers, 0.0, (0.2,)), (centers, 50.0, (0.3, 0.1, 0.9))]
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for backend in available_backends(device):
        for ctr, radius, thresholds in cases:
            got = fit_shape_stats(maps, peak, ctr, radius, thresholds, backend=backend)
            want = fit_shape_stats_ref(maps, peak, ctr, radius, thresholds)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert got.shape == (2, 3, len(thresholds), 3)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{backend} {radius} {thresholds}")


def test_stats_values_by_hand():
    maps = torch.zeros(1, 1, 5, 6, dtype=torch.float64)
    maps[0, 0, 1, 1], maps[0, 0, 1, 4], maps[0, 0, 3, 2] = 1.0, 0.5, 0.05
    peak = maps.amax(dim=(2, 3))
    for backend in available_backends("cpu"):
        whole = fit_shape_stats(maps, peak, None, 0.0, (0.1, 0.0), backend=backend)[0, 0]
        torch.testing.assert_close(whole[0], torch.tensor([1.5, 2.0, 1.0], dtype=torch.float64))  # 0.05 < 0.1 peak
        torch.testing.assert_close(whole[1], torch.tensor([1.55, (1 + 2 + 0.1) / 1.55, (1.5 + 0.15) / 1.55],
                                                          dtype=torch.float64))
        near = fit_shape_stats(maps, peak, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), 1.0, (0.0,),
                               backend=backend)[0, 0, 0]
        torch.testing.assert_close(near, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))  # (1,1) at distance 1
        empty = fit_shape_stats(maps, peak, torch.tensor([[[-9.0, 2.5]]], dtype=torch.float64), 2.0, (0.0,),
                                backend=backend)[0, 0, 0]
        torch.testing.assert_close(empty, torch.tensor([0.0, -9.0, 2.5], dtype=torch.float64))


def test_stats_opcheck():
    maps = torch.rand(2, 3, 9, 8, dtype=torch.float64)
    peak = maps.amax(dim=(2, 3))
    centers = torch.rand(2, 3, 2, dtype=torch.float64) * 8
    for backend in available_backends("cpu"):
        torch.library.opcheck(torch.ops.lgc_fast.fit_shape_stats.default, (maps, peak, centers, 3.0, [0.1], backend))
        torch.library.opcheck(torch.ops.lgc_fast.fit_shape_stats.default, (maps, peak, None, 0.0, [0.1, 0.5], backend))


def test_stats_input_errors():
    maps = torch.rand(2, 3, 9, 8)
    peak = maps.amax(dim=(2, 3))
    with pytest.raises(ValueError, match="heatmaps"):
        fit_shape_stats(maps[0], peak)
    with pytest.raises(ValueError, match="peak"):
        fit_shape_stats(maps, peak[:, :2])
    with pytest.raises(ValueError, match="centers"):
        fit_shape_stats(maps, peak, torch.zeros(2, 3), 2.0)
    with pytest.raises(ValueError, match="radius"):
        fit_shape_stats(maps, peak, torch.zeros(2, 3, 2), -1.0)
    with pytest.raises(ValueError, match="thresholds"):
        fit_shape_stats(maps, peak, thresholds=(0.1,) * 5)


# ---------------------------------------------------------------------------------------------------------------------
# The batched fit

@pytest.fixture
def clean_faces(model):
    pts, coeffs, sim = random_faces(model, 2, seed=11)
    return pts, render_targets(pts, MAP, MAP)


def _assert_fits_equal(got: ShapeFit, want: ShapeFit, atol: float):
    for name in ShapeFit._fields:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("bound_sigma", [0.3, None])
def test_fit_matches_pixel_level_oracle_float64(model, clean_faces, bound_sigma):
    _, maps = clean_faces
    noisy = maps + 0.02 * torch.rand(maps.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = fit_shape_ref(noisy, model, bound_sigma=bound_sigma)
    for backend in available_backends("cpu"):
        if backend == "triton":
            continue  # the interpreter is slow on 68 x 96 x 96 maps; covered by test_fit_triton_small below
        got = fit_shape(noisy, model, bound_sigma=bound_sigma, backend=backend)
        _assert_fits_equal(got, want, atol=1e-7)
    if bound_sigma is not None:
        limit = torch.tensor(bound_sigma * model.stddev) * (1 + 1e-12)
        assert (want.coeffs.abs() <= limit).all()
    if bound_sigma == 0.3:
        assert (want.coeffs.abs() >= 0.3 * torch.tensor(model.stddev) * (1 - 1e-9)).any()  # bounds were active


def test_fit_matches_oracle_float32(model, clean_faces):
    _, maps = clean_faces
    maps32 = maps.float()
    want = fit_shape_ref(maps32, model, windows=(None, 20, 7, 7))
    got = fit_shape(maps32, model, windows=(None, 20, 7, 7))
    assert got.points.dtype == torch.float32
    torch.testing.assert_close(got.points, want.points, rtol=0, atol=2e-3)
    torch.testing.assert_close(got.coeffs, want.coeffs, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fit_on_cuda_matches_oracle(model, clean_faces, backend):
    _, maps = clean_faces
    want = fit_shape_ref(maps, model)
    got = fit_shape(maps.cuda(), model, backend=backend)
    assert got.points.device.type == "cuda"
    _assert_fits_equal(ShapeFit(*(t.cpu() for t in got)), want, atol=1e-7)
    got32 = fit_shape(maps.float().cuda(), model, backend=backend)
    torch.testing.assert_close(got32.points.cpu(), fit_shape(maps.float(), model).points, rtol=0, atol=2e-3)


def test_fit_recovers_known_shapes(model, clean_faces):
    truth, maps = clean_faces
    fit = fit_shape(maps.float(), model)
    err = (fit.points.double() - truth).norm(dim=-1)
    assert err.mean() < 0.25 and err.max() < 2.5
    refined = fit_shape(maps.float(), model, windows=(None, 20, 7, 7, 7))
    assert (refined.points.double() - truth).norm(dim=-1).mean() < err.mean()
    assert torch.allclose(model.reconstruct(fit.coeffs, fit.similarity).float(), fit.points, atol=1e-3)


def test_fit_rejects_outlier_blobs(model):
    truth, _, _ = random_faces(model, 3, seed=21)
    g = torch.Generator().manual_seed(4)
    n = truth.shape[0]
    wrong = torch.stack([torch.randperm(68, generator=g)[:5] for _ in range(n)])  # (N, 5) landmarks with a decoy
    # A stronger decoy 30 px from the true point, toward the map centre give or take 45 degrees (inside the map).
    start = truth.gather(1, wrong[..., None].expand(-1, -1, 2))
    inward = torch.atan2(47.5 - start[..., 1], 47.5 - start[..., 0])
    angle = inward + (torch.rand(n, 5, generator=g, dtype=torch.float64) - 0.5) * (math.pi / 2)
    decoy = start + 30.0 * torch.stack((torch.cos(angle), torch.sin(angle)), dim=-1)
    maps = render_targets(truth, MAP, MAP)
    maps.scatter_add_(1, wrong[..., None, None].expand(-1, -1, MAP, MAP), 1.2 * render_targets(decoy, MAP, MAP))
    peak_pts, _ = argmax(maps)
    assert (peak_pts.double() - truth).norm(dim=-1).gather(1, wrong).min() > 25  # the decoys win the maxima
    errors = {}
    for windows in ((None,), (None, 20, 7), (None, 20, 7, 7, 7)):
        fit = fit_shape(maps.float(), model, windows=windows)
        err = (fit.points.double() - truth).norm(dim=-1)
        errors[windows] = (err.gather(1, wrong).mean().item(), err.gather(1, wrong).max().item(), err.mean().item())
    print("decoyed landmarks mean/max error, all landmarks mean error (px):", errors)
    decoy_mean, decoy_max, all_mean = errors[(None, 20, 7)]
    assert decoy_mean < 2.0 and decoy_max < 10.0 and all_mean < 0.8
    assert errors[(None,)][0] > 2 * decoy_mean  # the windows are what rejects the decoys
    assert errors[(None, 20, 7, 7, 7)][1] < decoy_max


def test_fit_dtypes_and_empty_batch(model, clean_faces):
    _, maps = clean_faces
    half = fit_shape(maps[:1].half(), model)
    assert half.points.dtype == torch.float32 and torch.isfinite(half.points).all()
    empty = fit_shape(maps[:0].float(), model)
    assert empty.points.shape == (0, 68, 2) and empty.coeffs.shape == (0, model.n_modes)
    assert empty.similarity.shape == (0, 4)


def test_fit_input_errors(model, clean_faces):
    _, maps = clean_faces
    maps = maps[:2].float()
    with pytest.raises(ValueError, match="heatmaps must have 4 dimensions"):
        fit_shape(maps[0], model)
    with pytest.raises(ValueError, match="67 channels.*68 landmarks"):
        fit_shape(maps[:, :67], model)
    bad = maps.clone()
    bad[1, 5, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="heatmaps has NaN.*face 1"):
        fit_shape(bad, model)
    with pytest.raises(ValueError, match="heatmaps has NaN"):
        fit_shape_ref(bad, model)
    zero = maps.clone()
    zero[0] = 0
    with pytest.raises(ValueError, match="heatmaps of face 0 have no positive value"):
        fit_shape(zero, model)
    with pytest.raises(TypeError, match="heatmaps"):
        fit_shape(maps.numpy(), model)
    with pytest.raises(TypeError, match="model"):
        fit_shape(maps, "model.npz")
    with pytest.raises(ValueError, match="windows"):
        fit_shape(maps, model, windows=(20, 7))
    with pytest.raises(ValueError, match="windows"):
        fit_shape(maps, model, windows=(None, -3))
    with pytest.raises(ValueError, match="threshold"):
        fit_shape(maps, model, threshold=1.5)
    with pytest.raises(ValueError, match="bound_sigma"):
        fit_shape(maps, model, bound_sigma=0)


def test_point_offsets_are_measured_and_removed_in_each_faces_frame():
    """Faces of random size, rotation and position whose points carry one (C, 2) error in the model frame: the
    error is measured back exactly (unlabelled points left out) and removing it restores the true points."""
    g = torch.Generator().manual_seed(0)
    n, c = 30, 68
    offsets = torch.randn(c, 2, generator=g, dtype=torch.float64) * 0.02
    similarity = torch.randn(n, 4, generator=g, dtype=torch.float64) * 20
    truth = torch.randn(n, c, 2, generator=g, dtype=torch.float64) * 30 + 48
    a, s = similarity[:, :1], similarity[:, 1:2]
    points = truth + torch.stack((a * offsets[:, 0] - s * offsets[:, 1], s * offsets[:, 0] + a * offsets[:, 1]), -1)
    labelled = torch.rand(n, c, generator=g) > 0.2
    garbage = torch.where(labelled[..., None], points, torch.full_like(points, 1e6))  # unlabelled: any value
    np.testing.assert_allclose(mean_point_offsets(garbage, truth, labelled, similarity), offsets, atol=1e-12)
    torch.testing.assert_close(remove_point_offsets(points, similarity, offsets), truth, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match=r"landmarks \[3\] are labelled on no face"):
        mean_point_offsets(points, truth, labelled & (torch.arange(c) != 3), similarity)
    with pytest.raises(ValueError, match="same shape"):
        mean_point_offsets(points[:, :5], truth, labelled, similarity)
    with pytest.raises(ValueError, match=r"similarity \(N, 4\)"):
        mean_point_offsets(points, truth, labelled, similarity[:, :3])
