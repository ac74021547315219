"""``genlab compare``: every family on the same data, budget and metrics, in one table and one picture.

For each family in ``models``: train with the preset's matched budget (``compare.max_seconds`` of
training time or ``compare.max_images`` images drawn, whichever the preset sets) while a callback
measures KID on a small sample at evenly spaced training times; then evaluate with the same
settings for every family (``lab_utils.commands.evaluation``). Every family samples with its model's own
defaults (``Lab.SampleOptions``: e.g. ``model.sampling`` of the DDPM, DDIM-25 on ``preset=cpu``), the
same as its training grids, ``genlab sample`` and ``genlab eval``. Writes into ``out``:

    results.json, results.md   one row per family: size, budget spent, speed, metrics beside real data (the CLIP
                               score and R-precision too, with the real images' ceiling and mismatched floor rows)
    samples.png                the same prompts (rows) and seeds (columns) for every family
    curves.png                 training losses and KID against training time
    <family>/                  each family's run directory (config, checkpoints, metrics, eval.json)

An interrupted comparison continues where it stopped with ``reuse=true out=<dir>``: finished
runs and evaluations are reused, an unfinished run is resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lab_utils.commands.first_stages import FirstStage, train_first_stage
from lab_utils.core.registry import MEASURING_FAMILIES
from lab_utils.core.schema import ConfigError, check_section
from lab_utils.harness.cached_run import child_config
from lab_utils.harness.run_folder import run_finished

log = logging.getLogger("genlab.compare")


@dataclass
class CompareConfig:
    """``cfg.compare``, set by each preset (``conf/preset/*.yaml``)."""

    max_seconds: Optional[float] = None  # training time per family (the cpu budget: wall-clock binds on a laptop)
    # images drawn per family (the gpu budget: reproducible across machines): every real image a step reads, a GAN's
    # critic batches included, so it buys max_images / (batch x Lab.batches_per_step()) steps (results.md says how many)
    max_images: Optional[int] = None
    curve_seconds: float = 30.0  # KID probe every this many seconds of training
    curve_samples: int = 200  # images per KID probe (real and generated)
    eval_samples: int = 1000  # images per set in the final evaluation
    eval_batch_size: int = 250
    evaluator_preset: str = "cpu"
    num_prompts: int = 6  # rows of samples.png (the dataset's fixed prompts)
    seeds: int = 4  # columns per family in samples.png
    # FID of each guided family (diffusion) again at each of these guidance scales, reported with the one that
    # minimises it; every other metric stays at the family's own guidance (null: off)
    fid_guidance: Optional[list[float]] = None
    # families whose first stage is trained once, outside the budget, and cached (results.md shows its time)
    first_stages: dict[str, FirstStage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_seconds is None and self.max_images is None:
            raise ValueError("compare needs a budget: compare.max_seconds or compare.max_images")
        for name in ("curve_seconds", "curve_samples", "eval_samples", "eval_batch_size", "num_prompts", "seeds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"compare.{name} must be positive, got {getattr(self, name)}")
        if self.curve_samples < 4:
            raise ValueError("compare.curve_samples must be at least 4 (KID needs pairs)")
        from lab_utils.commands.evaluation.evaluate import check_guidance_sweep

        check_guidance_sweep(self.fid_guidance, "compare.fid_guidance")


# ------------------------------------------------------------------------------------ training
def family_config(cfg: DictConfig, model: str, run_dir: Path, first_stage: Optional[dict] = None) -> DictConfig:
    """The family's training config (``child_config``): its own preset values, the comparison's data and budget
    (and, for a family with a cached first stage, the overrides that start it from that stage)."""
    budget = cfg.compare
    trainer = {"max_seconds": budget.max_seconds, "max_images": budget.max_images,
               "steps": 10**9,  # the budget binds, not the family's step count
               "progress": cfg.get("progress", True),
               "device": cfg.device}  # `genlab compare device=cuda:1` trains there too, not only evaluates
    then = []
    if first_stage is not None:
        spec = cfg.compare.first_stages[model]
        then = list(spec.then)
        trainer |= {"init_from": first_stage["checkpoint"], "init_modules": list(spec.modules)}
    return child_config([f"model={model}", f"data={cfg.data.name}", f"preset={cfg.preset_name}", f"seed={cfg.seed}",
                         *then],
                        {"data": cfg.data,  # exactly the same data (and overrides) for every family
                         "out": str(run_dir), "trainer": trainer})


def kid_probe(cfg: DictConfig, evaluator):
    """A callback that measures KID of ``curve_samples`` generated images against as many real ones."""
    from lab_utils.commands.evaluation import choose_items, kid, real_images
    from lab_utils.commands.evaluation.evaluate import generate
    from lab_utils.core.data import build_dataset

    n = cfg.compare.curve_samples
    train_set, test_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    reference = evaluator.embed(real_images(train_set, choose_items(n, len(train_set), cfg.seed)))
    test_idx = choose_items(n, len(test_set), cfg.seed + 1)
    prompts = [test_set.describe(labels, template=0) for labels in test_set.labels[test_idx]]

    def probe(trainer) -> dict[str, float]:
        with trainer.sampling_weights() as lab:
            images, _ = generate(lab, prompts, cfg.seed, cfg.compare.eval_batch_size, {}, trainer.device,
                                 trainer.sampling_precision)
        fake = evaluator.embed(images)
        kid_mean, _ = kid(reference.features, fake.features, subset_size=min(n, 100), subsets=20, seed=cfg.seed)
        return {"curve/kid": kid_mean}

    return probe


def train_family(cfg: DictConfig, model: str, evaluator, out_dir: Path,
                 first_stage: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint
    from lab_utils.harness.run import train
    from lab_utils.harness.run_folder import Resume, resume_source
    from lab_utils.harness.trainer import Callback

    run_dir = out_dir / model
    family = family_config(cfg, model, run_dir, first_stage)
    state = None
    if (run_dir / "checkpoints" / "last.pt").exists():
        try:
            state = load_checkpoint(run_dir)
        except CheckpointError as err:
            raise ConfigError(f"cannot reuse {run_dir}: {err}") from None
    started = time.perf_counter()
    if state is not None and run_finished(state):
        log.info("%s: reusing the finished run %s", model, run_dir)
        return {"run_dir": run_dir, "wall_seconds": 0.0, "reused": True}
    probe = kid_probe(cfg, evaluator)
    callbacks = (Callback(probe, every_seconds=cfg.compare.curve_seconds),)
    if state is not None:
        log.info("%s: resuming %s at step %d", model, run_dir, state["trainer"]["step"])
    resume = Resume(resume_source(run_dir), state) if state is not None else None  # the checkpoint read above
    train(family, resume=resume, callbacks=callbacks)
    return {"run_dir": run_dir, "wall_seconds": time.perf_counter() - started, "reused": False}


# ------------------------------------------------------------------------------------ evaluation
def evaluate_family(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], float]:
    from lab_utils.commands.evaluation import evaluate_run
    from lab_utils.commands.evaluation.sets import takes_guidance
    from lab_utils.core.registry import lab_class
    from lab_utils.harness.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir)
    step = state["trainer"]["step"]
    settings = {"num_samples": cfg.compare.eval_samples, "seed": cfg.seed, "batch_size": cfg.compare.eval_batch_size,
                "evaluator_preset": cfg.compare.evaluator_preset, "device": cfg.device,
                "progress": cfg.get("progress", True)}  # the evaluation's bars, as the training's
    if cfg.compare.fid_guidance and takes_guidance(lab_class(state["config"]["model"].get("_target_"))):
        settings["fid_guidance"] = list(cfg.compare.fid_guidance)  # the guided families (diffusion)
    path = run_dir / "eval.json"
    if cfg.reuse and path.exists():
        previous = json.loads(path.read_text())
        if ((previous.get("step"), previous.get("num_samples"), previous.get("seed"),
             (previous.get("fid_guidance") or {}).get("guidance"), "clip_score" in previous.get("generated", {}))
                == (step, settings["num_samples"], cfg.seed, settings.get("fid_guidance"), True)):
            return previous, 0.0
    started = time.perf_counter()
    result = evaluate_run(run_dir, settings)
    return result, time.perf_counter() - started


# ------------------------------------------------------------------------------------ figures and table
@torch.no_grad()
def sample_block(lab, prompts: list[str], seeds: int, device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """(P, S, C, H, W): column s uses a generator seeded with s, the same for every family; sampled under the
    autocast of ``precision`` (an effective one, as evaluation's)."""
    from lab_utils.harness.devices import autocast_for

    columns = []
    for seed in range(seeds):
        generator = torch.Generator(device=device).manual_seed(seed)
        with autocast_for(precision, device):
            columns.append(lab.sample(prompts, generator=generator).float().cpu())
    return torch.stack(columns, dim=1)


def read_curves(run_dir: Path, model: str) -> dict[str, list[tuple[float, float]]]:
    """Loss curves (``model: key``) and the KID probe from a run's metrics.jsonl, against training time."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith(("loss/", "curve/")) and value is not None:
                curves.setdefault(f"{model}: {key}", []).append((row["train_seconds"], value))
    return curves


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def all_correct(alignment: dict[str, Any], split: str) -> Optional[float]:
    """All-attributes-correct accuracy on seen or held-out prompts (every prompt is 'seen' without held-out ones)."""
    part = alignment.get(split)
    if part is None:
        return alignment["all"] if split == "seen" else None
    return part["all"]


def results_row(model: str, state: dict[str, Any], evaluation: dict[str, Any], n_params: int) -> dict[str, Any]:
    counters = state["trainer"]
    generated, real = evaluation["generated"], evaluation["real_held_out"]
    metrics = {}
    for key in ("fid", "kid_mean", "inception_score", "precision", "recall"):
        metrics[key] = {"generated": generated[key], "real": real[key]}
    for split in ("seen", "held_out"):
        metrics[f"alignment_{split}"] = {"generated": all_correct(generated["alignment"], split),
                                         "real": all_correct(real["alignment"], split)}
    # the share of images that show exactly one object (absent from evaluations made before it was measured)
    metrics["one_object"] = {"generated": generated.get("one_object"), "real": real.get("one_object")}
    # how well each image matches its prompt through the CLIP scorer (labs.clip.score): the same prompts, images and
    # distractors for every family; the real images with their own captions are the ceiling
    for key in ("clip_score", "r_precision", "r_precision_hard"):
        metrics[key] = {"generated": generated.get(key), "real": real.get(key)}
    return {
        "model": model, "parameters": n_params, "steps": counters["step"],
        "train_seconds": counters["train_seconds"], "images_seen": counters["images_seen"],
        "train_images_per_s": counters["images_seen"] / max(counters["train_seconds"], 1e-9),
        "nfe_per_sample": evaluation["nfe_per_sample"],
        "sampling_seconds_per_image": evaluation["sampling_seconds_per_image"],
        "metrics": metrics,
        # FID at each scale of compare.fid_guidance and the lowest (guided families; None otherwise)
        "fid_guidance": evaluation.get("fid_guidance"),
        # per attribute the prompts name (all prompts): what "all correct" hides
        "alignment_per_attribute": dict(generated["alignment"].get("per_attribute", {})),
        # prompts that leave attributes out ("a red circle"): named attributes right, one object (None: none)
        "partial_prompts": evaluation.get("partial_prompts"),
        # the CLIP scorer, the distractors per image, chance, and the real images' figures against other items'
        # prompts (mismatched: the floor); None: not measured
        "clip": evaluation.get("clip"),
        # a family that encodes and decodes: its reconstructions of the real images, the ceiling of its decoder
        "reconstruction": None if not evaluation.get("reconstruction") else {
            "psnr": evaluation["reconstruction"]["psnr"], "fid": evaluation["reconstruction"]["fid"],
            "alignment_seen": all_correct(evaluation["reconstruction"]["alignment"], "seen")},
    }


def budget_steps(budget: CompareConfig | DictConfig, batch_size: int, lab: Any) -> Optional[int]:
    """The steps an image budget buys a family: ``max_images`` over the images one step draws (its batch times
    ``lab.batches_per_step()``: a GAN's ``n_critic``); None for a time budget only."""
    if budget.max_images is None:
        return None
    return math.ceil(budget.max_images / (batch_size * lab.batches_per_step()))


def stage_times(lab: Any, run_dir: Path) -> dict[str, dict[str, float]]:
    """A family trained in stages (``lab.stages()``: name -> the step it ends at, e.g. the ldm's autoencoder):
    each stage's steps and training seconds, read from the run's metrics (all inside the family's budget)."""
    ends = lab.stages()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if ends else []
    times = {}
    for name, end in ends.items():
        seconds = [row["train_seconds"] for row in rows if row.get("step", 0) <= end and "train_seconds" in row]
        times[name] = {"steps": end, "seconds": max(seconds, default=0.0)}
    return times


def stage_text(rows: list[dict[str, Any]]) -> str:
    """What of each family's budget went to an earlier stage (included in its training time)."""
    lines = [f"- {row['model']}: its {name} stage, {t['steps']:.0f} steps in {t['seconds']:.0f} s of its "
             f"{row['train_seconds']:.0f} s, is part of its budget"
             for row in rows for name, t in row.get("stages", {}).items() if t["steps"] > 0]
    lines += [f"- {row['model']}: its {', '.join(first['modules'])} was trained once, outside its budget ("
              f"{first['steps']} steps, {first['seconds']:.0f} s, the \"first stage s\" column), "
              f"{'reused from' if first['reused'] else 'cached in'} {Path(first['checkpoint']).parent.parent}"
              for row in rows if (first := row.get("first_stage"))]
    ceilings = [f"- {row['model']}: reconstructions of real test images (its decoder's ceiling) PSNR "
                f"{row['reconstruction']['psnr']:.1f} dB, FID {row['reconstruction']['fid']:.2f}, all-attributes "
                f"alignment {row['reconstruction']['alignment_seen']:.2f}" for row in rows if row.get("reconstruction")]
    return "\n".join(lines + ceilings)


# the prompt-following metrics side by side: CLIP score and R-precision (any dataset), then attribute alignment
COLUMNS = [("FID", "fid", 3), ("KID", "kid_mean", 2), ("IS", "inception_score", 3), ("precision", "precision", 2),
           ("recall", "recall", 2), ("CLIP score", "clip_score", 3), ("R-precision", "r_precision", 2),
           ("align seen", "alignment_seen", 2), ("align held-out", "alignment_held_out", 2), ("one object", "one_object", 2)]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ["family", "params", "train s", "first stage s", "images", "img/s", *[c[0] for c in COLUMNS], "NFE",
            "s/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        first = row.get("first_stage")
        cells = [row["model"], f"{row['parameters'] / 1e6:.2f}M", f"{row['train_seconds']:.0f}",
                 f"{first['seconds']:.0f}" if first else "-", f"{row['images_seen']:,}",
                 f"{row['train_images_per_s']:.0f}"]
        for _, key, digits in COLUMNS:
            metric = row["metrics"].get(key)  # None: a results.json from before the metric was measured
            cells.append("-" if metric is None or metric["generated"] is None else
                         f"{fmt(metric['generated'], digits)} ({fmt(metric['real'], digits)})")
        cells += [str(row["nfe_per_sample"]), f"{row['sampling_seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole comparison described by ``cfg`` (composed ``conf/compare.yaml``); returns results.json's content."""
    from lab_utils.commands.evaluation import get_clip_scorer, get_evaluator
    from lab_utils.commands.evaluation.clip_scorer import scorer_description
    from lab_utils.core.plotting import comparison_grid, training_curves
    from lab_utils.harness.checkpoint import load_lab
    from lab_utils.harness.devices import pick_device

    stages: dict[str, float] = {}
    started = time.perf_counter()
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.compare = check_section(cfg.get("compare") or {}, CompareConfig, "compare")
    models = list(cfg.models)
    available = sorted(p.stem for p in Path(compose_root()).glob("model/*.yaml") if p.stem not in MEASURING_FAMILIES)
    unknown = [m for m in models if m not in available]
    if not models or unknown:
        raise ConfigError(f"models={models}: {'unknown ' + str(unknown) if unknown else 'empty'}; choose from {available}")
    out_dir = Path(cfg.out)
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.reuse:
        raise FileExistsError(f"{out_dir} already holds a comparison; pass reuse=true to reuse and resume its runs, "
                              "or choose another out=<folder>")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)

    tick = time.perf_counter()
    quiet = [] if cfg.get("progress", True) else ["trainer.progress=false"]  # (not part of the evaluator's key)
    evaluator = get_evaluator(cfg.data, quiet, preset=cfg.compare.evaluator_preset, device=device)
    stages["evaluator"] = time.perf_counter() - tick
    tick = time.perf_counter()  # the CLIP scorer: shipped (shapes), cached, or trained here once (evaluations reuse it)
    scorer = get_clip_scorer(cfg.data, quiet, preset=cfg.compare.evaluator_preset, device=device)
    stages["clip scorer"] = time.perf_counter() - tick

    rows, curves, blocks = [], {"loss": {}, "KID": {}}, {}
    prompts = None
    for model in models:
        first_stage = train_first_stage(cfg, model)
        if first_stage is not None:
            stages[f"first stage {model}"] = first_stage["wall_seconds"]
        trained = train_family(cfg, model, evaluator, out_dir, first_stage)
        stages[f"train {model}"] = trained["wall_seconds"]
        evaluation, seconds = evaluate_family(cfg, trained["run_dir"])
        stages[f"eval {model}"] = seconds
        tick = time.perf_counter()
        loaded = load_lab(trained["run_dir"], device=device)
        prompts = prompts or list(loaded.lab.data_info.prompts[: cfg.compare.num_prompts])
        state = loaded.state
        blocks[model] = sample_block(loaded.lab, prompts, cfg.compare.seeds, device,
                                     evaluation.get("sample_precision", "fp32"))
        n_params = sum(p.numel() for p in loaded.lab.parameters())
        rows.append(results_row(model, state, evaluation, n_params))
        rows[-1]["stages"] = stage_times(loaded.lab, trained["run_dir"])
        rows[-1]["budget_steps"] = budget_steps(cfg.compare, loaded.cfg.trainer.batch_size, loaded.lab)
        rows[-1]["first_stage"] = first_stage
        for name, points in read_curves(trained["run_dir"], model).items():
            curves["KID" if "curve/kid" in name else "loss"][name.replace(": curve/kid", "")] = points
        stages[f"figures {model}"] = time.perf_counter() - tick

    title = f"{cfg.data.name}, preset {cfg.preset_name}"
    comparison_grid(blocks, prompts, out_dir / "samples.png", title=f"{title}: same prompts and seeds")
    training_curves(curves, out_dir / "curves.png", title=title)
    stages["total"] = time.perf_counter() - started
    evaluation_settings = {"num_samples": cfg.compare.eval_samples, "seed": cfg.seed}
    results = {"data": cfg.data.name, "preset": cfg.preset_name, "budget": OmegaConf.to_container(cfg.compare),
               "evaluation": evaluation_settings, "evaluator": {"key": evaluator.key,
                                                                "test_accuracy": evaluator.test_accuracy},
               "clip_scorer": scorer_description(scorer),
               "rows": rows, "stage_seconds": stages}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table, attributes, stages_and_ceilings = markdown_table(rows), attribute_table(rows), stage_text(rows)
    partial, prompt_match = partial_table(rows), prompt_match_table(rows)
    guidance = guidance_text(rows)
    (out_dir / "results.md").write_text(
        f"# genlab compare: {title}\n\nBudget per family: {budget_text(cfg.compare, rows)}. "
        f"Each metric: generated (real held-out images at the same count: the floor for FID/KID, the ceiling "
        f"for IS, precision, recall, CLIP score, R-precision and alignment). {cfg.compare.eval_samples} images per "
        f"set. KID is the mean over subsets. CLIP score: the mean cosine of image and prompt embeddings; R-precision: "
        f"the share of images whose prompt ranks first among it and its distractors (the CLIP scorer's; table below). "
        f"Alignment: share of images whose every prompted attribute the evaluator recovers.\n\n"
        f"{table}\n\n"
        + (f"Alignment per attribute (share of images showing each attribute their prompt names; real images "
           f"score ~1, chance is 1 / the number of values):\n\n{attributes}\n\n" if attributes else "")
        + (f"Prompt match through the CLIP scorer (labs/clip, trained from scratch on {cfg.data.name}; "
           f"{prompt_match_note(rows)}):\n\n{prompt_match}\n\n" if prompt_match else "")
        + (f"Prompts that leave attributes out (\"a red circle\": the dataset's partial caption templates; the "
           f"share with every named attribute right, per attribute, and the share of images showing one object, "
           f"where real images show one):\n\n{partial}\n\n" if partial else "")
        + (f"Stages and ceilings:\n\n{stages_and_ceilings}\n\n" if stages_and_ceilings else "")
        + (f"FID over the guidance scale (the table's metrics are at each family's own guidance; FID is "
           f"usually lowest at a smaller one, alignment highest at a larger one):\n\n{guidance}\n\n"
           if guidance else "")
        + "![samples](samples.png)\n\n![curves](curves.png)\n")
    print(table)
    if attributes:
        print("\nalignment per attribute:\n" + attributes)
    if prompt_match:
        print("\nprompt match (CLIP score, R-precision):\n" + prompt_match)
    if partial:
        print("\nprompts that leave attributes out:\n" + partial)
    if stages_and_ceilings:
        print("\n" + stages_and_ceilings)
    if guidance:
        print("\nFID over the guidance scale:\n" + guidance)
    print(f"wrote {out_dir / 'results.md'}, results.json, samples.png, curves.png")
    print("stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    return results


def guidance_text(rows: list[dict[str, Any]]) -> str:
    """One line per guided family: FID (and all-attributes alignment) at each swept scale, and the lowest FID."""
    lines = []
    for row in rows:
        sweep = row.get("fid_guidance")
        if not sweep:
            continue
        points = ", ".join(f"w={w:g}: {fmt(f, 3)} ({fmt(a, 2)})"
                           for w, f, a in zip(sweep["guidance"], sweep["fid"], sweep["alignment"]))
        lines.append(f"- {row['model']}: FID (alignment) {points}; lowest FID {fmt(sweep['best_fid'], 3)} at "
                     f"w={sweep['best_guidance']:g} (the table's: w={sweep['evaluated_guidance']:g})")
    return "\n".join(lines)


def attribute_table(rows: list[dict[str, Any]]) -> str:
    """Prompt alignment per attribute: the share of images showing each attribute the prompt named."""
    names = list(dict.fromkeys(name for row in rows for name in row.get("alignment_per_attribute", {})))
    if not names:
        return ""
    lines = ["| family | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for row in rows:
        values = row.get("alignment_per_attribute", {})
        lines.append(f"| {row['model']} | " + " | ".join(fmt(values.get(name), 2) for name in names) + " |")
    return "\n".join(lines)


def prompt_match_table(rows: list[dict[str, Any]]) -> str:
    """The CLIP score and R-precision of each family, then the real test images with their own captions (the
    ceiling) and with other items' captions (mismatched: the floor) and chance, read by one scorer on the same prompts
    and distractors (the rows' real figures are one set's: the first family's are shown)."""
    measured = [row for row in rows if row.get("clip") and row["metrics"].get("clip_score", {}).get("generated")
                is not None]
    if not measured:
        return ""
    lines = ["| images | CLIP score (mean cosine) | R-precision | R-precision, hard negatives |", "|---|---|---|---|"]
    for row in measured:
        metric = row["metrics"]
        lines.append(f"| {row['model']} | {fmt(metric['clip_score']['generated'], 3)} | "
                     f"{fmt(metric['r_precision']['generated'], 2)} | {fmt(metric['r_precision_hard']['generated'], 2)} |")
    first, clip = measured[0]["metrics"], measured[0]["clip"]
    lines.append(f"| real test images, own captions (ceiling) | {fmt(first['clip_score']['real'], 3)} | "
                 f"{fmt(first['r_precision']['real'], 2)} | {fmt(first['r_precision_hard']['real'], 2)} |")
    floor = clip.get("mismatched")
    if floor:
        lines.append(f"| real test images, other items' captions (floor) | {fmt(floor['clip_score'], 3)} | "
                     f"{fmt(floor['r_precision'], 2)} | {fmt(floor['r_precision_hard'], 2)} |")
    lines.append(f"| chance | - | {fmt(clip['chance'], 2)} | {fmt(clip['chance_hard'], 2)} |")
    return "\n".join(lines)


def prompt_match_note(rows: list[dict[str, Any]]) -> str:
    """What the prompt-match table's columns are, with the scorer's distractor counts and key."""
    clip = next(row["clip"] for row in rows if row.get("clip"))
    zero_shot = (clip.get("scorer") or {}).get("zero_shot") or {}
    reads = ", ".join(f"{name} {value:.2f}" for name, value in zero_shot.items())
    return (f"the mean cosine of each image's embedding with its prompt's; R-precision, the share of images whose "
            f"prompt ranks first among it and {clip['distractors']} distractors, its {clip['hard_negatives']} hard "
            f"negatives (its caption with one attribute changed) first, then random other captions; the same prompts "
            f"and distractors for every row; scorer {(clip.get('scorer') or {}).get('key')}"
            + (f", zero-shot on real test images {reads}" if reads else ""))


def partial_table(rows: list[dict[str, Any]]) -> str:
    """Per family, for prompts that leave attributes out: every named attribute right, each attribute, one object."""
    measured = [row for row in rows if row.get("partial_prompts")]
    if not measured:
        return ""
    names = list(dict.fromkeys(name for row in measured for name, value in
                               row["partial_prompts"]["per_attribute"].items() if value is not None))
    lines = ["| family | named attributes right | " + " | ".join(names) + " | one object |",
             "|" + "---|" * (len(names) + 3)]
    for row in measured:
        part = row["partial_prompts"]
        lines.append(f"| {row['model']} | {fmt(part['all'], 2)} | "
                     + " | ".join(fmt(part["per_attribute"].get(name), 2) for name in names)
                     + f" | {fmt(part['one_object'], 2)} |")
    return "\n".join(lines)


def budget_text(budget: DictConfig, rows: list[dict[str, Any]] = ()) -> str:
    parts = []
    if budget.max_seconds is not None:
        parts.append(f"{budget.max_seconds:g} s of training")
    if budget.max_images is not None:
        steps = ", ".join(f"{row['model']} {row['budget_steps']:,}" for row in rows if row.get("budget_steps"))
        parts.append(f"{budget.max_images:,} training images (every real image a step draws, a GAN's critic "
                     f"batches included{': steps ' + steps if steps else ''})")
    return " or ".join(parts) + " (whichever comes first)" if len(parts) > 1 else parts[0]


def compose_root() -> Path:
    """The folder of the installed configs (``conf/`` in a checkout)."""
    import genlab_conf

    return Path(genlab_conf.__file__).parent
