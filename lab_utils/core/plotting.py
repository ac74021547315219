"""Figures: image grids labelled with their prompts, and loss curves.

Every file is written whole or not at all (:func:`write_file`): a figure is rendered in memory, then written to a
temporary file beside its name and renamed over it, so a full disk or a kill never leaves a partial or empty image
(nor the temporary file).
"""

from __future__ import annotations

import io
import math
import os
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


def write_file(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, flushed to disk, renamed over
    ``path``. A write that fails (a full disk, a read-only folder) removes the temporary file, leaves whatever was
    at ``path`` as it was, and raises the ``OSError`` with ``path`` named."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig: plt.Figure, path: str | Path, **options) -> Path:
    """Render ``fig`` in the format ``path``'s suffix names (``savefig``'s ``options``), close it, and write it
    with :func:`write_file`."""
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", **options)
    finally:
        plt.close(fig)
    return write_file(path, buffer.getvalue())


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    captions: Sequence[str] | None = None,
    ncols: int = 8,
    title: str | None = None,
) -> Path:
    """Write a labelled grid of ``images`` (values in [-1, 1]) to ``path`` (PNG, or the format its suffix names)."""
    return save_figure(image_grid(images, captions, ncols=ncols, title=title), path, dpi=120)


def tiles(images: torch.Tensor, ncols: int, padding: int = 2) -> np.ndarray:
    """The images themselves, pixel for pixel, side by side in rows of ``ncols`` with ``padding`` black pixels
    between them: (H', W', C) uint8. No resampling, captions or title (``genlab sample layout=tiles``, the
    PNGs of ``genlab serve``): the same pixels as the tensors, quantised by :func:`to_uint8`."""
    pixels = to_uint8(images)  # (N, H, W, C)
    n, height, width, channels = pixels.shape
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    out = np.zeros((nrows * height + (nrows - 1) * padding, ncols * width + (ncols - 1) * padding, channels),
                   dtype=np.uint8)
    for index in range(n):
        row, col = divmod(index, ncols)
        top, left = row * (height + padding), col * (width + padding)
        out[top:top + height, left:left + width] = pixels[index]
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, C) uint8 (C = 1 or 3) -> the bytes of a PNG file (lossless)."""
    from PIL import Image

    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def comparison_grid(
    images: dict[str, torch.Tensor],
    prompts: Sequence[str],
    path: str | Path,
    title: str | None = None,
    cell_inches: float = 0.9,
) -> Path:
    """Families side by side: ``images[family]`` is (P, S, C, H, W) for P prompts (rows) x S seeds.

    Each family gets a block of S columns with its name above; each row starts with its prompt.
    """
    families = list(images)
    n_prompts, n_seeds = images[families[0]].shape[:2]
    for family, block in images.items():
        if block.shape[:2] != (n_prompts, n_seeds):
            raise ValueError(f"{family}: expected {n_prompts} prompts x {n_seeds} seeds, got {tuple(block.shape[:2])}")
    if len(prompts) != n_prompts:
        raise ValueError(f"{n_prompts} rows of images but {len(prompts)} prompts")
    gap = 0.25  # a narrow empty column between families
    widths = [2.2]
    for index in range(len(families)):
        widths += ([gap] if index else []) + [1.0] * n_seeds
    fig, axes = plt.subplots(
        n_prompts, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths, "wspace": 0.05, "hspace": 0.08},
        figsize=(cell_inches * sum(widths), cell_inches * n_prompts + 0.6 + (0.3 if title else 0)),
    )
    for ax in axes.flat:
        ax.axis("off")
    for row, prompt in enumerate(prompts):
        axes[row, 0].text(0.98, 0.5, "\n".join(textwrap.wrap(prompt or "(empty prompt)", 22)), ha="right",
                          va="center", fontsize=7, transform=axes[row, 0].transAxes)
    column = 1
    for index, family in enumerate(families):
        column += 1 if index else 0
        pixels = to_uint8(images[family].flatten(0, 1)).reshape(n_prompts, n_seeds, *images[family].shape[-2:],
                                                                 images[family].shape[2])
        for seed in range(n_seeds):
            for row in range(n_prompts):
                image = pixels[row, seed]
                ax = axes[row, column + seed]
                if image.shape[-1] == 1:
                    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(image, interpolation="nearest")
            if seed == n_seeds // 2:
                axes[0, column + seed].set_title(family, fontsize=9, fontweight="bold")
        column += n_seeds
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")


def curve_scale(values: list[float]) -> tuple[str, dict[str, float]]:
    """A y-scale that shows ``values``: linear within two orders of magnitude; else log, or symlog
    when some are <= 0 (GAN and VAE losses; the unbiased KID dips below 0 near its floor).

    A wide range with values <= 0 gets symlog (linear on [-linthresh, linthresh], logarithmic outside),
    not a linear axis: a KID that falls over decades during training keeps its late differences between
    families visible, where a linear axis would flatten them onto 0, and its negative estimates sit just
    below the 0 line. linthresh is the power of ten at or below the smallest nonzero magnitude (so the
    decade ticks fall on the edges of the linear band, not crowded inside it), at least 1e-3.
    """
    values = [v for v in values if math.isfinite(v)]
    magnitudes = [abs(v) for v in values if v != 0]
    if not magnitudes or max(magnitudes) / min(magnitudes) < 100:
        return "linear", {}
    if min(values) > 0:
        return "log", {}
    return "symlog", {"linthresh": max(10.0 ** math.floor(math.log10(min(magnitudes))), 1e-3)}


def family_of(label: str) -> str:
    """``"gan: loss/critic"`` -> ``"gan"``: compare labels curves ``family: key``; a bare label is a family."""
    return label.split(": ", 1)[0]


def family_colours(
    curves: dict[str, dict[str, list[tuple[float, float]]]], colours: dict[str, str] | None = None
) -> dict[str, str]:
    """One colour per family for every panel: ``colours[family]`` where given, else matplotlib's default
    cycle in the order the families first appear across all metrics."""
    given = dict(colours or {})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    unnamed: list[str] = []  # families without a given colour, in order of first appearance
    for metric in curves.values():
        for label in metric:
            family = family_of(label)
            if family not in given and family not in unnamed:
                unnamed.append(family)
    return {**given, **{family: cycle[index % len(cycle)] for index, family in enumerate(unnamed)}}


def curves_figure(
    curves: dict[str, dict[str, list[tuple[float, float]]]],
    title: str | None = None,
    colours: dict[str, str] | None = None,
) -> plt.Figure:
    """One panel per metric; ``curves[metric][label] = [(train_seconds, value), ...]``.

    A family (``family_of(label)``) has one colour in every panel; its several curves in one panel
    (a GAN's generator and critic losses) differ by line style.
    """
    metrics = list(curves)
    colour_of = family_colours(curves, colours)
    line_styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(metrics), squeeze=False, figsize=(5.2 * len(metrics), 3.8))
    for ax, metric in zip(axes[0], metrics):
        drawn: dict[str, int] = {}  # family -> index of its latest curve in this panel
        for label, points in curves[metric].items():
            if points:
                family = family_of(label)
                index = drawn[family] = drawn.get(family, -1) + 1
                x, y = zip(*points)
                ax.plot(x, y, marker="o" if len(points) < 30 else None, markersize=3, label=label,
                        color=colour_of[family], linestyle=line_styles[index % len(line_styles)])
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(metric)
        values = [v for points in curves[metric].values() for _, v in points if math.isfinite(v)]
        scale, options = curve_scale(values)
        ax.set_yscale(scale, **options)
        if values and min(values) < 0 < max(values):
            ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=0)  # KID's floor; losses change sign here
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def training_curves(
    curves: dict[str, dict[str, list[tuple[float, float]]]],
    path: str | Path,
    title: str | None = None,
    colours: dict[str, str] | None = None,
) -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    return save_figure(curves_figure(curves, title, colours), path, dpi=120)
