"""Backbones adapted to N bands and small tiles."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from deforest.models.networks import BACKBONES, BandStatistics, build_backbone


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("bands", [4, 13])
def test_backbone_takes_n_bands(name, bands):
    net = build_backbone(name, bands, 7, small_tile_stem=True, width=8).eval()
    with torch.no_grad():
        out = net(torch.randn(2, bands, 64, 64))
    assert out.shape == (2, 7)


def test_small_tile_stem_keeps_resolution():
    """The standard stem quarters a 64 px tile before the first block; the small-tile one halves it."""
    shapes = {}
    for small in (False, True):
        net = build_backbone("resnet18", 13, 3, small_tile_stem=small)
        x = torch.randn(1, 13, 64, 64)
        shapes[small] = net.maxpool(net.relu(net.bn1(net.conv1(x)))).shape[-1]
    assert shapes == {False: 16, True: 32}


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'.* or a timm model name"):
        build_backbone("no_such_net", 3, 2)


def test_a_timm_transformer_is_built_for_the_tile_size():
    net = build_backbone("vit_small_patch16_224", 13, 7, image_size=(64, 64)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 13, 64, 64)).shape == (2, 7)
    assert net.pos_embed.shape[1] == 1 + 4 * 4


def test_input_pool_feeds_the_network_the_averaged_tile():
    torch.manual_seed(0)
    pooled = build_backbone("small_cnn", 13, 10, width=8, input_pool=2).eval()
    pool, net = pooled
    x = torch.rand(3, 13, 64, 64)
    with torch.no_grad():
        expected = net(torch.nn.functional.avg_pool2d(x, 2))
        out = pooled(x)
    assert isinstance(pool, torch.nn.AvgPool2d) and pool.kernel_size == 2
    torch.testing.assert_close(out, expected)
    assert out.shape == (3, 10)
    with pytest.raises(ValueError, match="input_pool must be >= 1"):
        build_backbone("small_cnn", 13, 10, input_pool=0)


def test_band_statistics_by_hand_on_a_real_tile(eurosat_root):
    """Mean, std, 10/50/90th percentiles and 1/2/4 px absolute differences, band by band."""
    with rasterio.open(next((eurosat_root / "train" / "SeaLake").glob("*.tif"))) as src:
        tile = np.log1p(src.read().astype(np.float64))  # [13, 64, 64]
    features = BandStatistics.features(torch.as_tensor(tile)[None]).numpy()[0].reshape(-1, 13)
    flat = np.sort(tile[:, ::4, ::4].reshape(13, -1), axis=1)  # every 4th row and column: 256 px
    expected = [tile.mean(axis=(1, 2)), tile.std(axis=(1, 2))]
    expected += [flat[:, round(q * (flat.shape[1] - 1))] for q in (0.1, 0.5, 0.9)]
    for k in (1, 2, 4):
        expected.append(np.abs(tile[:, k:] - tile[:, :-k]).mean(axis=(1, 2)))
        expected.append(np.abs(tile[:, :, k:] - tile[:, :, :-k]).mean(axis=(1, 2)))
    np.testing.assert_allclose(features, np.stack(expected), rtol=1e-6)
    # the lake tile's near-infrared (B08) median lies below its green (B03) one
    assert features[3, 7] < features[3, 2]


def test_band_statistics_head_starts_neutral_and_scales_by_gain():
    head = BandStatistics(4, 3, gain=30.0).eval()
    x = torch.randn(5, 4, 8, 8)
    assert torch.equal(head(x), torch.zeros(5, 3))
    with torch.no_grad():
        head.linear.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(head(x)[0], torch.tensor([30.0, 0.0, -30.0]))
    assert head.linear.in_features == 4 * 11
