"""`genlab compare` end to end on the smoke preset, and resuming an interrupted comparison."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from conftest import subprocess_env
from lab_utils.commands.compare import CompareConfig, attribute_table, compare, markdown_table
from lab_utils.commands.first_stages import train_first_stage
from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError, check_section
from lab_utils.harness.checkpoint import list_checkpoints, load_checkpoint
from lab_utils.harness.run_folder import run_finished


SWEEP = ["compare.fid_guidance=[1.0,3.0]"]  # FID of the guided families again at w = 1 (3 is their own)


@pytest.fixture(scope="module")
def smoke_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "smoke"
    done = subprocess.run([sys.executable, "-m", "lab_utils.commands.cli", "compare", "data=shapes", "preset=smoke",
                           f"out={out}", "progress=false", *SWEEP], env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # progress=false: no bar for any family's training or evaluation, nor for the evaluator's training
    bars = [line for line in done.stderr.splitlines() if re.match(r"(train|eval) \w+(: \w+)*: ", line)]
    assert bars == [], bars[:5]
    return out, done.stdout


def test_compare_writes_every_file(smoke_comparison):
    out, stdout = smoke_comparison
    for name in ("results.md", "results.json", "samples.png", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 500, name
    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == ["dcgan", "vae", "ddpm", "ldm", "flow"]
    for row in results["rows"]:
        assert row["images_seen"] >= 64  # the same image budget for every family
        assert (out / row["model"] / "eval.json").is_file()
        for key in ("fid", "kid_mean", "inception_score", "precision", "recall", "alignment_seen"):
            assert set(row["metrics"][key]) == {"generated", "real"}
        assert row["metrics"]["fid"]["real"] < row["metrics"]["fid"]["generated"]  # 8 steps: far from real
        assert row["metrics"]["clip_score"]["real"] is not None and row["clip"]["distractors"] == 99  # CLIP score
    assert "| real test images, own captions (ceiling) |" in (out / "results.md").read_text()
    nfe = {row["model"]: row["nfe_per_sample"] for row in results["rows"]}
    assert nfe["dcgan"] == nfe["vae"] == 1 and nfe["ddpm"] == nfe["ldm"] == nfe["flow"] > 1  # the same sampler settings
    assert "| ddpm |" in stdout and "| ldm |" in stdout and "| family |" in stdout  # the table is printed
    # the ldm's autoencoder stage is inside its budget, and said so; encoders report their reconstruction ceiling
    rows = {row["model"]: row for row in results["rows"]}
    stage = rows["ldm"]["stages"]["autoencoder"]
    assert stage["steps"] == 2 and 0 < stage["seconds"] <= rows["ldm"]["train_seconds"]
    assert "its autoencoder stage, 2 steps" in (out / "results.md").read_text()
    # prompts that leave attributes out: a row per family (shapes has partial caption templates)
    partial = (out / "results.md").read_text().split("Prompts that leave attributes out")[1].split("\n\n")[1]
    assert partial.startswith("| family | named attributes right | shape | colour | size | position | one object |")
    assert all(row["partial_prompts"]["templates"] == [7, 8, 9] for row in results["rows"])
    assert rows["dcgan"]["reconstruction"] is None and rows["ddpm"]["reconstruction"] is None
    for model in ("vae", "ldm"):
        ceiling = rows[model]["reconstruction"]
        assert ceiling["psnr"] > 0 and 0.0 <= ceiling["alignment_seen"] <= 1.0
    # the KID probe ran during training and is in each run's metrics
    for model in ("dcgan", "vae", "ddpm", "ldm", "flow"):
        rows = [json.loads(line) for line in (out / model / "metrics.jsonl").read_text().splitlines()]
        assert any("curve/kid" in row for row in rows)


def test_the_image_budget_buys_the_steps_results_md_states(smoke_comparison):
    """max_images counts every image a step draws, a GAN's critic batches included (smoke: n_critic 2), and the
    steps it buys per family are in results.json and results.md."""
    out, _ = smoke_comparison
    rows = {row["model"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["dcgan"]["budget_steps"] == 64 // (8 * 2) and rows["ddpm"]["budget_steps"] == 64 // 8
    for model in ("dcgan", "vae", "ddpm"):
        assert rows[model]["steps"] == rows[model]["budget_steps"], model
    # the ldm draws its scale-factor batches once, at the start of its diffusion stage: a step fewer at most
    assert rows["ldm"]["budget_steps"] - 1 <= rows["ldm"]["steps"] <= rows["ldm"]["budget_steps"]
    steps = "a GAN's critic batches included: steps dcgan 4, vae 8, ddpm 8, ldm 8, flow 8)"
    assert steps in (out / "results.md").read_text()


def test_fid_is_swept_over_guidance_for_the_guided_families_only(smoke_comparison):
    out, stdout = smoke_comparison
    rows = {row["model"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["dcgan"]["fid_guidance"] is None and rows["vae"]["fid_guidance"] is None
    for model in ("ddpm", "ldm"):
        sweep = rows[model]["fid_guidance"]
        assert sweep["guidance"] == [1.0, 3.0] and sweep["evaluated_guidance"] == 3.0
        assert sweep["fid"][1] == rows[model]["metrics"]["fid"]["generated"]  # w = 3: the table's set, reused
        assert sweep["fid"][0] != sweep["fid"][1]  # w = 1: sampled anew (no guidance: another set)
        assert sweep["best_fid"] == min(sweep["fid"]) and sweep["best_guidance"] == [1.0, 3.0][
            sweep["fid"].index(min(sweep["fid"]))]
        assert all(0.0 <= a <= 1.0 for a in sweep["alignment"])
        saved = json.loads((out / model / "eval.json").read_text())
        assert saved["fid_guidance"] == sweep and saved["nfe_per_sample"] == rows[model]["nfe_per_sample"]
    text = (out / "results.md").read_text()
    assert "FID over the guidance scale" in text and "- ddpm: FID (alignment) w=1: " in text
    assert "(the table's: w=3)" in text and "FID over the guidance scale" in stdout
    with pytest.raises(ConfigError, match=r"compare.fid_guidance must be null \(off\) or a non-empty list"):
        check_section(compose(["preset=smoke", "compare.fid_guidance=[]"], config_name="compare",
                              check=False).compare, CompareConfig, "compare")


def test_interrupted_comparison_resumes_and_finished_runs_are_reused(smoke_comparison, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(smoke_comparison[0], out)
    vae = out / "vae"
    # Make the VAE run look interrupted: its newest checkpoints and its evaluation are gone.
    last, *_ = sorted(list_checkpoints(vae), reverse=True)
    older = [p for p in list_checkpoints(vae) if p != last][-1]
    last.unlink()
    shutil.copy(older, vae / "checkpoints" / "last.pt")
    (vae / "eval.json").unlink()
    assert not run_finished(load_checkpoint(vae))
    ddpm_before = (out / "ddpm" / "checkpoints" / "last.pt").stat().st_mtime_ns

    cfg = compose(["data=shapes", "preset=smoke", f"out={out}", "reuse=true", *SWEEP],  # progress on (the default)
                  config_name="compare", check=False)
    capsys.readouterr()
    results = compare(cfg)
    bars = capsys.readouterr().err.splitlines()  # outside a terminal: a line as each bar starts and one as it ends
    assert run_finished(load_checkpoint(vae))  # resumed to the end of its budget
    # the resumed VAE's bars: its training (from where it stopped, to its total) and its evaluation's phases
    assert any(line.startswith("train vae: 100.0%") for line in bars), bars
    assert any(line.startswith("eval vae: sample: 32/32 img (100%)") for line in bars), bars
    assert any(line.startswith("eval vae: features and metrics: 3/3 set") for line in bars), bars
    assert not any(line.startswith(("train ddpm", "eval ddpm")) for line in bars)  # reused: nothing to show
    assert (vae / "eval.json").is_file()
    assert (out / "ddpm" / "checkpoints" / "last.pt").stat().st_mtime_ns == ddpm_before  # reused, not retrained
    assert results["stage_seconds"]["train ddpm"] == 0.0 and results["stage_seconds"]["eval ddpm"] == 0.0


def test_existing_comparison_needs_reuse(smoke_comparison):
    cfg = compose(["preset=smoke", f"out={smoke_comparison[0]}"], config_name="compare", check=False)
    with pytest.raises(FileExistsError, match="reuse=true"):
        compare(cfg)


def test_bad_models_and_budgets_fail_clearly(tmp_path):
    cfg = compose(["preset=smoke", f"out={tmp_path / 'x'}", "models=[dcgan,nope]"], config_name="compare",
                  check=False)
    with pytest.raises(ConfigError, match="unknown.*nope"):
        compare(cfg)
    with pytest.raises(ValueError, match="needs a budget"):
        CompareConfig()


def test_markdown_table_shows_real_reference_beside_each_metric():
    metric = {"generated": 12.5, "real": 1.25}
    row = {"model": "vae", "parameters": 1_500_000, "train_seconds": 150.0, "images_seen": 30000,
           "train_images_per_s": 200.0, "nfe_per_sample": 1, "sampling_seconds_per_image": 0.001,
           "metrics": {key: metric for key in ("fid", "kid_mean", "inception_score", "precision", "recall",
                                               "alignment_seen", "alignment_held_out")}}
    table = markdown_table([row]).splitlines()
    assert table[0].startswith("| family | params")
    assert "| vae | 1.50M | 150 | - | 30,000 | 200 | 12.5 (1.25) |" in table[2]  # no first stage: "-"
    assert table[0].endswith("| align held-out | one object | NFE | s/image |")
    assert table[2].endswith("| 12 (1.2) | - | 1 | 0.0010 |")  # no one_object measured (an older results.json)
    counted = {**row, "metrics": {**row["metrics"], "one_object": {"generated": 0.31, "real": 1.0}}}
    assert "| 12 (1.2) | 0.31 (1) | 1 |" in markdown_table([counted]).splitlines()[2]
    staged = {**row, "model": "ldm", "first_stage": {"seconds": 37.4, "steps": 600}}
    assert "| ldm | 1.50M | 150 | 37 | 30,000 | 200 | 12.5 (1.25) |" in markdown_table([staged]).splitlines()[2]
    row["alignment_per_attribute"] = {"shape": 0.904, "colour": 1.0, "position": 0.164}
    assert attribute_table([row]).splitlines() == ["| family | shape | colour | position |", "|---|---|---|---|",
                                                   "| vae | 0.9 | 1 | 0.16 |"]


def test_curve_scales_follow_the_values():
    from lab_utils.core.plotting import curve_scale

    assert curve_scale([-0.03, 0.1, 0.6]) == ("linear", {})  # KID near its floor: no log axis
    assert curve_scale([0.005, 0.3, 2.0]) == ("log", {})  # diffusion loss over training
    scale, options = curve_scale([-1800.0, -5.0, 0.01, 3.0])  # VAE nats beside GAN losses
    assert scale == "symlog" and options["linthresh"] == 0.01


def test_training_curves_keep_one_colour_per_family():
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from lab_utils.core.plotting import curves_figure, family_of

    seconds = [10.0, 20.0, 40.0, 80.0]
    curves = {  # as compare draws them: several loss curves per family, one KID curve per family
        "loss": {"vae: loss/recon": [(s, 300.0 / s) for s in seconds], "vae: loss/kl": [(s, 5.0) for s in seconds],
                 "gan: loss/generator": [(s, 1.0) for s in seconds], "gan: loss/critic": [(s, -0.5) for s in seconds]},
        "KID": {"gan": [(s, v) for s, v in zip(seconds, [0.4, 0.05, 0.004, -0.002])],  # other order than the losses
                "vae": [(s, v) for s, v in zip(seconds, [0.3, 0.1, 0.03, 0.02])]},
    }
    fig = curves_figure(curves)
    try:
        loss_axis, kid_axis = fig.axes
        colours = {ax: {line.get_label(): to_hex(line.get_color()) for line in ax.get_lines() if
                        not line.get_label().startswith("_")} for ax in (loss_axis, kid_axis)}
        for family in ("vae", "gan"):
            used = {colour for ax in colours for label, colour in colours[ax].items() if family_of(label) == family}
            assert len(used) == 1, (family, used)
        assert colours[kid_axis]["vae"] != colours[kid_axis]["gan"]
        styles = {line.get_label(): line.get_linestyle() for line in loss_axis.get_lines()}
        assert styles["gan: loss/generator"] != styles["gan: loss/critic"]  # same colour, told apart by style
        # KID below 0: a finite, non-log axis that still shows the decades (symlog)
        assert kid_axis.get_yscale() == "symlog"
        low, high = kid_axis.get_ylim()
        assert math.isfinite(low) and math.isfinite(high) and low < -0.002 and high > 0.4
    finally:
        plt.close(fig)
    fig = curves_figure(curves, colours={"gan": "#000000"})
    try:
        kid_colours = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[1].get_lines()}
        assert kid_colours["gan"] == "#000000"
    finally:
        plt.close(fig)


def test_a_first_stage_is_trained_once_cached_and_taken_by_the_compared_run(tmp_path):
    """compare.first_stages: the ldm's autoencoder is trained once outside the budget, cached by its settings,
    and the compared run starts from it (its autoencoder is the cached one, bit for bit: stage 2 freezes it)."""
    import torch

    def config(name: str):
        return compose(["data=shapes", "preset=smoke", f"out={tmp_path / name}", "progress=false", "models=[ldm]",
                       "+compare.first_stages.ldm.modules=[autoencoder]",
                       "+compare.first_stages.ldm.train=['model.autoencoder_steps=3','trainer.steps=3']",
                       "+compare.first_stages.ldm.then=['model.autoencoder_steps=0']"], config_name="compare", check=False)

    first = compare(config("one"))
    row = first["rows"][0]
    stage = row["first_stage"]
    assert stage["steps"] == 3 and stage["seconds"] > 0 and not stage["reused"] and row["stages"]["autoencoder"]["steps"] == 0
    cached = load_checkpoint(stage["checkpoint"])["model"]
    compared = load_checkpoint(tmp_path / "one" / "ldm")
    assert compared["config"]["trainer"]["init_from"] == stage["checkpoint"]
    for key, value in cached.items():
        if key.startswith("autoencoder."):
            assert torch.equal(compared["model"][key], value), key
    text = (tmp_path / "one" / "results.md").read_text()
    assert "its autoencoder was trained once, outside its budget (3 steps" in text and "first stage s" in text
    cfg = config("two")  # the same settings: the cached stage is reused, not retrained
    cfg.compare = check_section(cfg.compare, CompareConfig, "compare")
    again = train_first_stage(cfg, "ldm")
    assert again["reused"] and again["checkpoint"] == stage["checkpoint"] and again["seconds"] == stage["seconds"]
