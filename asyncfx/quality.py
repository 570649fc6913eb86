"""Sample-quality metrics for the default digits model, the paper's metrics transposed:

- class accuracy of generated digits by a classifier (what CLIP score measures);
- Frechet distance between the classifier's penultimate features of generated and
  real digits (what FID measures);
- PSNR and SSIM of each asynchronous sample against the sequential sample from the
  same seed, and the distance between the two samples' classifier features (what LPIPS
  against the original measures: a distance in a trained network's feature space).

Images are (B, 1, H, W) tensors in [-1, 1].
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

DATA_RANGE = 2.0  # images span [-1, 1]


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``.

    Example:
        >>> class_accuracy(digits_classifier(), samples, torch.arange(10))
        0.9
    """
    with torch.no_grad():
        return (classifier(images).argmax(1) == labels).float().mean().item()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature vectors (N, D).

    Example:
        >>> frechet_distance(classifier.features(fake), classifier.features(real))
    """
    from scipy import linalg

    a, b = features_a.double().numpy(), features_b.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular for fewer samples than features; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # nearly singular product: regularise as FID code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def feature_distance(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-sample distance between feature vectors (N, D) and their references, each scaled
    to unit length first as LPIPS scales its activations: 0 for equal directions, 2 at most.

    Example:
        >>> feature_distance(classifier.features(fast), classifier.features(sequential)).mean()
    """
    unit = nn.functional.normalize(features.double(), dim=1, eps=1e-12)
    reference = nn.functional.normalize(references.double(), dim=1, eps=1e-12)
    return (unit - reference).norm(dim=1)


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image against its reference, in dB (inf if equal)."""
    mse = ((images.double() - references.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(DATA_RANGE ** 2 / mse)


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity of each image against its reference (Gaussian window, the
    usual constants K1=0.01, K2=0.03); 1.0 for identical images."""
    x, y = images.double(), references.double()
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].repeat(x.shape[1], 1, 1, 1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(z, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)
