"""Samples side by side: image grids and their differences."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from asyncfx.errors import AsyncFXError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# --- samples ----------------------------------------------------------------------------

def tile_images(images: torch.Tensor, rows: int, gap: int = 0, gap_value: int = 128) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] as one uint8 mosaic of ``rows`` rows,
    (H*rows, W*B/rows[, C]), with ``gap`` pixels of ``gap_value`` between neighbours.

    Example:
        >>> tile_images(torch.zeros(20, 1, 16, 16), rows=10, gap=2).shape
        (178, 34)
    """
    if images.dim() != 4 or len(images) % rows:
        raise AsyncFXError(f"expected (B, C, H, W) images with B a multiple of rows={rows}, got "
                           f"shape {tuple(images.shape)}.")
    tiles = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    tiles = torch.nn.functional.pad(tiles, (0, gap, 0, gap), value=gap_value)
    b, c, h, w = tiles.shape
    grid = tiles.reshape(rows, b // rows, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, b // rows * w, c)
    grid = grid[: rows * h - gap, : b // rows * w - gap]  # gaps between tiles only
    return grid[..., 0].numpy() if c == 1 else grid.numpy()


def difference_images(images: torch.Tensor, references: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """``|images - references| * gain`` mapped to [-1, 1] (black = identical)."""
    return ((images - references).abs() * gain).clamp(0, 2) - 1


def plot_samples(sequential: torch.Tensor, asynchronous: torch.Tensor, *, rows: int = 10,
                 titles: Sequence[str] = ("sequential", "asyncfx", "|difference| x4"),
                 axes: Sequence[Axes] | None = None) -> list[Axes]:
    """Sequential and asynchronous samples of the same seeds side by side, with the
    difference map; PSNR and SSIM between them in the figure title.

    Example:
        >>> plot_samples(sample_digits(model.denoiser, ...), sample_digits(partitioned, ...))
    """
    from asyncfx.quality import psnr, ssim

    if sequential.shape != asynchronous.shape:
        raise AsyncFXError(f"the two sets of samples differ in shape: {tuple(sequential.shape)} vs "
                           f"{tuple(asynchronous.shape)}; sample the same seeds with both.")
    if axes is None:
        import matplotlib.pyplot as plt

        axes = plt.subplots(1, 3, figsize=(10, 4))[1]
    panels = (sequential, asynchronous, difference_images(asynchronous, sequential))
    for ax, images, title in zip(axes, panels, titles):
        ax.imshow(tile_images(images, rows), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    axes[0].figure.suptitle(f"PSNR {psnr(asynchronous, sequential).mean():.2f} dB, "
                            f"SSIM {ssim(asynchronous, sequential).mean():.4f}")
    return list(axes)


