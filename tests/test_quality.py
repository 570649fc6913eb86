"""Quality metrics on known inputs."""
from __future__ import annotations

import math

import pytest
import torch

from asyncfx.quality import class_accuracy, feature_distance, frechet_distance, psnr, ssim


def test_psnr_known_values():
    a = torch.zeros(2, 1, 8, 8)
    assert math.isinf(psnr(a, a)[0].item())
    b = a + 0.2  # MSE 0.04 on a range of 2: 10 log10(4 / 0.04) = 20 dB
    torch.testing.assert_close(psnr(b, a), torch.full((2,), 20.0, dtype=torch.float64))


def test_ssim_is_one_for_equal_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    torch.testing.assert_close(ssim(images, images), torch.ones(4, dtype=torch.float64))
    slightly = ssim(images + 0.05 * torch.randn(images.shape, generator=generator), images)
    heavily = ssim(images + 0.5 * torch.randn(images.shape, generator=generator), images)
    assert (heavily < slightly).all() and (slightly < 1).all()


def test_frechet_distance_of_gaussians():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator)
    b = torch.randn(4000, 3, generator=generator)
    assert frechet_distance(a, b) < 0.02
    shifted = b + torch.tensor([2.0, 0.0, 0.0])  # mean term 4, covariance term ~0
    assert abs(frechet_distance(a, shifted) - 4.0) < 0.1
    scaled = b * 2  # per dimension (1 + 4 - 2 * 2) = 1: about 3 in total
    assert abs(frechet_distance(a, scaled) - 3.0) < 0.2


def test_class_accuracy_counts_argmax_hits():
    classifier = torch.nn.Identity()
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert class_accuracy(classifier, logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_feature_distance_compares_directions_per_sample():
    references = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    features = torch.tensor([[5.0, 0.0], [0.0, -1.0], [4.0, -3.0]])  # same, opposite, orthogonal
    expected = torch.tensor([0.0, 2.0, math.sqrt(2.0)], dtype=torch.float64)
    torch.testing.assert_close(feature_distance(features, references), expected)
