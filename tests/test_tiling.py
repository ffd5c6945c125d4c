"""Tiled inference reproduces the untiled network output; the memory cap picks the tile size."""
import math

import numpy as np
import pytest
import torch

from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN
from lgc_fast.tiling import (MEMORY_HEADROOM, bytes_per_pixel, iter_tiles, plan_tiles, tile_for_memory,
                             tiled_forward)


def tiny_model(variant: str = "release", seed: int = 0) -> LGCN:
    """A narrow random network with one landmark (tiling does not care about the channel count; the 45x45 kernel
    convolution's cost does), with batch-norm statistics that keep signals and offsets alive through every layer."""
    torch.manual_seed(seed)
    model = LGCN(variant, width=8, n_landmarks=1, local_layers=(3, 5), dropout=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.02, 0.02)
                m.running_var.uniform_(0.005, 0.02)  # gain ~10 offsets the 0.1 activation scale
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.3)  # mostly live ReLUs, so that padding effects reach the output
    return model.eval()


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand((1, 1, height, width), generator=torch.Generator().manual_seed(seed)) * 255


@pytest.fixture(scope="module")
def release_case():
    model, image = tiny_model("release"), random_image(300, 410, 1)
    with torch.no_grad():
        return model, image, model(image)


@pytest.fixture(scope="module")
def paper_case():
    model, image = tiny_model("paper", seed=3), random_image(200, 260, 2)
    with torch.no_grad():
        return model, image, model(image)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5 * scale, f"max error {err} vs max |value| {scale}"


def test_tiled_equals_untiled(release_case):
    model, image, (local, omega) = release_case
    tiled_local, tiled_omega = tiled_forward(model, image, tile=128)
    _assert_close(tiled_local, local)
    _assert_close(tiled_omega, omega)


def test_paper_variant_wider_halo_uneven_tiles(paper_case):
    model, image, (local, omega) = paper_case
    tiled_local, tiled_omega = tiled_forward(model, image, tile=97, halo=model.receptive_radius + 9)
    _assert_close(tiled_local, local)
    _assert_close(tiled_omega, omega)


def test_halo_matters():
    """With half the receptive radius as context the stitched output is wrong near tile seams: the check has teeth."""
    model, image = tiny_model(), random_image(160, 160, 4)
    with torch.no_grad():
        _, omega = model(image)
        short = torch.empty_like(omega)
        for t in plan_tiles(160, 160, 80, model.receptive_radius // 2):
            _, o = model(image[:, :, t.iy0:t.iy1, t.ix0:t.ix1])
            short[:, :, t.y0:t.y1, t.x0:t.x1] = o[:, :, t.y0 - t.iy0:t.y1 - t.iy0, t.x0 - t.ix0:t.x1 - t.ix0]
    assert (short - omega).abs().max().item() > 1e-3 * omega.abs().max().item()


def test_halo_below_receptive_radius_rejected(release_case):
    model, image, _ = release_case
    with pytest.raises(ValueError, match="halo"):
        tiled_forward(model, image, tile=64, halo=model.receptive_radius - 1)


def test_receptive_radius_counts_every_stage():
    model = tiny_model()
    assert model.receptive_radius == 1 + 2 + 22 + 7 * 4


@pytest.mark.parametrize("height,width,tile,halo", [(300, 410, 64, 53), (7, 5, 3, 2), (100, 100, 100, 10)])
def test_plan_tiles_partition_the_image(height, width, tile, halo):
    cover = np.zeros((height, width), dtype=np.int64)
    for t in plan_tiles(height, width, tile, halo):
        cover[t.y0:t.y1, t.x0:t.x1] += 1
        assert 0 < t.y1 - t.y0 <= tile and 0 < t.x1 - t.x0 <= tile
        assert t.iy0 == max(t.y0 - halo, 0) and t.iy1 == min(t.y1 + halo, height)
        assert t.ix0 == max(t.x0 - halo, 0) and t.ix1 == min(t.x1 + halo, width)
    assert (cover == 1).all()


def test_memory_cap_picks_a_tile_that_fits():
    model = tiny_model()
    halo = model.receptive_radius
    per_px = bytes_per_pixel(model)
    for budget in (1 << 23, 1 << 24, 1 << 28):
        tile = tile_for_memory(model, budget, halo)
        usable = MEMORY_HEADROOM * budget
        assert (tile + 2 * halo) ** 2 * per_px <= usable < (tile + 1 + 2 * halo) ** 2 * per_px
    assert tile_for_memory(model, 1 << 26, halo, batch=4) < tile_for_memory(model, 1 << 26, halo)
    with pytest.raises(LgcError, match="max_memory_bytes"):
        tile_for_memory(model, 1000, halo)


def test_memory_capped_forward_is_exact_and_tiles(paper_case):
    model, image, (_, omega) = paper_case
    budget = math.ceil((130 + 2 * model.receptive_radius) ** 2 * bytes_per_pixel(model) / MEMORY_HEADROOM) + 16
    tiles = [t for t, _, _ in iter_tiles(model, image, tile=None, max_memory_bytes=budget)]
    assert len(tiles) == 2 * 2  # 130 px cores over 200 x 260
    assert all(t.y1 - t.y0 <= 130 and t.x1 - t.x0 <= 130 for t in tiles)
    _, capped = tiled_forward(model, image, tile=None, max_memory_bytes=budget)
    _assert_close(capped, omega)


def test_bad_image_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        tiled_forward(model, torch.zeros(1, 3, 10, 10))
    with pytest.raises(ValueError, match="non-empty"):
        tiled_forward(model, torch.zeros(1, 1, 0, 10))
