"""Heatmap decoders: encode -> decode round trips through the network's own targets T = K * G."""
import pytest
import torch

from lgc_fast.decode import DECODERS, argmax, blend, decode, kernel_deconv, local_centroid
from lgc_fast.ops import target_maps_ref

SIZE = 40


@pytest.fixture(scope="module")
def round_trip():
    """64 random sub-pixel points at least 3 px inside a 40 x 40 map, and their targets (float32, one face)."""
    g = torch.Generator().manual_seed(0)
    pts = 3.0 + torch.rand(1, 64, 2, generator=g, dtype=torch.float64) * (SIZE - 7.0)
    maps = target_maps_ref(pts.float(), torch.ones(1, 64, dtype=torch.bool), SIZE, SIZE)
    return pts, maps


def test_round_trip_errors(round_trip):
    pts, maps = round_trip
    errors = {}
    for name, decoder in DECODERS.items():
        got, conf = decoder(maps)
        assert got.shape == (1, 64, 2) and got.dtype == torch.float32 and conf.shape == (1, 64)
        err = (got.double() - pts).abs()
        errors[name] = (err.mean().item(), err.max().item())
    print("\nround trip |error| per axis (mean, max) px:", {k: (round(a, 4), round(b, 4)) for k, (a, b) in errors.items()})
    assert errors["argmax"][1] <= 0.5 + 1e-6
    assert errors["argmax_shift"][0] < errors["argmax"][0]
    assert errors["local_gaussian"][1] < 0.1
    best = min(errors, key=lambda k: errors[k][1])
    assert best == "kernel_deconv" and errors[best][1] < 0.05
    assert errors["kernel_deconv"][1] < 1e-3  # exact up to float32 rounding of the maps


def test_kernel_deconv_near_the_border():
    pts = torch.tensor([[[0.3, 20.2], [38.6, 0.45], [1.7, 37.9], [20.5, 20.5], [0.0, 0.0]]], dtype=torch.float64)
    maps = target_maps_ref(pts, torch.ones(1, 5, dtype=torch.bool), SIZE, SIZE)
    got, _ = kernel_deconv(maps)
    torch.testing.assert_close(got.double(), pts, rtol=0, atol=1e-4)


def test_confidence_is_the_peak_value(round_trip):
    _, maps = round_trip
    _, want = argmax(maps)
    for name, decoder in DECODERS.items():
        torch.testing.assert_close(decoder(maps)[1], want, msg=name)


def test_seeds_pick_the_nearest_regional_maximum():
    pts = torch.tensor([[[10.3, 10.6], [30.2, 28.7]]], dtype=torch.float64)
    maps = target_maps_ref(pts, torch.ones(1, 2, dtype=torch.bool), SIZE, SIZE)
    one = maps[:, :1] + 0.5 * maps[:, 1:]  # a strong blob at pts[0] and a weaker one at pts[1], one channel
    seeds = torch.tensor([[[29.0, 27.0]]])
    for decoder in (kernel_deconv, local_centroid):
        unseeded, _ = decoder(one)
        seeded, conf = decoder(one, seeds=seeds)
        assert (unseeded.double() - pts[:, :1]).norm() < 0.5
        assert (seeded.double() - pts[:, 1:]).norm() < 0.5
        assert conf.item() < one.max().item()
    flat = torch.zeros(1, 1, 8, 8)  # no regional maximum with a positive value: fall back to the channel maximum
    got, _ = kernel_deconv(flat, seeds=torch.tensor([[[5.0, 5.0]]]))
    assert torch.isfinite(got).all()


def test_dtypes_and_dispatch(round_trip):
    pts, maps = round_trip
    half, _ = decode(maps.half(), "kernel_deconv")
    assert (half.double() - pts).abs().max() < 0.05
    for name in DECODERS:
        torch.testing.assert_close(decode(maps, name)[0], DECODERS[name](maps)[0])
    with pytest.raises(ValueError, match="method"):
        decode(maps, "centroid")


def test_decoder_input_errors():
    maps = torch.rand(1, 2, 8, 8)
    for name, decoder in DECODERS.items():
        if name == "argmax":
            continue
        with pytest.raises(ValueError, match="heatmaps"):
            decoder(maps[0])
        with pytest.raises(TypeError, match="heatmaps"):
            decoder(maps.long())
        with pytest.raises(ValueError, match="seeds"):
            decoder(maps, seeds=torch.zeros(1, 2))


def test_blend():
    local = torch.zeros(1, 4, 2)
    fit = torch.ones(1, 4, 2)
    conf = torch.tensor([[0.0, 0.1, 0.3, 0.9]])
    got = blend(local, conf, fit, low=0.1, high=0.5)
    torch.testing.assert_close(got[0, :, 0], torch.tensor([1.0, 1.0, 0.5, 0.0]))
    assert blend(local.double(), conf, fit).dtype == torch.float64
    with pytest.raises(ValueError, match="fit_points"):
        blend(local, conf, fit[:, :3])
    with pytest.raises(ValueError, match="local_conf"):
        blend(local, conf[:, :3], fit)
    with pytest.raises(ValueError, match="low"):
        blend(local, conf, fit, low=0.5, high=0.5)
    with pytest.raises(TypeError, match="local_points"):
        blend(local.long(), conf, fit)
