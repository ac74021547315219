"""What the commands share about their arguments: the error a bad one raises and where an image goes.

It sits below the dispatch (``cli``) and the commands written as modules of their own (``sample``, ``data``),
which all use it, so that none of them imports another in a circle.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input, reported as one clear message (no traceback)."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def output_path(out: str, default_name: str) -> Path:
    """Where an image goes: ``out`` itself, ``out.png`` when it has no suffix, ``out/<default_name>`` for a folder."""
    path = Path(str(out)).expanduser()
    if path.is_dir():
        return path / default_name
    if not path.suffix:
        return path.with_name(path.name + ".png")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"out={out}: an image file must end with one of {', '.join(IMAGE_SUFFIXES)}")
    return path


# `genlab eval`'s section whose keys are a family's sampling options: the config lists none of them (their one home
# is each family's SampleOptions dataclass, lab_utils.core.lab), and the loaded lab accepts or refuses each.
EVAL_OPTIONS = "eval.sample_options."


def eval_option_overrides(args: list[str]) -> list[str]:
    """The command line with ``eval.sample_options.steps=50`` read as ``++eval.sample_options.steps=50``: Hydra would
    refuse a key its config does not list; the loaded lab's ``SampleOptions`` checks the name and the value."""
    return [f"++{arg}" if arg.startswith(EVAL_OPTIONS) and "=" in arg else arg for arg in args]
