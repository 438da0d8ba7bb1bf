"""Backbones adapted to N bands and small tiles."""

from __future__ import annotations

import pytest
import torch

from deforest.models import BACKBONES, build_backbone


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
    with pytest.raises(ValueError, match="unknown backbone 'vgg11'"):
        build_backbone("vgg11", 3, 2)


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
