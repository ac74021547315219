"""``genlab data``: look at a dataset before training on it: a grid of seeded items with their captions, and its
facts (size, image shape, attributes and their values, the caption vocabulary).

    genlab data data=shapes n=64 out=grid.png
    genlab data data=fashion_mnist split=test
"""

from __future__ import annotations

from omegaconf import DictConfig

from lab_utils.commands.arguments import UserError, output_path
from lab_utils.core.config import validate


def data_command_main(cfg: DictConfig) -> None:
    import torch

    from lab_utils.core.data import build_dataset
    from lab_utils.core.plotting import save_grid

    cfg = validate(cfg)
    dataset = build_dataset(cfg.data, cfg.split)
    info = dataset.data_info()
    n = min(cfg.n, len(dataset))
    if n <= 0:
        raise UserError(f"n must be positive, got {cfg.n}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    items = [dataset[int(i)] for i in order]
    images = torch.stack([item["image"] for item in items])
    captions = [item["caption"] for item in items]
    path = save_grid(images, output_path(cfg.out, "data_grid.png"), captions=captions, ncols=8,
                     title=f"{cfg.data.name} ({cfg.split})")
    print(f"dataset: {cfg.data.name} ({cfg.split} split): {len(dataset)} images of {info.channels}x"
          f"{info.image_size}x{info.image_size}")
    for attribute, values in info.attributes.items():
        print(f"  {attribute} ({len(values)}): {', '.join(values)}")
    print(f"caption vocabulary: {len(info.vocab)} tokens (incl. special tokens): {' '.join(info.vocab)}")
    print(f"wrote {path}")
