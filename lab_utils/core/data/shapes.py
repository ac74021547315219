"""``shapes``: one coloured shape on a plain dark background, drawn procedurally.

Four attributes, sampled uniformly: shape (3) x colour (8) x size (2) x position (9). Some
combinations ("blue triangle") are held out of the train split and appear only in the test
split, so a text-conditioned model can be asked to compose words it never saw together.

Drawing is vectorised over a block of images. Each shape has a signed distance ``d(p)``
(negative inside), and a pixel's coverage is the usual anti-aliasing approximation

    coverage(p) = clamp(0.5 - d(p), 0, 1)          # d in pixels, p the pixel centre
    image = background + (colour - background) * coverage

with ``d = |p - c| - R`` (circle), ``max(|dx|, |dy|) - h`` (square) and the largest of the
three edge distances ``n_k . (p - c) - rho / 2`` (upward equilateral triangle, centroid c).
Everything is deterministic in (seed, split, index): block ``b`` of ``block_size`` items
draws from its own generator, so the first N items never depend on how many are made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.data.base import CaptionedDataset, DataConfig
from lab_utils.core.data.captions import words

GENERATOR_VERSION = 2  # bump when drawing changes, so old cache files are not reused


class ShapesDataset(CaptionedDataset):
    """Procedurally drawn RGB shapes with captions such as "a small red circle at the top left"."""

    name = "shapes"
    channels = 3
    palette: ClassVar[dict[str, tuple[int, int, int]]] = {  # RGB, at least ~90 apart pairwise
        "red": (220, 40, 40), "orange": (245, 135, 20), "yellow": (235, 220, 40),
        "green": (40, 190, 60), "cyan": (40, 205, 225), "blue": (50, 80, 235),
        "purple": (185, 60, 225), "white": (235, 235, 235),
    }
    # size of each shape relative to the radius R: the square has the circle's area
    # ((2h)^2 = pi R^2), the triangle's circumradius rho = 1.2 R keeps it inside the frame
    shape_scale: ClassVar[dict[str, float]] = {"circle": 1.0, "square": math.sqrt(math.pi) / 2, "triangle": 1.2}
    attributes = {
        "shape": list(shape_scale),
        "colour": list(palette),
        "size": ["small", "large"],
        "position": ["top left", "top", "top right", "left", "center", "right",
                     "bottom left", "bottom", "bottom right"],  # row-major 3 x 3 grid
    }
    templates = (
        "a {size} {colour} {shape} {where}",  # a small red circle at the top left (canonical)
        "{colour} {shape}, {size}, {position}",
        "a {colour} {shape} that is {size}, {where}",
        "there is a {size} {colour} {shape} {where}",
        "{where} there is a {size} {colour} {shape}",
        "a {size} {shape} in {colour}, {position}",
        "{position}: {size} {colour} {shape}",
        "a {colour} {shape}",  # partial: short prompts are in-distribution too
        "a {size} {colour} {shape}",
        "a {colour} {shape} {where}",
    )
    block_size: ClassVar[int] = 1000  # items per generator block (changing it changes the pixels)

    @dataclass
    class Config(DataConfig):
        name: str = "shapes"
        num_train: int = 20000
        num_test: int = 2000
        held_out: list[str] = field(default_factory=lambda: ["blue triangle", "green circle"])
        cache_dir: Optional[str] = None  # null: $GENLAB_CACHE/shapes or ~/.cache/genlab/shapes
        small_radius: float = 0.11  # R of small shapes, as a fraction of image_size (3.5 px at 32)
        large_radius: float = 0.19  # R of large shapes (6.1 px at 32)
        size_jitter: float = 0.08  # R is multiplied by 1 + U(-j, j)
        position_margin: float = 0.28  # grid centres at margin, 0.5, 1 - margin of the image
        position_jitter: float = 0.04  # centre moves by U(-j, j) * image_size (1.3 px at 32)
        brightness_jitter: float = 0.1  # colour multiplied by 1 + U(-j, j)
        colour_jitter: float = 0.04  # plus U(-j, j) * 255 per channel
        background: int = 8  # grey level of the plain dark background

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.num_train <= 0 or self.num_test <= 0:
                raise ValueError(f"data.num_train and data.num_test must be positive, "
                                 f"got {self.num_train} and {self.num_test}")
            if not 0 < self.small_radius < self.large_radius < 0.5:
                raise ValueError(f"need 0 < data.small_radius < data.large_radius < 0.5, "
                                 f"got {self.small_radius} and {self.large_radius}")
            if not 0 < self.position_margin < 0.5:
                raise ValueError(f"data.position_margin must be in (0, 0.5), got {self.position_margin}")
            for key in ("size_jitter", "position_jitter", "brightness_jitter", "colour_jitter"):
                if not 0 <= getattr(self, key) < 0.5:
                    raise ValueError(f"data.{key} must be in [0, 0.5), got {getattr(self, key)}")
            if not 0 <= self.background <= 255:
                raise ValueError(f"data.background must be a grey level in 0..255, got {self.background}")
            held_out = parse_held_out(self.held_out, ShapesDataset.attributes)  # fails on an unknown word
            every = torch.cartesian_prod(*(torch.arange(len(v)) for v in ShapesDataset.attributes.values()))
            if held_out_mask(every, held_out).all():  # (432, 4): every attribute combination
                raise ValueError(f"data.held_out={self.held_out} leaves no combination for the train split")

    def __init__(self, cfg: "ShapesDataset.Config", split: str = "train"):
        super().__init__(cfg, split)
        cfg = self.cfg  # the checked dataclass
        self.held_out = parse_held_out(cfg.held_out, self.attributes)  # list of {column: value}
        total = cfg.num_train if split == "train" else cfg.num_test
        self.num_items = total if cfg.subset is None else min(cfg.subset, total)
        pixels, labels = self._load_or_generate(total)
        self._set_data(pixels, labels)

    # --- generation and cache ------------------------------------------------------------
    def _cache_path(self, total: int) -> Path:
        """The cache file of the full split, keyed by a hash of everything that affects pixels."""
        key = {k: v for k, v in asdict(self.cfg).items()
               if k not in ("name", "root", "download", "subset", "cache_dir", "num_train", "num_test")}
        key.update(split=self.split, total=total, version=GENERATOR_VERSION, block=self.block_size,
                   palette=self.palette, scale=self.shape_scale, attributes=self.attributes)
        if self.split == "test":
            key.pop("held_out")  # the test split is sampled without exclusions
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        folder = Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else cache_folder("shapes")
        return folder / f"shapes_{self.split}_{self.image_size}px_{total}_{digest}.pt"

    def _load_or_generate(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self._cache_path(total)
        self.cache_path: Optional[Path] = path
        self.loaded_from_cache = False
        if path.exists():
            cached = self._read_cache(path, total)
            if cached is not None:
                self.loaded_from_cache = True
                return cached
        if self.num_items < total:  # a subset: generate just the first N, do not cache
            self.cache_path = None
            return self.generate(self.num_items)
        pixels, labels = self.generate(total)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:  # atomic: a crash mid-write never leaves a half file under the final name
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": pixels, "labels": labels}, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # torch's file writer reports a full disk as a RuntimeError
            warnings.warn(f"could not write the shapes cache {path} ({str(err).strip()[:200]}); "
                          "the split is used without a cache", stacklevel=2)
            self.cache_path = None
        finally:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        return pixels, labels

    def _read_cache(self, path: Path, total: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached split, or None (with a warning) if the file is damaged: it is only a cache, so it is rebuilt."""
        try:
            saved = torch.load(path, weights_only=True)
            images, labels = saved["images"], saved["labels"]
            size = self.image_size
            if (tuple(images.shape) != (total, 3, size, size) or images.dtype != torch.uint8
                    or tuple(labels.shape) != (total, len(self.attributes))):
                raise ValueError(f"it holds images {tuple(images.shape)} and labels {tuple(labels.shape)}")
        except Exception as err:  # noqa: BLE001 (truncated, empty, foreign: any damage means rebuild)
            reason = "it is empty" if path.stat().st_size == 0 else f"{type(err).__name__}: {str(err).strip()[:120]}"
            warnings.warn(f"the shapes cache {path} is damaged ({reason}); rebuilding it", stacklevel=3)
            return None
        return images, labels

    def generate(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` items of the split: (count, 3, S, S) uint8 and (count, 4) long."""
        blocks = [self._generate_block(b) for b in range(math.ceil(count / self.block_size))]
        pixels = torch.cat([block[0] for block in blocks])[:count]
        labels = torch.cat([block[1] for block in blocks])[:count]
        return pixels, labels

    def _generate_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, size, n = self.cfg, self.image_size, self.block_size
        seed = hashlib.blake2b(f"shapes/{cfg.seed}/{self.split}/{block}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(seed, "little") >> 1)

        # (1) attributes, uniform; the train split redraws rows that hit a held-out combination
        counts = torch.tensor([len(values) for values in self.attributes.values()])  # (A,)
        labels = (torch.rand(n, len(counts), generator=generator) * counts).long()  # (n, A)
        while self.split == "train" and (redo := self.is_held_out(labels)).any():
            labels[redo] = (torch.rand(int(redo.sum()), len(counts), generator=generator) * counts).long()
        shape, colour, large, position = labels.unbind(1)  # each (n,)

        # (2) geometry in pixels: centre c = grid centre + jitter, radius R = base * (1 + jitter)
        jitter = torch.rand(n, 7, generator=generator) * 2 - 1  # (n, 7) in [-1, 1): x, y, R, brightness, RGB
        grid = torch.tensor([cfg.position_margin, 0.5, 1 - cfg.position_margin]) * size  # (3,)
        cx = grid[position % 3] + jitter[:, 0] * cfg.position_jitter * size  # (n,)
        cy = grid[position // 3] + jitter[:, 1] * cfg.position_jitter * size  # (n,)
        radius = torch.where(large.bool(), cfg.large_radius, cfg.small_radius) * size
        radius = radius * (1 + jitter[:, 2] * cfg.size_jitter)  # R, (n,)
        radius = radius * torch.tensor(list(self.shape_scale.values()))[shape]  # r = scale_shape * R

        # (3) signed distance d of every pixel centre to the item's shape (one group per shape)
        coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
        dx = coords.view(1, 1, size) - cx.view(n, 1, 1)  # (n, 1, S)
        dy = coords.view(1, size, 1) - cy.view(n, 1, 1)  # (n, S, 1)
        r = radius.view(n, 1, 1)
        distance = torch.empty(n, size, size)
        for index, shape_name in enumerate(self.attributes["shape"]):
            group = shape == index
            distance[group] = signed_distance(shape_name, dx[group], dy[group], r[group])  # (k, S, S)
        coverage = (0.5 - distance).clamp_(0, 1).unsqueeze(1)  # (n, 1, S, S)

        # (4) colour with brightness and per-channel jitter, blended over the background
        rgb = torch.tensor(list(self.palette.values()), dtype=torch.float32)[colour]  # (n, 3)
        rgb = rgb * (1 + jitter[:, 3:4] * cfg.brightness_jitter) + jitter[:, 4:7] * cfg.colour_jitter * 255
        rgb = rgb.clamp(0, 255).view(n, 3, 1, 1)
        image = cfg.background + (rgb - cfg.background) * coverage  # (n, 3, S, S)
        return image.round().to(torch.uint8), labels

    # --- held-out combinations -----------------------------------------------------------
    def is_held_out(self, labels: torch.Tensor) -> torch.Tensor:
        """(..., 4) labels -> (...) bool: does the item match any ``held_out`` phrase?"""
        return held_out_mask(labels, self.held_out)

    # --- captions ------------------------------------------------------------------------
    def caption_fields(self, labels: list[int]) -> dict[str, str]:
        names = [values[v] for values, v in zip(self.attributes.values(), labels)]
        shape, colour, size, position = names
        where = {"center": "in the center", "left": "on the left", "right": "on the right"}.get(
            position, f"at the {position}")  # "at the top left", "at the bottom"
        return {"shape": shape, "colour": colour, "size": size, "position": position, "where": where}

    def default_prompts(self) -> list[str]:
        """Ten fixed prompts: full ones, short partial ones, and a held-out combination (last three)."""
        return [
            "a large red circle in the center",
            "a small blue square at the top left",
            "a large yellow triangle at the bottom right",
            "a small purple circle on the right",
            "a large white square at the top",
            "a red circle",
            "a large green triangle",
            "a large blue triangle in the center",  # held out of train by default
            "an orange circle at the bottom left",
            "a small cyan triangle at the bottom",
        ]


def signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) from points (dx, dy) relative to the centre.

    ``r`` is the circle's radius, the square's half-side or the triangle's circumradius rho.
    """
    if shape == "circle":
        return torch.sqrt(dx**2 + dy**2) - r  # |p - c| - R
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - r  # max(|dx|, |dy|) - h
    if shape == "triangle":  # edge normals n_k: (0, 1), (+-sqrt(3)/2, -1/2); inradius rho / 2
        half_sqrt3 = math.sqrt(3) / 2
        edges = torch.maximum(dy, half_sqrt3 * dx - 0.5 * dy)
        return torch.maximum(edges, -half_sqrt3 * dx - 0.5 * dy) - r / 2
    raise ValueError(f"no signed distance for shape {shape!r}")


def held_out_mask(labels: torch.Tensor, held_out: list[dict[int, int]]) -> torch.Tensor:
    """(..., A) labels -> (...) bool: True where the labels match every value of some entry."""
    mask = torch.zeros(labels.shape[:-1], dtype=torch.bool)
    for combination in held_out:
        match = torch.ones_like(mask)
        for column, value in combination.items():
            match &= labels[..., column] == value
        mask |= match
    return mask


def parse_held_out(
    phrases: list[str],
    attributes: dict[str, list[str]],
    filler: tuple[str, ...] = ("a", "an", "the", "at", "in", "on"),
) -> list[dict[int, int]]:
    """Phrases such as "blue triangle" -> [{column: value index}], matching multi-word values first.

    ``filler`` words are skipped, so a phrase may be written like a caption
    ("a large blue triangle at the top left").
    """
    lookup: dict[tuple[str, ...], tuple[int, int]] = {}  # value words -> (column, value index)
    for column, values in enumerate(attributes.values()):
        for index, value in enumerate(values):
            lookup[tuple(words(value))] = (column, index)
    longest = max(len(key) for key in lookup)
    parsed = []
    for phrase in phrases:
        tokens, combination, start = [w for w in words(phrase) if w not in filler], {}, 0
        if not tokens:
            raise ValueError(f"held_out entry {phrase!r} is empty")
        while start < len(tokens):
            for length in range(min(longest, len(tokens) - start), 0, -1):  # "top left" before "top"
                if (key := tuple(tokens[start:start + length])) in lookup:
                    break
            else:
                known = "; ".join(f"{a}: {', '.join(v)}" for a, v in attributes.items())
                raise ValueError(f"held_out entry {phrase!r}: unknown word {tokens[start]!r}; "
                                 f"known values: {known}")
            column, index = lookup[key]
            if column in combination:
                raise ValueError(f"held_out entry {phrase!r} names {list(attributes)[column]!r} twice")
            combination[column] = index
            start += length
        parsed.append(combination)
    return parsed
