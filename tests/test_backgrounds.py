"""Background (non-face) training samples: crops, the loss they get (eq. 3), and their share of a training loader."""
import cv2
import numpy as np
import pytest
import torch
from conftest import CV2_WARP_ROUNDING_PX, available_backends, devices
from torch.utils.data import DataLoader

from lgc_fast.data import (OUTSIDE, SYNTHETIC, BackgroundDataset, FacesAndBackgrounds, LandmarkDataset,
                           augment_batch, background_count, random_square_crop, scan_backgrounds, scan_folder)
from lgc_fast.errors import LgcError
from lgc_fast.ops import lgc_loss
from lgc_fast.ops.lgc_loss import loss_weights, target_maps_ref
from lgc_fast.train import ResumableSampler


def test_background_item_has_every_landmark_labelled_and_far_outside():
    item = BackgroundDataset(SYNTHETIC, count=3, out_size=24, seed=1)[2]
    assert item["image"].shape == (1, 24, 24) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 255 and item["image"].std() > 1  # clutter, not flat
    assert torch.equal(item["points"], torch.full((68, 2), OUTSIDE)) and bool(item["labelled"].all())
    assert item["background"] and not item["mirrored"]


def test_random_square_crop_takes_a_square_inside_the_image_or_the_whole_image():
    """On a ramp image (grey = column, or row) a crop's pixels show which part of the image it shows."""
    columns = np.tile(np.arange(80, dtype=np.uint8), (50, 1))
    rows = np.tile(np.arange(50, dtype=np.uint8)[:, None], (1, 80))
    sides = set()
    for seed in range(20):
        crop_x, affine = random_square_crop(np.random.default_rng(seed), columns, 20)
        crop_y, same = random_square_crop(np.random.default_rng(seed), rows, 20)
        np.testing.assert_array_equal(affine, same)
        side = round(20 / affine[0, 0])
        x0, y0 = np.round((0.5 + affine[:, 2]) * -side / 20 + 0.5)  # the square's first pixel
        np.testing.assert_allclose(affine, [[20 / side, 0, (0.5 - x0) * 20 / side - 0.5],
                                            [0, 20 / side, (0.5 - y0) * 20 / side - 0.5]], rtol=1e-12)
        assert 20 <= side <= 50 and 0 <= x0 <= 80 - side and 0 <= y0 <= 50 - side
        centres = x0 + (np.arange(20) + 0.5) * side / 20 - 0.5  # image pixel under each crop pixel's centre
        np.testing.assert_allclose(crop_x, np.tile(centres, (20, 1)), atol=1e-3 + CV2_WARP_ROUNDING_PX)
        np.testing.assert_allclose(crop_y, np.tile((centres - x0 + y0)[:, None], (1, 20)),
                                   atol=1e-3 + CV2_WARP_ROUNDING_PX)
        sides.add(side)
    assert len(sides) > 5  # random sizes
    small = np.tile(np.arange(30, dtype=np.uint8), (12, 1))  # shorter than the crop: the whole image, resized
    crop, affine = random_square_crop(np.random.default_rng(0), small, 20)
    np.testing.assert_allclose(affine, [[20 / 30, 0, 0.5 * 20 / 30 - 0.5], [0, 20 / 12, 0.5 * 20 / 12 - 0.5]])
    np.testing.assert_allclose(crop, np.tile(np.clip((np.arange(20) + 0.5) * 30 / 20 - 0.5, 0, 29), (20, 1)),
                               atol=1e-3)  # bilinear, no dark frame from outside the image


@pytest.mark.parametrize("device", devices())
def test_background_loss_is_a_tenth_of_the_squared_maps(device):
    """Eq. 3 for a crop with every landmark labelled and outside: weight 1/10 per channel, target 0, so the loss is
    0.1 x sum over channels and pixels of local^2 + omega^2, on every backend (and the same beside a face)."""
    item = BackgroundDataset(SYNTHETIC, count=1, out_size=16)[0]
    points, labelled = item["points"][None].to(device), item["labelled"][None].to(device)
    np.testing.assert_allclose(loss_weights(points, labelled, 16, 16).cpu(), np.full((1, 68), 0.1), rtol=1e-7)
    assert not target_maps_ref(points, labelled, 16, 16).any()
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(1, 68, 16, 16, generator=gen, dtype=torch.float64).to(device)
    omega = torch.randn(1, 68, 16, 16, generator=gen, dtype=torch.float64).to(device)
    expected = 0.1 * (local ** 2 + omega ** 2).sum()
    for backend in available_backends(device):
        loss = lgc_loss(local, omega, points, labelled, backend=backend)
        torch.testing.assert_close(loss, expected[None], rtol=1e-10, atol=0, msg=backend)
    face_points = torch.rand(1, 68, 2, generator=gen, dtype=torch.float64).to(device) * 15
    both = lgc_loss(torch.cat([local, local]), torch.cat([omega, omega]), torch.cat([points, face_points]),
                    torch.cat([labelled, labelled]))
    torch.testing.assert_close(both[0], expected, rtol=1e-10, atol=0)
    assert both[1] > 2 * expected  # a face's visible landmarks weigh 1.6 each


def test_batch_augmentation_keeps_background_points_outside():
    item = BackgroundDataset(SYNTHETIC, count=1, out_size=16)[0]
    images, points, labelled = (item[k][None].repeat(8, *[1] * item[k].dim()) for k in ("image", "points", "labelled"))
    _, moved, kept = augment_batch(images, points, labelled, torch.Generator().manual_seed(0))
    assert bool(kept.all()) and (moved.abs().amax(dim=2) > 8000).all()
    np.testing.assert_allclose(loss_weights(moved, kept, 16, 16), np.full((8, 68), 0.1), rtol=1e-6)


def _faces(folder, n, size=40):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        cv2.imwrite(str(folder / f"P{i}_00.png"), rng.integers(0, 256, (size, size), dtype=np.uint8))
        (folder / f"P{i}_00.pts").write_text(
            "version: 1\nn_points: 68\n{\n" + "".join(f"{x} {y}\n" for x, y in rng.uniform(10, 30, (68, 2))) + "}\n")
    records, problems = scan_folder(folder)
    assert not problems
    return records


def _loader_epoch(dataset, epoch, seed, batch_size=5, workers=0):
    sampler = ResumableSampler(dataset, 1, 0, seed)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers))


def test_loader_mixes_the_requested_share_of_backgrounds_deterministically(tmp_path):
    records = _faces(tmp_path / "faces", 16)
    count = background_count(len(records), 0.2)
    assert count == 4 and background_count(100, 0.1) == 11 and background_count(3, 0.01) == 1

    def mixed(seed):
        faces = LandmarkDataset(records, 16, augment=True, seed=seed)
        return FacesAndBackgrounds(faces, BackgroundDataset(SYNTHETIC, count, 16, seed))

    first = _loader_epoch(mixed(5), 0, 5)
    flags = torch.cat([b["background"] for b in first])
    assert len(first) == 4 and int(flags.sum()) == 4  # 16 faces + 4 backgrounds: 20 % backgrounds, all used
    assert sum(bool(b["background"].any()) for b in first) >= 2  # mixed into the face batches, not a batch apart
    assert (first[0]["labelled"][first[0]["background"]]).all()
    again = _loader_epoch(mixed(5), 0, 5, workers=1)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in ("image", "points", "labelled", "background", "index"))
    backgrounds = lambda batches: torch.cat([b["image"][b["background"]] for b in batches])  # noqa: E731
    assert not torch.equal(backgrounds(first), backgrounds(_loader_epoch(mixed(5), 1, 5)))  # new draws per epoch
    assert not torch.equal(backgrounds(first), backgrounds(_loader_epoch(mixed(6), 0, 6)))  # and per seed


def test_folder_backgrounds_walk_through_the_images_and_skip_a_corrupt_one(tmp_path, caplog):
    folder = tmp_path / "bg"
    (folder / "sub").mkdir(parents=True)
    for i, shape in enumerate([(40, 60), (30, 30), (10, 50)]):
        cv2.imwrite(str(folder / "sub" / f"b{i}.png"), np.full(shape, 60 * (i + 1), np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    paths = scan_backgrounds(folder)
    assert [p.name for p in paths] == ["broken.jpg", "b0.png", "b1.png", "b2.png"]
    data = BackgroundDataset(paths, count=3, out_size=20, seed=0)
    grey = [float(data[i]["image"].mean()) for i in range(3)]  # item 0 is broken.jpg: the next image stands in
    assert grey == pytest.approx([60, 60, 120], abs=1e-3)
    assert data.problems == [f"{paths[0]}: cannot read or decode the image"] and "broken.jpg" in caplog.text
    data.set_epoch(1)  # epoch 1 starts at image (1 x 3) mod 4 = b2.png (10 x 50: resized whole)
    assert float(data[0]["image"].mean()) == pytest.approx(180, abs=1e-3)
    with pytest.raises(LgcError, match="broken.jpg: cannot read"):
        BackgroundDataset(paths, count=1, out_size=20, on_error="raise")[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not an image")
    with pytest.raises(LgcError, match="no image files"):
        scan_backgrounds(tmp_path / "empty")
    with pytest.raises(LgcError, match="not a folder"):
        scan_backgrounds(tmp_path / "missing")
