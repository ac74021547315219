"""What the commands share about their arguments: the error a bad one raises and where an image goes.

It sits below the dispatch (``cli``) and the commands written as modules of their own (``sample``, ``data``),
which all use it, so that none of them imports another in a circle.
"""

from __future__ import annotations

import argparse
import re
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


# Keys whose value is free text: Hydra would read a comma in it as a list or a sweep (`prompt=a red circle, small`).
FREE_TEXT_KEYS = ("prompt",)


def free_text_overrides(args: list[str]) -> list[str]:
    """The command line with ``prompt=a red circle, small`` passed to Hydra quoted, as one string, as written.
    A value that starts with ``[`` or a quote is Hydra's own syntax (a list of prompts, a quoted text): left as is."""
    out = []
    for arg in args:
        key, equals, value = arg.partition("=")
        if equals and key.lstrip("+~") in FREE_TEXT_KEYS and value[:1] not in ("[", "'", '"'):
            # Hydra's quoted string: a backslash run before a quote (or at the end) is doubled, a quote escaped,
            # and "${" escaped so that a prompt is never read as an interpolation
            value = re.sub(r"(\\+)(?='|$)", lambda run: run.group(1) * 2, value)
            arg = f"{key}='" + value.replace("'", "\\'").replace("${", "\\${") + "'"
        out.append(arg)
    return out


def key_value_arguments(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``out=grades time_limit=60 full=true`` read as ``--out grades --time-limit 60 --full``, so the commands
    written with argparse (grade, notebooks) take ``key=value`` as every other genlab command does (their
    ``--flags`` keep working). A ``key=value`` that names none of the command's options is a UserError."""
    options = {action.dest: action for action in parser._actions if action.option_strings}
    out = []
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals or arg.startswith("-") or not key.isidentifier():
            out.append(arg)
            continue
        action = options.get(key)
        if action is None or action.dest == "help":
            names = ", ".join(f"{name}=" for name in options if name != "help")
            raise UserError(f"unknown setting {key}= for {parser.prog}; its settings are {names}")
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch: full=true / full=false
            if value.lower() not in ("true", "false"):
                raise UserError(f"{key}={value}: {key} is true or false")
            out += [flag] if value.lower() == "true" else []
        else:
            out += [flag, value]
    return out
