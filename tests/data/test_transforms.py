"""Augmentation config checked against the band count; normalisation on the device."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from deforest.data.transforms import AugmentationError, BandNormalizer, build_augmentation, d4_views, random_d4


def test_d4_pipeline_accepts_13_bands():
    aug = build_augmentation([A.SquareSymmetry(p=1.0)], 13, (64, 64))
    image = np.arange(64 * 64 * 13, dtype=np.float32).reshape(64, 64, 13)
    out = aug(image=image)["image"]
    assert out.shape == (64, 64, 13)
    assert sorted(out[..., 5].ravel().tolist()) == sorted(image[..., 5].ravel().tolist())


def test_rgb_only_transform_rejected_up_front():
    with pytest.raises(AugmentationError, match=r"ToSepia cannot run on 13-band 64x64 tiles"):
        build_augmentation([A.HorizontalFlip(p=0.5), A.ToSepia(p=0.1)], 13, (64, 64))


def test_normalizer_checks_lengths_and_applies_log():
    with pytest.raises(ValueError, match="3 means but 2 stds"):
        BandNormalizer([0.0, 1.0, 2.0], [1.0, 1.0])
    norm = BandNormalizer([1.0, 2.0], [2.0, 4.0], log_scale=True)
    x = torch.full((1, 2, 2, 2), np.e - 1)
    out = norm(x)
    assert torch.allclose(out[0, 0], torch.zeros(2, 2)) and torch.allclose(out[0, 1], torch.full((2, 2), -0.25))
    with pytest.raises(ValueError, match="statistics are for 2 bands, the batch has 3"):
        norm(torch.zeros(1, 3, 2, 2))


def test_d4_views_are_the_eight_symmetries():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    views = {tuple(v.flatten().tolist()) for v in d4_views(x)}
    assert len(views) == 8


def test_random_d4_passes_batches_without_tiles():
    for empty in (torch.empty(0), torch.empty(0, 13, 64, 64)):  # collate_tiles' all-bad batch, a sliced one
        out = random_d4(empty)
        assert out.shape == empty.shape and out.dtype == empty.dtype
