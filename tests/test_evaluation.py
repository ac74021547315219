"""Evaluation: metrics against known values and reference implementations, the frozen evaluator,
its cache, and a short end-to-end `genlab eval` on the tiny test lab."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf
from torch import nn

from lab_utils.core.config import compose
from lab_utils.core.schema import ConfigError
from lab_utils.commands.evaluation import (
    EvalConfig, EvaluatorLab, InceptionFeatures, choose_items, eval_command_main, eval_config,
    evaluate_lab, evaluator_config, fid, frechet_distance, frechet_distance_low_rank, gaussian_stats,
    get_evaluator,
    inception_score, joint_log_probs, kid, kid_unbiased, nfe_per_sample, precision_recall, prompt_alignment,
    quantize, random_translate, seeded,
)
from lab_utils.core.plotting import to_uint8
from lab_utils.harness.cached_run import run_key
from lab_utils.harness.run import train
from tiny_lab import tiny_config

SMOKE = "smoke"


# ------------------------------------------------------------------------------------ FID
def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The Frechet distance as pytorch-fid computes it (scipy.linalg.sqrtm)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    mu, sigma = gaussian_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_low_rank_fid_for_fewer_samples_than_dimensions():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from lab_utils.core.metrics import Passthrough

    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 48, generator=g, dtype=torch.float64)  # n < F: rank-deficient covariances
    y = torch.randn(25, 48, generator=g, dtype=torch.float64) * 1.5 + 0.3
    expected = scipy_frechet(x.numpy(), y.numpy())
    reference = FrechetInceptionDistance(feature=Passthrough(48))
    reference.update(x, real=True)
    reference.update(y, real=False)
    assert frechet_distance_low_rank(x, y) == pytest.approx(expected, rel=1e-6)
    assert fid(x, y) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_matches_scipy_and_torchmetrics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    mixing = torch.eye(12, dtype=torch.float64) + 0.3 * torch.rand(12, 12, generator=g, dtype=torch.float64)
    y = 0.5 + torch.randn(300, 12, generator=g, dtype=torch.float64) @ mixing  # shifted and correlated
    expected = scipy_frechet(x.numpy(), y.numpy())
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid(x, y) == pytest.approx(expected, rel=1e-6)  # torchmetrics, float64
    assert expected > 1.0


# ------------------------------------------------------------------------------------ KID
def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    shifted = torch.randn(300, 16, generator=g) + 0.5
    same_mean, same_std = kid(a, b, subset_size=150, subsets=30, seed=0)
    shift_mean, _ = kid(a, shifted, subset_size=150, subsets=30, seed=0)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shift_mean > 0.05 and shift_mean > 20 * abs(same_mean)
    assert kid_unbiased(a, shifted) == pytest.approx(shift_mean, rel=0.1)


def test_kid_unbiased_matches_torchmetrics():
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    y = torch.randn(64, 8, generator=g, dtype=torch.float64) + 0.2
    assert kid_unbiased(x, y) == pytest.approx(float(poly_mmd(x, y)), rel=1e-10)
    # one subset of every sample: torchmetrics' KID is the unbiased MMD^2 of the whole sets
    assert kid(x, y, subset_size=64, subsets=1)[0] == pytest.approx(kid_unbiased(x, y), rel=1e-10)


def test_metrics_are_seeded_and_leave_the_global_rng_alone():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = kid(a, b, subset_size=50, subsets=10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert kid(a, b, subset_size=50, subsets=10, seed=7) == first
    assert kid(a, b, subset_size=50, subsets=10, seed=8) != first
    with seeded(0):
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------ IS
@pytest.mark.parametrize("k", [1, 4, 10])
def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes(k):
    labels = torch.arange(k).repeat(30)  # balanced
    logits = 100.0 * nn.functional.one_hot(labels, k).double()  # confident
    assert inception_score(logits, splits=1)[0] == pytest.approx(k, rel=1e-6)
    uniform = torch.zeros(len(labels), k)  # no confidence: IS = 1
    assert inception_score(uniform, splits=1)[0] == pytest.approx(1.0, rel=1e-6)


def test_joint_log_probs_is_the_product_of_the_heads():
    g = torch.Generator().manual_seed(5)
    logits = {"shape": torch.randn(6, 3, generator=g), "colour": torch.randn(6, 4, generator=g),
              "size": torch.randn(6, 2, generator=g)}
    joint = joint_log_probs(logits)  # (6, 24)
    assert joint.shape == (6, 24)
    assert torch.allclose(joint.exp().sum(1), torch.ones(6))
    log_p = [head.log_softmax(1) for head in logits.values()]
    for index, (a, b, c) in enumerate(itertools.product(range(3), range(4), range(2))):  # row-major
        assert torch.allclose(joint[:, index], log_p[0][:, a] + log_p[1][:, b] + log_p[2][:, c])


# ------------------------------------------------------------------------------------ precision / recall
def test_precision_recall_on_known_point_clouds():
    line = torch.arange(10.0)[:, None]  # 0, 1, ..., 9: every 1-NN radius is 1
    fake = torch.tensor([[0.5], [20.0]])  # one inside the real manifold, one far away
    pr = precision_recall(line, fake, k=1)
    assert pr.precision == pytest.approx(0.5)
    assert pr.recall == pytest.approx(1.0)  # the fake 1-NN radius is 19.5: it covers all real points
    same = precision_recall(line, line.clone(), k=3)
    assert (same.precision, same.recall) == (1.0, 1.0)
    far = precision_recall(line, line + 100.0, k=3)
    assert (far.precision, far.recall) == (0.0, 0.0)
    # a fake set collapsed onto half of the real points: precise, but recalls only what it covers
    collapsed = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])  # 3-NN radius 0.3 at most
    pr = precision_recall(line, collapsed, k=3)
    assert pr.precision == 1.0 and pr.recall == pytest.approx(0.1)  # only the real point 0


def test_precision_recall_is_chunked_without_changing_the_result():
    g = torch.Generator().manual_seed(6)
    real, fake = torch.randn(200, 5, generator=g), torch.randn(150, 5, generator=g) + 0.5
    assert precision_recall(real, fake, k=3, chunk_size=17) == precision_recall(real, fake, k=3, chunk_size=1000)


# ------------------------------------------------------------------------------------ alignment
def test_prompt_alignment_known_values():
    target = torch.tensor([[0, 1], [1, 1], [2, 0], [0, 0]])
    predicted = torch.tensor([[0, 1], [1, 0], [2, 0], [1, 1]])
    held = torch.tensor([False, True, True, False])
    result = prompt_alignment(predicted, target, held, attributes=["shape", "colour"])
    assert result["per_attribute"] == {"shape": 0.75, "colour": 0.5}
    assert result["all"] == 0.5 and result["n"] == 4
    assert result["held_out"] == {"per_attribute": {"shape": 1.0, "colour": 0.5}, "all": 0.5, "n": 2}
    assert result["seen"] == {"per_attribute": {"shape": 0.5, "colour": 0.5}, "all": 0.5, "n": 2}
    assert prompt_alignment(predicted, target)["held_out"] is None


def test_choose_items_enriches_held_out_combinations():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[::20] = True  # 5% held out
    picked = choose_items(200, 1000, seed=0, held_out_mask=mask, held_out_fraction=0.25)
    assert len(set(picked.tolist())) == 200 and int(mask[picked].sum()) == 50
    assert torch.equal(picked, choose_items(200, 1000, seed=0, held_out_mask=mask, held_out_fraction=0.25))
    with pytest.raises(ValueError, match="num_samples"):
        choose_items(2000, 1000, seed=0)


# ------------------------------------------------------------------------------------ the evaluator
def test_quantize_matches_the_plotting_conversion():
    x = torch.linspace(-1.3, 1.3, 2 * 3 * 4 * 5).view(2, 3, 4, 5)
    assert np.array_equal(quantize(x).permute(0, 2, 3, 1).numpy(), to_uint8(x))
    assert quantize(quantize(x)) is not None and torch.equal(quantize(quantize(x)), quantize(x))


def test_random_translate_moves_whole_images():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    torch.manual_seed(0)
    y = random_translate(x, 2)
    assert y.shape == x.shape and torch.equal(random_translate(x, 0), x)
    for n in range(2):  # each image is its own shifted copy: the centre 2x2 values appear in order
        assert any(torch.equal(y[n, 0, 2:4, 2:4], x[n, 0, 2 + dy:4 + dy, 2 + dx:4 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


@pytest.fixture(scope="module")
def smoke_setup(tmp_path_factory):
    """A tiny-lab run on a small shapes subset and the smoke evaluator of its data (trained once)."""
    root = tmp_path_factory.mktemp("evaluation")
    run_dir = root / "tiny_run"
    cfg = tiny_config(run_dir)
    train(cfg)
    cache = root / "evaluators"
    evaluator = get_evaluator(cfg.data, preset=SMOKE, cache_dir=cache)
    return run_dir, cfg, cache, evaluator


def test_evaluator_is_frozen(smoke_setup):
    _, _, _, evaluator = smoke_setup
    parent = nn.Sequential(nn.Linear(2, 2), evaluator)
    parent.train()
    assert not evaluator.training and not evaluator.net.training
    assert not any(p.requires_grad for p in evaluator.parameters())
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = evaluator(images)
    assert not out.features.requires_grad
    assert out.features.shape == (3, evaluator.num_features)
    assert {k: v.shape[1] for k, v in out.logits.items()} == {"shape": 3, "colour": 8, "size": 2, "position": 9}
    assert evaluator.joint_log_probs(images).shape == (3, 432) and evaluator.num_classes == 432
    assert evaluator.predict(images).shape == (3, 4)
    # float images in [-1, 1] are quantised first: the same answer as their uint8 version
    floats = images.float() / 127.5 - 1
    assert torch.equal(evaluator.features(floats), evaluator.features(images))


def test_evaluator_cache_hits_and_is_invalidated_by_its_config(smoke_setup, monkeypatch):
    _, cfg, cache, evaluator = smoke_setup
    info = json.loads((cache / f"shapes-{evaluator.key}" / "evaluator.json").read_text())
    assert info["key"] == evaluator.key and set(info["test_accuracy"]) >= {"shape", "colour", "size", "position", "all"}
    assert evaluator.test_accuracy == info["test_accuracy"]
    trained = []
    import lab_utils.commands.evaluation.cache as module

    original = module.train_evaluator
    monkeypatch.setattr(module, "train_evaluator", lambda *a, **k: trained.append(a) or original(*a, **k))
    again = get_evaluator(cfg.data, preset=SMOKE, cache_dir=cache)  # cached: no training
    assert trained == [] and again.key == evaluator.key
    for p, q in zip(again.parameters(), evaluator.parameters()):
        assert torch.equal(p, q)
    changed = get_evaluator(cfg.data, ["model.width=12", "model.groups=4"], preset=SMOKE, cache_dir=cache)
    assert len(trained) == 1 and changed.key != evaluator.key
    assert (cache / f"shapes-{changed.key}" / "evaluator.json").is_file()
    # the key follows the data, the trainer settings and the model config; not where the data lives
    base = evaluator_config(cfg.data, preset=SMOKE)
    assert run_key(evaluator_config({**OmegaConf.to_container(cfg.data), "root": "/elsewhere"}, preset=SMOKE)) \
        == run_key(base) == evaluator.key
    assert run_key(evaluator_config(cfg.data, ["trainer.steps=5"], preset=SMOKE)) != evaluator.key
    reseeded = {**OmegaConf.to_container(cfg.data), "seed": 1}
    assert run_key(evaluator_config(reseeded, preset=SMOKE)) != evaluator.key
    with pytest.raises(FileNotFoundError, match="genlab train model=evaluator"):
        get_evaluator(cfg.data, ["model.dropout=0.2"], preset=SMOKE, cache_dir=cache, train_if_missing=False)


def test_evaluator_is_a_lab_the_harness_trains(smoke_setup):
    _, _, cache, evaluator = smoke_setup
    run = cache / f"shapes-{evaluator.key}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/loss", "stats/acc_shape", "stats/acc_position"} <= set(rows[-1])
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model._target_ == "labs.evaluator.EvaluatorLab" and saved.data.held_out == []
    from lab_utils.harness.checkpoint import load_lab

    lab = load_lab(run).lab
    assert isinstance(lab, EvaluatorLab) and not lab.generative
    with pytest.warns(UserWarning, match="not a generative model"):
        blank = lab.sample(["a red circle"])  # what the harness's final sample grid gets
    assert blank.shape == (1, 3, 32, 32) and bool((blank == -1).all())
    cfg = compose(["model=evaluator", "data=fashion_mnist", "preset=cpu"])
    assert cfg.model.name == "evaluator" and cfg.trainer.steps > 0


def test_alignment_of_real_images_is_the_evaluator_accuracy(smoke_setup, capsys):
    run_dir, cfg, _, evaluator = smoke_setup
    from lab_utils.commands.evaluation import real_images
    from lab_utils.core.data import build_dataset
    from lab_utils.harness.checkpoint import load_lab

    lab = load_lab(run_dir).lab
    result = evaluate_lab(lab, cfg.data, evaluator, num_samples=12, seed=3, batch_size=5, kid_subsets=5)
    test = build_dataset(cfg.data, "test")
    idx = choose_items(12, len(test), 3 + 1, test.held_out_mask, 0.1)  # the real held-out set of seed 3
    predicted = evaluator.predict(real_images(test, idx))
    accuracy = (predicted == test.labels[idx]).float().mean(0)  # the evaluator's accuracy on these images
    alignment = result.real_held_out["alignment"]
    assert list(alignment["per_attribute"].values()) == pytest.approx(accuracy.tolist())
    assert alignment["all"] == pytest.approx((predicted == test.labels[idx]).all(1).float().mean().item())
    assert result.real_held_out["fid"] >= 0 and result.nfe_per_sample == 1
    # one object per image: every real shapes image; the generated share is the count's on the generated images
    assert result.real_held_out["one_object"] == 1.0 and 0.0 <= result.generated["one_object"] <= 1.0
    # the evaluation is reproducible and does not touch the caller's RNG
    torch.manual_seed(0)
    state = torch.get_rng_state()
    capsys.readouterr()
    again = evaluate_lab(lab, cfg.data, evaluator, num_samples=12, seed=3, batch_size=5, kid_subsets=5, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert again.generated == result.generated and again.real_held_out == result.real_held_out  # bars change nothing
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_nfe_per_sample_reads_the_lab():
    class Diffusionish(nn.Module):
        def nfe(self, sampler=None, steps=None, guidance=None):
            return (steps or 50) * (1 if guidance in (None, 0.0, 1.0) else 2)

    assert nfe_per_sample(nn.Linear(1, 1), {"temperature": 0.5}) == 1
    assert nfe_per_sample(Diffusionish(), {"steps": 20, "guidance": 3.0, "eta": 0.0}) == 40
    assert nfe_per_sample(Diffusionish(), {"steps": 20, "guidance": 1.0}) == 20


def test_eval_command_writes_eval_json(smoke_setup, capsys, monkeypatch):
    import lab_utils.harness.progress

    monkeypatch.setattr(lab_utils.harness.progress, "LOG_INTERVAL", 1e9)  # a log's lines as bars start and end, none between
    run_dir, _, cache, evaluator = smoke_setup
    cfg = compose([f"run={run_dir}", "eval.num_samples=8", "eval.batch_size=4", "eval.evaluator_preset=smoke",
                   f"eval.cache_dir={cache}", "eval.kid_subsets=3", "eval.device=cpu",
                   "+eval.sample_options.scale=0.5"], config_name="eval", check=False)
    result = eval_command_main(cfg)
    printed = capsys.readouterr()
    line = printed.out.splitlines()[0]
    assert line.startswith("tiny step 8 on shapes (n=8): FID ") and "(real " in line and "NFE 1" in line
    # the phases' bars on stderr (outside a terminal: a line as each starts and one as it ends)
    bars = [line for line in printed.err.splitlines() if line.startswith("eval tiny: ")]
    assert any(line.startswith("eval tiny: sample: 8/8 img (100%)") for line in bars), printed.err
    assert any(line.startswith("eval tiny: features and metrics: 3/3 set (100%)") for line in bars), printed.err
    assert any(line.startswith("eval tiny: partial prompts: 8/8 img (100%)") for line in bars), printed.err
    assert len(bars) == 6, bars  # three bars, two lines each: not a line per batch
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"model", "data", "step", "num_samples", "seed", "sample_options", "nfe_per_sample",
            "sampling_seconds_per_image", "evaluator", "generated", "real_held_out", "held_out_prompts",
            "inception", "eval_config"} <= set(saved)
    for which in ("generated", "real_held_out"):
        assert {"fid", "kid_mean", "kid_std", "inception_score", "inception_score_std", "precision", "recall",
                "alignment"} <= set(saved[which])
    assert saved["evaluator"]["key"] == evaluator.key and saved["step"] == 8 and saved["num_samples"] == 8
    assert saved["sample_options"] == {"scale": 0.5}
    assert saved["sample_precision"] == "fp32" and saved["fid_guidance"] is None  # a CPU run; no sweep asked for


def test_eval_progress_false_prints_no_bar(smoke_setup, tmp_path, capsys):
    run_dir, _, cache, _ = smoke_setup
    cfg = compose([f"run={run_dir}", "eval.num_samples=8", "eval.batch_size=4", "eval.evaluator_preset=smoke",
                   f"eval.cache_dir={cache}", "eval.kid_subsets=3", "eval.device=cpu", "eval.progress=false",
                   f"out={tmp_path / 'eval.json'}"], config_name="eval", check=False)
    eval_command_main(cfg)
    printed = capsys.readouterr()
    assert printed.out.startswith("tiny step 8") and "eval tiny" not in printed.err


def test_eval_config_errors_are_clear(smoke_setup):
    run_dir, _, cache, _ = smoke_setup
    with pytest.raises(ConfigError, match="run="):
        eval_command_main(compose([], config_name="eval", check=False))
    with pytest.raises(ConfigError, match="inception_weights"):
        eval_config({"features": "inception"})
    with pytest.raises(ConfigError, match="features"):
        eval_config({"features": "clip"})
    with pytest.raises(ConfigError, match=r"eval.sample_options: TinyLab.sample does not take option\(s\) \['steps'\]; it takes scale"):
        eval_command_main(compose([f"run={run_dir}", "+eval.sample_options.steps=3", "eval.num_samples=8",
                                   "eval.evaluator_preset=smoke", f"eval.cache_dir={cache}"],
                                  config_name="eval", check=False))
    assert isinstance(eval_config(None), EvalConfig)
    with pytest.raises(ConfigError, match="eval.precision must be null"):
        eval_config({"precision": "int8"})
    with pytest.raises(ConfigError, match="eval.fid_guidance must be null"):
        eval_config({"fid_guidance": [1.0, -2.0]})
    with pytest.raises(ConfigError, match=r"eval.fid_guidance=\[1.0, 2.0\]: tiny samples without guidance"):
        eval_command_main(compose([f"run={run_dir}", "eval.fid_guidance=[1.0,2.0]", "eval.num_samples=8",
                                   "eval.evaluator_preset=smoke", f"eval.cache_dir={cache}"],
                                  config_name="eval", check=False))


# ------------------------------------------------------------------------------------ Inception
@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3, randomly initialised, saved as a weights file (nothing downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    original_url = tf_inception.load_state_dict_from_url
    original_load = tf_inception.FeatureExtractorInceptionV3.load_state_dict
    tf_inception.load_state_dict_from_url = lambda *args, **kwargs: {}
    tf_inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, *args, **kwargs: None
    try:
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tf_inception.load_state_dict_from_url = original_url
        tf_inception.FeatureExtractorInceptionV3.load_state_dict = original_load
    for module in net.modules():  # He init keeps activations O(1) through ~50 layers (the default shrinks them)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_are_what_torchmetrics_uses(random_inception_weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    grey = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inception = InceptionFeatures(random_inception_weights)
    features, logits = inception.embed(grey)  # grey images are repeated to RGB
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and features.std() > 1e-3
    # torchmetrics' FID fed the RGB images accumulates exactly these features
    direct = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(random_inception_weights))
    rgb = grey.repeat(1, 3, 1, 1)
    direct.update(rgb, real=True)
    assert torch.allclose(direct.real_features_sum, features.double().sum(0), rtol=1e-5, atol=1e-6)
    # and the same network's "logits_unbiased" (the default feature of torchmetrics' Inception Score) are the logits
    direct.inception.features_list = ["logits_unbiased"]
    assert torch.allclose(direct.inception(rgb), logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        InceptionFeatures(random_inception_weights.parent / "missing.pth")
    garbage = random_inception_weights.parent / "garbage.pth"
    torch.save({"weight": torch.zeros(1)}, garbage)
    with pytest.raises(ValueError, match="Inception-v3 state dict"):
        InceptionFeatures(garbage)


def test_eval_with_inception_reports_it_separately(smoke_setup, random_inception_weights):
    run_dir, _, cache, _ = smoke_setup
    cfg = compose([f"run={run_dir}", "eval.num_samples=2", "eval.pr_k=1", "eval.kid_subsets=2",
                   "eval.features=inception",
                   f"eval.inception_weights={random_inception_weights}", "eval.evaluator_preset=smoke",
                   f"eval.cache_dir={cache}", "eval.device=cpu"], config_name="eval", check=False)
    result = eval_command_main(cfg)
    inception = result["inception"]
    assert inception["weights"] == str(random_inception_weights)
    for which in ("generated", "real_held_out"):
        assert set(inception[which]) == {"fid", "kid_mean", "kid_std", "inception_score", "inception_score_std"}
        assert inception[which]["fid"] > 0 and inception[which]["inception_score"] >= 1.0
    assert inception["generated"]["fid"] != result["generated"]["fid"]  # reported apart from the evaluator's


def test_a_plain_evaluator_run_can_be_used(smoke_setup, tmp_path):
    run_dir = smoke_setup[0]
    evaluator_run = tmp_path / "evaluator"
    train(compose(["model=evaluator", "data=shapes", "preset=smoke", "data.subset=64", "data.num_test=16",
                   f"out={evaluator_run}", "data.held_out=[]"]))  # `genlab train model=evaluator ...`
    assert not (evaluator_run / "evaluator.json").exists()
    cfg = compose([f"run={run_dir}", "eval.num_samples=8", "eval.kid_subsets=2", f"eval.evaluator_run={evaluator_run}",
                   "eval.device=cpu", "eval.clip_score=false"], config_name="eval", check=False)  # the evaluator alone
    result = eval_command_main(cfg)
    info = json.loads((evaluator_run / "evaluator.json").read_text())  # accuracy measured on first use
    assert result["evaluator"]["key"] == info["key"] and result["evaluator"]["test_accuracy"] == info["test_accuracy"]
    with pytest.raises(ConfigError, match="not an evaluator"):
        eval_command_main(compose([f"run={run_dir}", "eval.num_samples=8", f"eval.evaluator_run={run_dir}"],
                                  config_name="eval", check=False))


def test_count_objects_counts_regions_not_pixels():
    """Discs on a plain background: 0, 1, 2 and 3 objects; a speck under min_area is not one, nor is speckle noise
    over a disc's image; pixels touching only at a corner are one region (8-connected); a faint blob under the
    threshold is background; the background is each image's own (a grey one, an object touching the border)."""
    from lab_utils.core.metrics import count_objects

    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def disc(cy, cx, r):
        return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()

    background = torch.full((8, 3, 32, 32), -0.94)
    background[5] = 0.1  # a grey background
    masks = [torch.zeros(32, 32), disc(8, 8, 4), disc(8, 8, 4) + disc(24, 24, 3), disc(6, 6, 3) + disc(6, 24, 3)
             + disc(24, 12, 5), disc(16, 16, 5), disc(16, 16, 5), disc(0, 0, 6), disc(16, 16, 4)]
    images = background.clone()
    for k, mask in enumerate(masks[:8]):
        images[k, 0] += 1.5 * mask.clamp(max=1)  # a red object
    images[4, :, 2, 2] = 0.9  # a one-pixel speck beside the disc
    images[5, 1, 3, 3:6] = 0.9  # a 1x3 speck: under min_area = 4
    diagonal = torch.zeros(32, 32)
    for k in range(6):
        diagonal[4 + k, 4 + k] = 1  # a one-pixel-wide diagonal line: one region when corners connect
    images[6] = -0.94
    images[6, 2] += 1.5 * diagonal
    images[7, 0] += 0.2 * disc(20, 20, 4)  # a faint blob: 0.2 < threshold 0.25
    assert count_objects(images).tolist() == [0, 1, 2, 3, 1, 1, 1, 1]
    speckled = images[1:2] + 0.5 * (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.08)
    assert count_objects(speckled).tolist() == [1]  # 8% of the pixels lit at random, as a sampler stopped early
    assert count_objects(speckled, smooth=1, min_area=1).item() > 10  # without the blur: a crowd of specks


def test_partial_prompts_name_what_their_template_names():
    """The shapes templates that leave attributes out, found from the captions alone, and the metric on a hand case:
    an attribute the prompt does not name is never wrong, and "all" asks every named one."""
    from lab_utils.commands.evaluation.sets import partial_prompt_metrics, partial_prompt_set, partial_templates
    from lab_utils.core.data import build_dataset

    test = build_dataset(compose(["preset=smoke"]).data, "test")
    assert partial_templates(test) == {7: [0, 1], 8: [0, 1, 2], 9: [0, 1, 3]}  # shape, colour (+ size | position)
    prompts, labels, named = partial_prompt_set(test, 6, seed=5)
    assert prompts[0] == test.describe(labels[0], 7) and prompts[1] == test.describe(labels[1], 8)
    assert named.tolist()[:3] == [[True, True, False, False], [True, True, True, False], [True, True, False, True]]
    predicted = labels.clone()
    predicted[0, 2] = (labels[0, 2] + 1) % 2  # a size the prompt did not ask for: not an error
    predicted[1, 2] = (labels[1, 2] + 1) % 2  # a size it asked for: an error
    predicted[2, 1] = (labels[2, 1] + 1) % 8  # a colour it asked for: an error
    one = torch.full((6, 3, 32, 32), -1.0)
    one[:, 0, 10:16, 10:16] = 1.0
    result = partial_prompt_metrics(predicted, labels, named, ((one + 1) * 127.5).to(torch.uint8),
                                    list(test.attributes), [7, 8, 9])
    assert result["all"] == pytest.approx(4 / 6) and result["one_object"] == 1.0 and result["n"] == 6
    assert result["per_attribute"]["shape"] == 1.0 and result["per_attribute"]["colour"] == pytest.approx(5 / 6)
    assert result["per_attribute"]["size"] == 0.5  # template 8 names size: items 1 (wrong) and 4
