"""Figures: image grids labelled with their prompts, and loss curves."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display needed; notebooks switch to inline themselves
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clamped and quantised."""
    images = images.detach().float().cpu().clamp(-1, 1)
    images = ((images + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> {0..255}
    return images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
    cell_inches: float = 1.3,
) -> plt.Figure:
    """A matplotlib figure with one image per cell and its caption written above it."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    pixels = to_uint8(images)
    n = len(pixels)
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    caption_inches = 0.45 if captions is not None else 0.0
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False,
        figsize=(ncols * cell_inches, nrows * (cell_inches + caption_inches) + (0.4 if title else 0)),
    )
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= n:
            continue
        image = pixels[index]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        if captions is not None:
            ax.set_title("\n".join(textwrap.wrap(captions[index] or "(empty prompt)", 18)), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    captions: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
) -> Path:
    """Write a labelled grid of ``images`` (values in [-1, 1]) to ``path`` (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = image_grid(images, captions, ncols=ncols, title=title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
