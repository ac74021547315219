"""genlab, the door for a notebook: its first cell imports what it uses of the package in one line, as nanoGPT's
``from model import GPTConfig, GPT``::

    from genlab import build_dataset, compose, image_grid, load_lab, pretrained_mode, smoke_mode, train, zoo

A first cell that imports from nine modules in two trees teaches the tree, not the idea (STYLE 18). What is here,
and why a notebook needs it (each name is imported from its home, the module that defines it, so
``genlab.train is lab_utils.harness.run.train``; ``tests/test_genlab_door.py`` holds that):

    configs      compose, ConfigError           a config as ``genlab <command>`` composes it from ``conf/``, checked
                                                against the typed schemas (``lab_utils.core.config``); the one error
                                                a bad override or value raises (``lab_utils.core.schema``)
    data         build_dataset, DataNotFound    one split of a config's dataset (``lab_utils.core.data``); what a
                                                dataset that is not on this machine raises (``...data.base``)
    training     train                          one run, config to checkpoint, as ``genlab train`` does it
                                                (``lab_utils.harness.run``)
    models       build_lab, load_lab, zoo       a fresh Lab from a config (``lab_utils.core.registry``); a trained
                                                one rebuilt from its run folder (``lab_utils.harness.checkpoint``);
                                                the shipped models by name, ``zoo.load("ddpm")``, ``zoo.find``,
                                                ``zoo.training_log`` (the module ``lab_utils.harness.zoo``)
    switches     smoke_mode, pretrained_mode    ``GENLAB_SMOKE=1`` runs a notebook small; ``GENLAB_PRETRAINED=1/0``
                                                loads the shipped model or trains it (``lab_utils.core.switches``)
    pictures     image_grid, to_uint8           a captioned grid of images; images as uint8 pixels
                                                (``lab_utils.core.plotting``)
    comparison   compare                        ``genlab compare`` as a function: every family, one budget, one
                                                table (``lab_utils.commands.compare``; notebook 05)
    evaluation   evaluate_lab, get_evaluator,   a model's metrics beside real-vs-real at the same count
                 choose_items, gaussian_stats,  (``lab_utils.commands.evaluation.evaluate``), the evaluator trained
                 psnr                           once per dataset and cached (``...evaluation.cache``), which real
                                                images an evaluation draws (``...evaluation.sets``), and the metric
                                                helpers on features and pixels (``lab_utils.core.metrics``;
                                                notebooks 05 and 06)

What is not here: a family's own content, the idea a notebook teaches. Its losses, its scheduler, its samplers and
its exercise checks are imported in the section that teaches them, next to their use
(``from labs.gan.exercises import check_hinge_loss``; ``from labs.diffusion import NoiseScheduler``).

``genlab`` is the applications layer (``lab_utils/__init__.py``, LAYERS): nothing in ``lab_utils`` or ``labs``
imports it. Importing it imports torch (a few seconds); ``python -m genlab <command>`` (``genlab/__main__.py``,
which ``torchrun ... -m genlab train ...`` starts) pays that, while the ``genlab`` console script
(``lab_utils.commands.cli:main``) does not import this package and refuses bad input before torch loads.
"""

from lab_utils.commands.compare import compare
from lab_utils.commands.evaluation.cache import get_evaluator
from lab_utils.commands.evaluation.evaluate import evaluate_lab
from lab_utils.commands.evaluation.sets import choose_items
from lab_utils.core.config import compose
from lab_utils.core.data import build_dataset
from lab_utils.core.data.base import DataNotFound
from lab_utils.core.metrics import gaussian_stats, psnr
from lab_utils.core.plotting import image_grid, to_uint8
from lab_utils.core.registry import build_lab
from lab_utils.core.schema import ConfigError
from lab_utils.core.switches import pretrained_mode, smoke_mode
from lab_utils.harness import zoo
from lab_utils.harness.checkpoint import load_lab
from lab_utils.harness.run import train

__all__ = [
    "ConfigError", "DataNotFound", "build_dataset", "build_lab", "choose_items", "compare", "compose", "evaluate_lab",
    "gaussian_stats", "get_evaluator", "image_grid", "load_lab", "pretrained_mode", "psnr", "smoke_mode", "to_uint8",
    "train", "zoo",
]
