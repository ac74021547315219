"""`genlab bench` and the trainer's speed switches: figures that are consistent with each other,
a FLOP count that matches a hand count, switches that change speed but not the numbers."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from torch import nn

from conftest import GENLAB, subprocess_env
from lab_utils.commands.bench import bench, count_step_flops, matmul_peak, table
from lab_utils.core.config import compose
from lab_utils.core.lab import DataInfo, Lab
from lab_utils.core.schema import ConfigError
from lab_utils.harness.run import trainer_settings
from lab_utils.harness.trainer import Trainer

QUICK = ["preset=smoke", "bench.steps=2", "bench.warmup_steps=1", "bench.sample_batch=2"]


def bench_config(model: str, *extra: str):
    return compose([f"model={model}", "data=shapes", *QUICK, *extra], config_name="bench", check=False)


@pytest.mark.parametrize("model", ["dcgan", "vae", "ddpm", "ldm", "flow"])
def test_bench_runs_for_every_family_with_consistent_figures(model):
    result = bench(bench_config(model))
    rows = {row["variant"]: row for row in result["variants"]}
    expected = ["eager_fp32", "preset", "bf16", "channels_last"] if not torch.cuda.is_available() else list(rows)
    assert list(rows) == expected and not any("error" in row for row in rows.values())
    assert rows["eager_fp32"]["speedup"] == 1.0
    assert result["flops_per_step"] > 0 and result["parameters"] > 0
    for row in rows.values():
        assert row["images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["images_per_s"] / rows["eager_fp32"]["images_per_s"])
        assert row["achieved_flops"] == pytest.approx(result["flops_per_step"] * row["steps_per_s"])
        assert 0 < row["fraction_of_peak"] < 1  # nothing beats the device's own matmul peak
        assert row["peak_memory_mb"] > 0
    samplers = {row["sampler"]: row for row in result["sampling"]}
    if model in ("ddpm", "ldm"):  # per sampler and step count; guidance doubles the network evaluations
        assert set(samplers) == {"ddim-50", "ddpm-50"}  # the smoke preset has T = 50
        assert samplers["ddim-50"]["nfe_per_image"] == 100
    elif model == "flow":  # Euler and Heun at the same evaluations (Heun: 2 per step but the last), x2 with guidance
        assert set(samplers) == {"euler-25", "heun-13"}
        assert samplers["euler-25"]["nfe_per_image"] == samplers["heun-13"]["nfe_per_image"] == 50
    else:
        assert set(samplers) == {"default"} and samplers["default"]["nfe_per_image"] == 1
    for row in samplers.values():
        assert row["seconds_per_image"] == pytest.approx(1 / row["images_per_s"])
    text = table(result)
    assert all(name in text for name in rows) and "of peak" in text


def test_bench_command_writes_json_and_table(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [*GENLAB, "bench", "model=vae", "data=shapes", *QUICK, f"out={out}",
         "bench.variants=[eager_fp32]"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "bench.json").read_text())
    assert [row["variant"] for row in saved["variants"]] == ["eager_fp32"]
    assert saved["model"] == "vae" and saved["config"]["trainer"]["batch_size"] == saved["batch_size"]
    assert "| eager_fp32 |" in result.stdout and (out / "bench.md").exists()


def test_bench_rejects_unknown_variants():
    with pytest.raises(ConfigError, match=r"bench.variants \['turbo'\] are unknown"):
        bench(bench_config("vae", "bench.variants=[turbo]"))


class LinearLab(Lab):
    """y = w . x: one matmul forward, one for the weight gradient (the input needs none)."""

    Config = dict

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        pixels = data_info.channels * data_info.image_size**2
        self.linear = nn.Linear(pixels, 1, bias=False)

    def configure_optimizers(self):
        return {"model": torch.optim.SGD(self.parameters(), lr=0.1)}

    def training_step(self, batch, ctx):
        x = batch["image"].flatten(1)  # (B, P)
        loss = ctx.optimize("model", lambda: (self.linear(x) - 1).pow(2).mean())
        return {"loss": loss.detach()}


def test_flop_count_of_a_step_matches_the_hand_count(tmp_path):
    cfg = compose(["model=vae", "data=shapes", "preset=smoke", "data.subset=32", "trainer.batch_size=8",
                   "trainer.ema_decay=0"])
    info = DataInfo("shapes", 3, 32, {}, ["[PAD]", "[UNK]", "[CLS]"])
    dataset = [{"image": torch.randn(3, 32, 32), "caption": "x"} for _ in range(16)]
    lab = LinearLab({}, info)
    trainer = Trainer(cfg, trainer_settings(cfg), tmp_path, lab, dataset, info, torch.device("cpu"))
    flops, images = count_step_flops(trainer)
    P = 3 * 32 * 32
    assert images == 8
    assert flops == 2 * 8 * P * 1 * 2  # forward (B, P) @ (P, 1): 2BP; weight gradient (P, B) @ (B, 1): 2BP


def test_matmul_peak_is_a_rate_of_this_machine():
    small, large = matmul_peak(torch.device("cpu"), "fp32", 64, 0.05), matmul_peak(torch.device("cpu"), "fp32", 512, 0.2)
    assert 1e6 < small and 1e8 < large < 1e14  # between a very slow machine and far beyond any CPU


def test_channels_last_changes_the_layout_not_the_numbers(tmp_path):
    from lab_utils.core.data import build_dataset
    from lab_utils.core.registry import build_lab
    from lab_utils.harness.devices import speed_setup

    cfg = compose(["model=ddpm", "data=shapes", "preset=smoke", "trainer.channels_last=true"])
    train_set = build_dataset(cfg.data, "train")
    info = train_set.data_info()
    plain = build_lab(cfg, info).eval()
    nhwc = build_lab(cfg, info)
    nhwc.load_state_dict(plain.state_dict())
    nhwc = speed_setup(nhwc, cfg, torch.device("cpu")).eval()
    conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    xt, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 30, 49])
    prompts = ["a red circle", "a small blue square", "", "a large green triangle at the top"]
    with torch.no_grad():
        expected = plain(xt, t, prompts)
        got = nhwc(xt.contiguous(memory_format=torch.channels_last), t, prompts)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # the same function, another layout
    trainer = Trainer(cfg, trainer_settings(cfg), tmp_path, nhwc.train(), train_set, info, torch.device("cpu"))
    losses = [trainer.run_step()[0]["loss/loss"].item() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # the optimiser kept the layout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["dcgan", "ddpm"])
def test_every_speed_switch_runs_on_cuda(model):
    result = bench(bench_config(model, "trainer.device=cuda"))
    rows = {row["variant"]: row for row in result["variants"]}
    assert set(rows) == {"eager_fp32", "preset", "bf16", "fp16", "tf32", "channels_last", "compile"}
    failed = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not failed, failed  # the GAN compiles its generator and text encoder, its critic stays eager
    assert result["peak_flops"]["bf16"] > result["peak_flops"]["fp32"]


def compiled_children(lab) -> set[str]:
    return {name for name, child in lab.named_children() if getattr(child, "_compiled_call_impl", None) is not None}


def test_the_gan_compiles_all_but_a_critic_it_differentiates_twice():
    from lab_utils.core.registry import build_lab
    from lab_utils.harness.devices import speed_setup

    info = DataInfo("shapes", 3, 32, {}, ["[PAD]", "[UNK]", "[CLS]", "red"])
    for overrides, expected in ((["model.loss=wgan_gp", "model.gp_weight=10"], {"generator", "text_encoder"}),
                                (["model.loss=bce", "model.r1_gamma=0.1"], {"generator", "text_encoder"}),
                                (["model.loss=hinge", "model.r1_gamma=0"], {"generator", "text_encoder", "critic"})):
        cfg = compose(["model=dcgan", "data=shapes", "preset=smoke", "trainer.compile=true", *overrides])
        lab = speed_setup(build_lab(cfg, info), cfg, torch.device("cpu"))  # compile is lazy: nothing compiles yet
        assert compiled_children(lab) == expected, overrides


def test_a_gan_step_with_the_gradient_penalty_trains_with_its_generator_compiled(monkeypatch, tmp_path):
    """One WGAN-GP step with the generator and text encoder compiled (AOT autograd without code generation, so
    it takes seconds on a CPU; ``trainer.compile`` uses inductor, ~100 s here) gives the eager step's losses."""
    from lab_utils.commands.bench import make_trainer, variant_switches
    from lab_utils.core.data import build_dataset

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda module: compile_module(module, backend="aot_eager"))
    cfg = bench_config("dcgan", "model.loss=wgan_gp", "model.gp_weight=10", "model.generator.attention_resolution=null",
                       "model.critic.attention_resolution=null", "data.subset=32", "trainer.batch_size=4")
    train_set = build_dataset(cfg.data, "train")
    losses = {}
    for compiled in (False, True):
        switches = {**variant_switches("eager_fp32", cfg), "compile": compiled}
        trainer = make_trainer(cfg, switches, train_set, train_set.data_info(), torch.device("cpu"), tmp_path)
        assert compiled_children(trainer.lab) == ({"generator", "text_encoder"} if compiled else set())
        named, _ = trainer.run_step()
        losses[compiled] = [named["loss/critic"].item(), named["loss/generator"].item()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)