"""``genlab sample``: images from a checkpoint (or a shipped model), rebuilt from the file alone, in a grid.

    genlab sample run=runs/shapes/ddpm/<date> prompt="a small red circle at the top" n=16 seed=0 out=grid.png
    genlab sample run=<dir> prompt=[a red circle,a blue square at the top] n=8   # a row per prompt
    genlab sample pretrained=ddpm prompt="a red circle" steps=25 guidance=3      # a family's sampling options

The command's own settings are ``conf/sample.yaml`` (:data:`SAMPLE_KEYS`); any other ``key=value`` is a sampling
option of the loaded model's family, which its ``SampleOptions`` dataclass accepts or refuses by name and value
(``Lab.sample_options``): this command names no family's options. Its checks run before torch is imported
where they can, and each bad input is one line.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable

from omegaconf import DictConfig, ListConfig

from lab_utils.commands.arguments import UserError, output_path

if TYPE_CHECKING:  # annotations only: torch takes seconds to import, and bad settings are refused before it
    import torch

    from lab_utils.core.lab import SampleOptions

# The settings of `genlab sample` itself: the keys of conf/sample.yaml. Every other key is a family's sampling option.
SAMPLE_KEYS = ("run", "pretrained", "prompt", "n", "seed", "batch_size", "out", "device", "ema", "mode", "layout")
MAX_SAMPLES = 256  # images per `genlab sample` grid (n x number of prompts); `genlab eval` draws thousands


def option_overrides(args: list[str]) -> list[str]:
    """The command line with ``steps=10`` read as ``++steps=10`` for a name that is not one of :data:`SAMPLE_KEYS`:
    a family's sampling option, which conf/sample.yaml does not list (Hydra would refuse the key) and the loaded
    lab's ``SampleOptions`` accepts or refuses. ``+``/``~``/dotted keys and flags are left as they are."""
    out = []
    for arg in args:
        key, equals, _ = arg.partition("=")
        out.append(f"++{arg}" if equals and key.isidentifier() and key not in SAMPLE_KEYS else arg)
    return out


def prompt_list(prompt: object) -> list[str]:
    """``prompt="a red circle"`` or ``prompt=[a red circle,a blue square]`` (one grid row per prompt)."""
    prompts = [str(p) for p in prompt] if isinstance(prompt, (ListConfig, list, tuple)) else [str(prompt)]
    if not prompts:
        raise UserError("prompt=[] holds no prompt; give one (prompt=\"a red circle\") or several (prompt=[a,b])")
    return prompts


def warn_unknown_words(prompts: list[str], vocab: list[str], data_name: str) -> None:
    """Say which prompt words the model never saw (it reads each as [UNK])."""
    from lab_utils.core.data import words

    known = set(vocab)
    unknown = sorted({word for prompt in prompts for word in words(prompt) if word not in known})
    if unknown:
        print(f"genlab: warning: the model does not know the word(s) {', '.join(unknown)} and reads each as [UNK]; "
              f"`genlab data data={data_name}` lists the words it knows", file=sys.stderr)


def draw(sample: Callable, prompts: list[str], generator: "torch.Generator", batch_size: int,
         options: "SampleOptions | None") -> "torch.Tensor":
    """``sample(prompts, options=options)`` in batches of ``batch_size``, one generator throughout (so the images
    depend on the seed and the batch size only): (len(prompts), C, H, W)."""
    import torch

    return torch.cat([sample(prompts[start:start + batch_size], generator=generator, options=options)
                      for start in range(0, len(prompts), batch_size)])


def sample_command_main(cfg: DictConfig) -> None:
    prompts = prompt_list(cfg.prompt)
    if not isinstance(cfg.n, int) or cfg.n <= 0:
        raise UserError(f"n must be a positive integer, got {cfg.n}")
    if cfg.n * len(prompts) > MAX_SAMPLES:
        raise UserError(f"n={cfg.n} x {len(prompts)} prompt(s) is more than the {MAX_SAMPLES} images one grid shows; "
                        "lower n (`genlab eval` measures thousands of samples)")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer, got {cfg.batch_size}")
    if cfg.layout not in ("figure", "tiles"):
        raise UserError(f"layout={cfg.layout}: choose figure (captioned grid) or tiles (the pixels only, as "
                        "`genlab serve` returns them)")
    out = output_path(cfg.out, "samples.png")
    if cfg.layout == "tiles" and out.suffix.lower() != ".png":
        raise UserError(f"out={cfg.out}: layout=tiles writes a PNG; give a name ending in .png")

    import torch

    from lab_utils.core.plotting import png_bytes, save_grid, tiles, write_file
    from lab_utils.harness.devices import pick_device
    from lab_utils.harness.zoo import load_source

    device = pick_device(cfg.device)
    loaded = load_source(cfg.run, cfg.pretrained, device=device, ema=cfg.ema)
    lab = loaded.lab
    method = {"sample": "sample", "reconstruct": "reconstruct", "interpolate": "interpolate"}.get(cfg.mode)
    if method is None or not hasattr(lab, method):
        modes = [m for m in ("sample", "reconstruct", "interpolate") if hasattr(lab, m)]
        raise UserError(f"mode={cfg.mode} is not available for model {loaded.cfg.model.name}; choose one of {modes}")
    fn = getattr(lab, method)
    given = {key: value for key, value in cfg.items() if key not in SAMPLE_KEYS and value is not None}
    options = checked_options(lab, given, loaded.cfg.model.name)
    if method == "reconstruct" and given:
        raise UserError(f"mode=reconstruct takes no sampling options (got {', '.join(given)}): it decodes the "
                        "posterior mean of each test image")
    title = f"{loaded.cfg.model.name} step {loaded.state['trainer']['step']}"
    if method == "reconstruct":
        images, captions = _reconstructions(loaded, fn, cfg.n, cfg.seed, device)
        path = save_grid(images, out, captions=captions, ncols=min(8, cfg.n), title=f"{title}: reconstructions")
        print(f"wrote {path} ({cfg.n} test images, each above its reconstruction)")
        return
    warn_unknown_words(prompts, loaded.lab.data_info.vocab, loaded.cfg.data.name)
    rows = len(prompts)
    prompts = [p for p in prompts for _ in range(cfg.n)]  # n images of each prompt, prompt by prompt
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        if method == "interpolate":  # one path through all the prompts: a single call
            images = fn(prompts, generator=generator, options=options)
        else:
            images = draw(fn, prompts, generator, cfg.batch_size, options)
    shown = ", ".join(f"{k}={v}" for k, v in given.items())
    ncols = cfg.n if rows > 1 and cfg.n <= 16 else min(8, cfg.n)  # several prompts: one row each
    if cfg.layout == "tiles":
        write_file(out, png_bytes(tiles(images, ncols=cfg.n if rows > 1 else min(8, cfg.n))))
        print(f"wrote {out} ({cfg.n} image(s) for each of {len(set(prompts))} prompt(s), seed {cfg.seed}, tiles)")
        return
    path = save_grid(images, out, captions=prompts if len(prompts) <= 64 else None, ncols=ncols,
                     title=title + (f" ({shown})" if shown else "") + (f": {method}" if method != "sample" else ""))
    asked = ", ".join(repr(p) for p in dict.fromkeys(prompts))
    print(f"wrote {path} ({cfg.n} image(s) for each of {asked}, seed {cfg.seed})")


def checked_options(lab: Any, given: dict[str, Any], model: str) -> "SampleOptions":
    """The lab's ``SampleOptions`` with the options given on the command line (``Lab.sample_options``, the one
    parser): a name the family does not take, or a value out of its field's bounds, is one line."""
    try:
        return lab.sample_options(given)
    except ValueError as err:
        taken = {item.name for item in dataclasses.fields(lab.SampleOptions)}
        typo = any(name not in taken for name in given)  # perhaps one of the command's own settings, misspelt
        hint = f" (genlab sample's own settings: {', '.join(SAMPLE_KEYS)})" if typo else ""
        raise UserError(f"model {model}: {err}{hint}") from None


def _reconstructions(loaded, reconstruct, n: int, seed: int, device) -> tuple["torch.Tensor", list[str]]:
    """``n`` seeded test images of the run's dataset and their reconstructions, in alternating rows of 8."""
    import torch

    from lab_utils.core.data import build_dataset

    dataset = build_dataset(loaded.cfg.data, "test")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    items = [dataset[int(i)] for i in order]
    originals = torch.stack([item["image"] for item in items]).to(device)
    captions = [item["caption"] for item in items]
    with torch.no_grad():
        recons = reconstruct(originals, captions).to(device)
    images, labels = [], []
    for start in range(0, len(items), 8):  # a row of originals, then the row of their reconstructions
        stop = start + 8
        images += [originals[start:stop], recons[start:stop]]
        labels += captions[start:stop] + ["reconstruction"] * len(recons[start:stop])
    return torch.cat(images), labels
