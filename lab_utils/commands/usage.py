"""What ``genlab`` says about itself: ``genlab --version``, each command's own ``--help`` page, and shell completion.

    genlab --version                        the package's version, and torch's and Python's
    genlab sample --help                    what the command does, its settings with their defaults and comments,
                                            its config groups and their choices, and Hydra's flags it takes
    genlab train model=vae --help           the same page for the config these overrides compose
    eval "$(genlab --shell-completion install=bash)"    tab completion of commands, keys and group choices in bash

A command's help page is its primary config, ``conf/<name>.yaml``: the header comment says what the command does
and gives examples, and each key's comment says what it means. So the page cannot drift from the config it
describes: it *is* the config, without the ``defaults``/``hydra`` blocks that only wire Hydra, followed by the
settings the config groups bring in (a model's, the trainer's), composed with the overrides given.

Completion is Hydra's own bash plugin, run by the command being completed (``lab_utils.commands.cli``):
``genlab train mod<TAB>`` asks ``genlab train``'s config, as ``python app.py mod<TAB>`` does for a Hydra app.
"""

from __future__ import annotations

import platform
from importlib import metadata
from importlib.resources import files

from omegaconf import OmegaConf

from lab_utils.core.config import CONFIG_MODULE

# Blocks of a primary config that wire Hydra rather than set the command: not shown on a help page.
WIRING_KEYS = ("defaults", "hydra")
# The config groups a user picks from (`model=ddpm`); preset_model is chosen by model and preset together.
USER_GROUPS = ("model", "data", "preset")

FLAGS = """Flags (Hydra's):
  --cfg job                print the composed config and stop
  -m, --multirun           one job per value of a comma list: genlab {command} -m seed=0,1,2 (each job writes its
                           own output, its number added to out=; an error in one job does not stop the others)
  --hydra-help             Hydra's own help page
  --shell-completion install=bash   print the bash completion script: eval "$(genlab --shell-completion install=bash)\""""


def version_line() -> str:
    """``genlab 0.1.0 (torch 2.5.1, Python 3.11.2)``, read from the installed distributions without importing torch."""

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"genlab {installed('genlab')} (torch {installed('torch')}, Python {platform.python_version()})"


def config_text(config_name: str) -> str:
    """``conf/<config_name>.yaml`` as written, comments included, without its ``defaults:`` and ``hydra:`` blocks."""
    lines = (files(CONFIG_MODULE) / f"{config_name}.yaml").read_text().splitlines()
    kept, skipping = [], False
    for line in lines:
        top_level = line[:1] not in ("", " ", "#")
        if top_level:
            skipping = line.split(":", 1)[0] in WIRING_KEYS
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    return "\n".join(kept)


def group_choices(config_name: str) -> dict[str, list[str]]:
    """The groups ``conf/<config_name>.yaml`` composes that a user picks from, with their choices."""
    defaults = OmegaConf.load(str(files(CONFIG_MODULE) / f"{config_name}.yaml")).get("defaults") or []
    used = {key for entry in defaults if OmegaConf.is_dict(entry) for key in entry}
    return {group: sorted(path.name[:-len(".yaml")] for path in (files(CONFIG_MODULE) / group).iterdir()
                          if path.name.endswith(".yaml"))
            for group in USER_GROUPS if group in used}


def help_page(command: str, config_name: str, overrides: list[str]) -> str:
    """``genlab <command> --help``: the command's config with its comments, the group choices, the settings the
    groups bring in (composed with ``overrides``), and the flags."""
    from hydra import compose, initialize_config_module

    own = config_text(config_name)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    own_keys = set(OmegaConf.load(str(files(CONFIG_MODULE) / f"{config_name}.yaml")).keys())
    brought = {key: cfg[key] for key in cfg if key not in own_keys and key not in WIRING_KEYS}
    parts = [f"genlab {command} [key=value ...]", "", own]
    groups = group_choices(config_name)
    if groups:
        chosen = " ".join(f"{group}={choices[group]}" for group in groups)
        others = [arg for arg in overrides if arg.split("=", 1)[0].lstrip("+~") not in groups]
        parts += ["", "Config groups (pick with group=choice):"]
        parts += [f"  {group}: {', '.join(choices)}" for group, choices in groups.items()]
        parts += ["", f"Settings the groups bring in, as composed ({' '.join([chosen, *others])}); set any as "
                      "section.key=value:"]
        text = OmegaConf.to_yaml(OmegaConf.create({key: OmegaConf.to_container(value) if OmegaConf.is_config(value)
                                                   else value for key, value in brought.items()}))
        parts += ["  " + line for line in text.rstrip().splitlines()]
    parts += ["", FLAGS.format(command=command)]
    return "\n".join(parts)

