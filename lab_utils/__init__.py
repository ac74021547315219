"""genlab's shared code, in four layers. A module imports only from its own layer or the ones below it.

    core          contracts, schemas and shared tools; imports no other layer.
                  lab (the Lab contract), schema and config (every config schema and `validate`), registry
                  (which Lab classes may be built), data (datasets and their registry), exercises (the
                  notebook check machinery), evaluation.metrics (FID, KID, IS ... on features), plotting
    harness       trains any Lab and knows no family: imports core only.
                  training (train(): a run from config to checkpoint), trainer (the loop), step_context,
                  data_stream, devices, checkpoint, run_folder (resuming), ema, distributed, progress,
                  pretrained (the shipped models: weights-only files, loaded by name)
    content       what needs a lab: the families in labs/ (each imports core only, plus the shared
                  labs.text_encoder; a lab never imports another lab, except that a composite lab imports
                  the labs it composes, listed in COMPOSITE_LABS and named in its docstring), each lab's exercises
                  (labs/<family>/exercises.py), the evaluator family (labs/evaluator) and the metric
                  exercises (evaluation.exercises)
    applications  the commands users run, on top of everything: cli, compare (and its first_stages), bench,
                  zoo (`genlab pretrained`), serve (the web service), notebooks and the evaluation application (evaluation.evaluate and .sets, evaluation.cache: train, cache and apply
                  the evaluator)

No import runs upward, none closes a circle, and an import inside a function is there for start-up speed
only (torch takes seconds to import; the CLI refuses bad input before it needs it), never to hide a circle.
``tests/test_layers.py`` walks every import of every module (function-level ones included) and holds this.
"""

# module (or package prefix) -> layer; the longest matching prefix decides. Read by tests/test_layers.py.
LAYERS: dict[str, str] = {
    "lab_utils": "core",
    "lab_utils.schema": "core",
    "lab_utils.lab": "core",
    "lab_utils.config": "core",
    "lab_utils.registry": "core",
    "lab_utils.data": "core",
    "lab_utils.exercises": "core",
    "lab_utils.evaluation.metrics": "core",
    "lab_utils.plotting": "core",
    "lab_utils.trainer": "harness",
    "lab_utils.training": "harness",
    "lab_utils.step_context": "harness",
    "lab_utils.data_stream": "harness",
    "lab_utils.devices": "harness",
    "lab_utils.checkpoint": "harness",
    "lab_utils.run_folder": "harness",
    "lab_utils.ema": "harness",
    "lab_utils.distributed": "harness",
    "lab_utils.progress": "harness",
    "lab_utils.pretrained": "harness",
    "labs": "content",
    "lab_utils.evaluation.exercises": "content",
    "lab_utils.evaluation": "applications",
    "lab_utils.cli": "applications",
    "lab_utils.compare": "applications",
    "lab_utils.first_stages": "applications",
    "lab_utils.bench": "applications",
    "lab_utils.notebooks": "applications",
    "lab_utils.grading": "applications",
    "lab_utils.grade_runner": "applications",
    "lab_utils.sandbox": "applications",
    "lab_utils.zoo": "applications",
    "lab_utils.serve": "applications",
    "genlab": "applications",
}
ORDER = ("core", "harness", "content", "applications")  # bottom to top
# composite lab -> the labs it is built from (and so may import); read by tests/test_layers.py
COMPOSITE_LABS: dict[str, tuple[str, ...]] = {"labs.latent_diffusion": ("labs.diffusion", "labs.vae"),
                                               "labs.flow": ("labs.diffusion",)}
