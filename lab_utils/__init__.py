"""genlab's shared code, in layers that are its folders. A module imports only from its own layer or the ones below.

    lab_utils/core/       contracts, schemas and shared tools; imports no other layer: the Lab contract (lab),
                          the config schemas and ``compose`` (schema, config), which Lab classes may be built and
                          how (registry), the datasets (data/), the metrics on features (metrics), image grids
                          (plotting), the notebook switches (switches: GENLAB_SMOKE ...) and the exercise check
                          machinery, one module per job (exercises/), and where genlab caches what it makes
                          once (cache_folder)
    lab_utils/harness/    trains any Lab and knows no family: one run from config to checkpoint (run), the loop
                          (trainer, step_context, data_stream, ema, distributed, progress), devices, checkpoints
                          and run folders, runs trained once and then cached (cached_run), and the shipped models
                          loaded by name (zoo)
    labs/                 the content: the model families, each importing the core only, plus the shared
                          ``labs.text_encoder``; a lab never imports another lab, except that a composite lab
                          imports the labs it composes (COMPOSITE_LABS, named in its docstring). Each family's
                          graded exercises sit beside it (labs/<family>/exercises.py; the metric exercises beside
                          the evaluator, labs/evaluator/exercises.py)
    lab_utils/commands/   what users run, on top of everything: the ``genlab`` command (cli) and each command
                          it dispatches to (sample, data, compare and its first_stages, bench, pretrained, notebooks,
                          grading, serve/, evaluation/: train, cache and apply the evaluator), and the arguments
                          they share (arguments)
    genlab/               the door for a notebook (``from genlab import ...``) and ``python -m genlab``

No import runs upward (Python runs every parent package of a module it imports: those count), none closes a
circle, and an import inside a function is there for start-up speed only (torch takes seconds to import; the CLI
refuses bad input before it needs it), never to hide a circle. ``tests/test_layers.py`` holds this for every
import of every module, function-level ones included, and checks that importing a lab loads no command.
"""

# package -> layer, bottom to top; the longest matching prefix decides. Read by tests/test_layers.py.
LAYERS: dict[str, str] = {
    "lab_utils": "core",  # this file: the rule, nothing to import
    "lab_utils.core": "core",
    "lab_utils.harness": "harness",
    "labs": "content",
    "lab_utils.commands": "applications",
    "genlab": "applications",
}
ORDER = ("core", "harness", "content", "applications")  # bottom to top
# composite lab -> the labs it is built from (and so may import); read by tests/test_layers.py
COMPOSITE_LABS: dict[str, tuple[str, ...]] = {"labs.latent_diffusion": ("labs.diffusion", "labs.vae"),
                                               "labs.flow": ("labs.diffusion",)}
