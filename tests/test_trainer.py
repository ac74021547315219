"""The model-agnostic harness, proven with the tiny two-player lab of tests/tiny_lab.py."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TESTS, subprocess_env
from lab_utils.harness import checkpoint as ckpt
from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint, load_lab
from lab_utils.harness.data_stream import DataStream
from lab_utils.harness.devices import pick_device
from lab_utils.harness.ema import EMA
from lab_utils.harness.run import train
from lab_utils.harness.trainer import Callback, TrainingDiverged, lr_factor, lr_schedule
from tiny_lab import tiny_config


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: {k: v for k, v in row.items() if k.startswith(("loss/", "grad_norm/"))}
            for row in read_metrics(run_dir) if "loss/generator" in row}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(tiny_config(run_dir))
    return run_dir, result


def test_run_directory_layout(finished_run):
    run_dir, result = finished_run
    assert result.step == 8
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    # keep_checkpoints=2: only the newest two step files remain, and last.pt is the newest
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000006.pt", "step_00000008.pt"]
    assert load_checkpoint(run_dir)["trainer"]["step"] == 8
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000004.png", "step_000008.png"]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    # 2 critic updates per step, each on its own batch of 8, so 16 images per step
    assert rows[-1]["images_seen"] == 8 * 16
    assert {"loss/critic", "loss/generator", "grad_norm/critic", "grad_norm/generator",
            "lr/critic", "lr/generator"} <= set(rows[0])


def test_checkpoint_rebuilds_model_alone(finished_run):
    run_dir, _ = finished_run
    loaded = load_lab(run_dir, ema=False)
    state = load_checkpoint(run_dir)
    for name, tensor in loaded.lab.state_dict().items():
        assert torch.equal(tensor, state["model"][name])
    with_ema = load_lab(run_dir, ema=True).lab
    assert torch.equal(with_ema.generator.weight, state["ema"]["generator.weight"])
    assert not torch.equal(with_ema.generator.weight, loaded.lab.generator.weight)
    # the config travels with the weights
    assert loaded.cfg.model.name == "tiny" and loaded.cfg.trainer.steps == 8


def test_kill_and_resume_gives_the_same_numbers(tmp_path):
    """A run killed (SIGKILL) mid-training and resumed ends with exactly the uninterrupted run's numbers."""
    script = str(TESTS / "tiny_lab.py")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = subprocess_env()
    # the uninterrupted run, beside the one to be killed (independent: each depends on its seed alone)
    uninterrupted = subprocess.Popen([sys.executable, script, str(straight)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

    proc = subprocess.Popen([sys.executable, script, str(killed), "--sleep", "0.4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    target = killed / "checkpoints" / "step_00000004.pt"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stdout.read().decode()[-2000:]
    stopped_at = load_checkpoint(killed)["trainer"]["step"]
    assert 4 <= stopped_at < 8, "the kill must land before the run finished"

    done = subprocess.run([sys.executable, script, str(killed), "--resume"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()[-2000:]
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]:
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    assert losses_by_step(straight) == losses_by_step(killed)
    assert a["trainer"]["data"] == b["trainer"]["data"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    good = {"trainer": {"step": 1}, "model": {"w": torch.ones(3)}}
    ckpt.save_checkpoint(good, tmp_path, step=1, keep=3)

    def broken_save(obj, handle):
        handle.write(b"PK\x03\x04 half a zip file")  # what a kill in the middle of a write leaves
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"trainer": {"step": 2}, "model": {"w": torch.zeros(3)}}, tmp_path, step=2, keep=3)
    monkeypatch.undo()
    state = load_checkpoint(tmp_path)
    assert state["trainer"]["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_00000001.pt"]


def test_corrupt_or_foreign_checkpoints_fail_clearly(tmp_path, finished_run):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((finished_run[0] / "checkpoints" / "last.pt").read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a genlab checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="belongs to model 'tiny', not 'ddpm'"):
        load_lab(finished_run[0], expect_model="ddpm")
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_checkpoint(tmp_path / "nowhere")
    # weights that do not fit the model its config builds
    state = load_checkpoint(finished_run[0])
    state["model"]["generator.weight"] = torch.zeros(3, 3)
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_lab(edited)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"at step 5.*step_00000004\.pt"):
        train(tiny_config(run_dir, explode_at=5))
    state = load_checkpoint(run_dir)
    assert state["trainer"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_guard_without_per_step_sync_names_the_window(tmp_path):
    # nan_check=log (the GPU choice): no host-device sync in the step; the logged averages are checked.
    cfg = tiny_config(tmp_path / "nan", explode_at=3)
    cfg.trainer.nan_check, cfg.trainer.log_every, cfg.trainer.checkpoint_every = "log", 4, 2
    with pytest.raises(TrainingDiverged, match=r"averaged over steps 1-4.*step_00000002\.pt"):
        train(cfg)
    assert load_checkpoint(tmp_path / "nan")["trainer"]["step"] == 2  # the last good one is kept


def test_existing_run_is_not_overwritten(finished_run):
    run_dir, _ = finished_run
    before = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="resume="):
        train(tiny_config(run_dir))
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_resuming_a_finished_run_with_more_steps_continues(tmp_path, finished_run):
    import shutil

    run_dir = tmp_path / "more"
    shutil.copytree(finished_run[0], run_dir)
    cfg = tiny_config(run_dir)
    cfg.trainer.steps = 10
    result = train(cfg, resume=run_dir)
    assert result.step == 10
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, 11))


def test_callbacks_log_and_never_change_training(tmp_path, finished_run):
    seen = []

    def noisy_eval(trainer):
        with trainer.sampling_weights() as lab:
            assert not lab.training
            seen.append(trainer.step)
            torch.randn(1000)  # consumes the RNG: must not change the training run
            return {"eval/score": float(trainer.step)}

    run_dir = tmp_path / "with_callback"
    train(tiny_config(run_dir), callbacks=(Callback(noisy_eval, every=3),))
    assert seen == [3, 6, 8]  # every 3 steps, and at the end
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "eval/score" in r] == [3, 6, 8]
    assert losses_by_step(run_dir) == losses_by_step(finished_run[0])


def test_time_based_callbacks_fire_once_per_interval():
    callback = Callback(lambda trainer: None, every_seconds=1.0)
    crossings = [callback.due(0, before, after) for before, after in [(0.0, 0.6), (0.6, 1.2), (1.2, 1.9), (1.9, 3.5)]]
    assert crossings == [False, True, False, True]
    with pytest.raises(ValueError, match="exactly one"):
        Callback(lambda trainer: None)


def test_image_and_time_budgets_stop_training(tmp_path):
    cfg = tiny_config(tmp_path / "images")
    cfg.trainer.steps, cfg.trainer.max_images = 1000, 40  # 16 images per step -> stops after step 3
    result = train(cfg)
    assert (result.step, result.images_seen) == (3, 48)
    assert load_checkpoint(result.run_dir)["trainer"]["step"] == 3
    cfg = tiny_config(tmp_path / "seconds", sleep=0.05)
    cfg.trainer.steps, cfg.trainer.max_seconds = 1000, 0.2
    result = train(cfg)
    seconds = [row["train_seconds"] for row in read_metrics(result.run_dir)]  # one row per step
    assert len(seconds) == result.step < 1000
    assert seconds[-1] >= 0.2 and all(s < 0.2 for s in seconds[:-1])  # stopped at the first step past 0.2 s


def test_ema_follows_its_equation():
    model = nn.Module()
    model.net = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.net.weight, 0.0)
    ema = EMA(model, ["net"], decay=0.9)
    with torch.no_grad():
        model.net.weight.fill_(1.0)
    ema.update(model, step=1)
    ema.update(model, step=2)
    # shadow_2 = 0.9 * (0.9 * 0 + 0.1 * 1) + 0.1 * 1 = 0.19
    assert ema.shadow["net.weight"].item() == pytest.approx(0.19)
    with ema.applied(model):
        assert model.net.weight.item() == pytest.approx(0.19)
    assert model.net.weight.item() == 1.0
    with pytest.raises(ValueError, match="not submodules"):
        EMA(model, ["nope"], decay=0.9)


def norm_model() -> nn.Module:
    """Parameters, float buffers (BatchNorm's running statistics) and an integer one (num_batches_tracked)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    model.head = nn.Linear(4, 1)  # not tracked
    return model


def train_a_little(model: nn.Module) -> None:
    """New weights and new BatchNorm statistics, as an optimiser step and a forward pass make."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.1)
        model.net(torch.randn(4, 3, 6, 6))  # train mode: updates running_mean / running_var


def test_fused_ema_update_matches_the_per_tensor_loop():
    model = norm_model()
    decay, start = 0.9, 2
    ema = EMA(model, ["net"], decay=decay, start=start)
    tracked = dict(model.net.named_parameters()) | dict(model.net.named_buffers())
    assert set(ema.shadow) == {f"net.{name}" for name, t in tracked.items() if t.is_floating_point()}
    assert "net.2.running_mean" in ema.shadow and "net.2.num_batches_tracked" not in ema.shadow
    reference = {name: tensor.clone() for name, tensor in ema.shadow.items()}
    for step in range(1, 7):
        train_a_little(model)
        live = {f"net.{name}": tensor for name, tensor in tracked.items()}
        expected = {}
        for name, shadow in reference.items():  # the per-tensor loop, and the equation in float64
            theta = live[name]
            expected[name] = (theta.double() if step <= start
                              else decay * shadow.double() + (1 - decay) * theta.double())
            if step <= start:
                shadow.copy_(theta)
            else:
                shadow.lerp_(theta, 1 - decay)
        ema.update(model, step)
        for name, shadow in ema.shadow.items():
            assert torch.equal(shadow, reference[name]), (step, name)  # bit for bit the per-tensor lerp
            # lerp rounds differently from d * shadow + (1 - d) * theta in fp32, by an ulp or two
            torch.testing.assert_close(shadow.double(), expected[name], rtol=1e-6, atol=1e-6)
            if step <= start:
                assert torch.equal(shadow, live[name])  # the copy phase
    assert not torch.equal(ema.shadow["net.0.weight"], model.net[0].weight)  # it did average
    with ema.applied(model):
        assert torch.equal(model.net[2].running_mean, reference["net.2.running_mean"])
    assert torch.equal(ema.state_dict()["net.0.weight"], reference["net.0.weight"])


def test_ema_follows_replaced_tensors_and_other_models():
    model = norm_model()
    ema = EMA(model, ["net"], decay=0.5)
    # a buffer replaced (as .to() does) and a parameter replaced (load_state_dict(assign=True))
    model.net[2].running_mean = torch.full((8,), 4.0)
    model.net[0].bias = nn.Parameter(torch.full((8,), 2.0))
    before = {name: tensor.clone() for name, tensor in ema.shadow.items()}
    ema.update(model, step=1)
    for name, live in [("net.2.running_mean", model.net[2].running_mean), ("net.0.bias", model.net[0].bias)]:
        assert torch.equal(ema.shadow[name], before[name].lerp(live, 0.5))
    other = norm_model()
    with torch.no_grad():
        other.net[3].weight.fill_(1.0)
    previous = ema.shadow["net.3.weight"].clone()
    ema.update(other, step=2)
    assert torch.equal(ema.shadow["net.3.weight"], previous.lerp(other.net[3].weight, 0.5))
    bare = nn.Module()
    bare.net = nn.Identity()
    with pytest.raises(ValueError, match="no tensors"):
        ema.update(bare, step=3)


def test_warmup_is_linear():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = lr_schedule(optimizer, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_learning_rate_factor():
    # moved here from test_evaluation: the harness owns the schedule (trainer.lr_decay_steps), not the evaluator
    assert [lr_factor(t, 0, 100) for t in (0, 50, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_factor(70, 0, None) == 1.0
    assert lr_factor(1, 4, 100) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.01)))  # warm-up x decay
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 2.0}], lr=1.0)
    schedule = lr_schedule(optimizer, warmup_steps=0, decay_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.0 * lr_factor(k, 0, 4) for k in range(6)])  # the group's own base rate, scaled
    assert lrs[-1] == 0.0


def test_data_stream_visits_each_item_once_per_epoch_and_resumes():
    dataset = [{"image": torch.tensor([float(i)]), "caption": str(i)} for i in range(10)]
    stream = DataStream(dataset, batch_size=3, seed=7, device=torch.device("cpu"))
    first_epoch = [next(stream)["image"].flatten().tolist() for _ in range(3)]
    seen = sorted(v for batch in first_epoch for v in batch)
    assert len(seen) == 9 and len(set(seen)) == 9  # 3 full batches, the partial one dropped
    state = stream.state_dict()
    expected = [next(stream)["image"].flatten().tolist() for _ in range(4)]
    again = DataStream(dataset, batch_size=3, seed=7, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert [next(again)["image"].flatten().tolist() for _ in range(4)] == expected
    assert state == {"epoch": 0, "position": 3, "global_batch": 3}
    with pytest.raises(ValueError, match="fewer than one global batch"):
        DataStream(dataset, batch_size=11, seed=0, device=torch.device("cpu"))


def test_data_shards_of_several_processes_make_up_the_single_process_batches():
    dataset = [{"image": torch.tensor([float(i)]), "caption": str(i)} for i in range(50)]
    cpu = torch.device("cpu")
    single = DataStream(dataset, batch_size=6, seed=3, device=cpu)
    shards = [DataStream(dataset, batch_size=2, seed=3, device=cpu, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):  # 8 global batches per epoch: crosses two epoch boundaries (reshuffled each epoch)
        whole = sorted(next(single)["image"].flatten().tolist())
        assert sorted(v for shard in shards for v in next(shard)["image"].flatten().tolist()) == whole
    assert single.epoch == shards[0].epoch == 2
    # A position saved by 3 processes resumes in 1 (the global batch is the same) and vice versa.
    resumed = DataStream(dataset, batch_size=6, seed=3, device=cpu)
    resumed.load_state_dict(shards[0].state_dict())
    assert sorted(next(resumed)["image"].flatten().tolist()) == sorted(next(single)["image"].flatten().tolist())


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected is None:
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_bf16_autocast_trains_on_the_cpu_with_fp32_weights(tmp_path, monkeypatch):
    """trainer.precision=bf16 runs the loss under CPU autocast: the layers compute in bf16, the weights,
    optimiser state and checkpoint stay fp32, and the losses are those of fp32 to bf16's precision."""
    from lab_utils.harness.devices import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU emulates bf16, so trainer.precision=bf16 trains in fp32 here")
    seen = []
    linear_forward = nn.Linear.forward

    def recording_forward(self, x):
        out = linear_forward(self, x)
        if self.out_features == 1:  # the tiny lab's critic, which runs inside ctx.optimize only
            seen.append(out.dtype)
        return out

    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path / precision, noise=False)
        cfg.trainer.precision, cfg.trainer.steps, cfg.trainer.log_every = precision, 2, 1
        seen.clear()
        monkeypatch.setattr(nn.Linear, "forward", recording_forward)
        runs[precision] = train(cfg)
        monkeypatch.setattr(nn.Linear, "forward", linear_forward)
        assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    state = load_checkpoint(runs["bf16"].run_dir)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert not state["scalers"]  # bf16 needs no loss scaling
    for key, value in runs["fp32"].losses.items():
        assert runs["bf16"].losses[key] == pytest.approx(value, rel=0.05, abs=1e-3), key


def test_bf16_falls_back_to_fp32_on_a_cpu_that_would_emulate_it(tmp_path, monkeypatch, caplog):
    from lab_utils.harness import devices as devices_module

    monkeypatch.setattr(devices_module, "cpu_has_native_bf16", lambda: False)
    assert devices_module.effective_precision("bf16", torch.device("cpu")) == "fp32"
    with devices_module.precision_autocast("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    cfg = tiny_config(tmp_path / "run")
    cfg.trainer.precision, cfg.trainer.steps = "bf16", 2
    with caplog.at_level("WARNING", logger="genlab"):
        assert train(cfg).step == 2
    assert "trainer.precision=bf16 is not used on a CPU without AMX or AVX-512 BF16; training in fp32" in caplog.text


def test_precision_autocast_per_device():
    from lab_utils.harness.devices import cpu_has_native_bf16, precision_autocast

    if not cpu_has_native_bf16():
        pytest.skip("this CPU emulates bf16, so trainer.precision=bf16 trains in fp32 here")
    a = torch.randn(4, 4)
    for precision, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32)):
        with precision_autocast(precision, torch.device("cpu")):  # fp16 autocast is CUDA's only
            assert (a @ a).dtype == expected, precision


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    cfg = tiny_config(tmp_path / "cuda")
    cfg.trainer.device, cfg.trainer.precision, cfg.trainer.nan_check = "cuda", precision, "log"
    result = train(cfg)
    assert result.step == 8
    state = load_checkpoint(result.run_dir)
    assert bool(state["scalers"]) == (precision == "fp16")  # fp16 keeps a gradient scaler per optimiser
    assert load_lab(result.run_dir, device="cuda").lab.device.type == "cuda"
    cfg.trainer.steps = 10  # ... and resumes with it
    assert train(cfg, resume=result.run_dir).step == 10


def test_fast_adam_matches_the_reference_implementation():
    from lab_utils.core.lab import adam

    for decoupled, kind in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        torch.manual_seed(0)
        fast_model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GroupNorm(1, 7), torch.nn.Linear(7, 1))
        slow_model = copy.deepcopy(fast_model)
        fast = adam(fast_model.parameters(), decoupled=decoupled, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1)
        slow = kind(slow_model.parameters(), lr=1e-2, betas=(0.5, 0.9), weight_decay=0.1, foreach=False)
        assert fast.defaults.get("fused") or fast.defaults.get("foreach")
        for step in range(5):
            x = torch.randn(16, 5, generator=torch.Generator().manual_seed(step))
            for model, optimizer in ((fast_model, fast), (slow_model, slow)):
                optimizer.zero_grad()
                model(x).pow(2).mean().backward()
                optimizer.step()
        for a, b in zip(fast_model.parameters(), slow_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_config_saved_before_a_trainer_field_existed_trains_with_its_default(tmp_path):
    """The Trainer reads the typed settings alone; ``trainer_settings`` (once per run) fills what an old config lacks."""
    from omegaconf import OmegaConf

    from lab_utils.core.config import TrainerConfig
    from lab_utils.harness.run import trainer_settings

    saved = OmegaConf.to_container(tiny_config(tmp_path / "old"))
    for field in ("ema_warmup", "data_on_device"):  # added after runs had been saved
        del saved["trainer"][field]
    old = OmegaConf.create(saved)
    settings = trainer_settings(old)
    assert isinstance(settings, TrainerConfig) and settings.ema_warmup is False and settings.data_on_device is False
    assert settings.steps == old.trainer.steps and settings.batch_size == old.trainer.batch_size
    assert train(old).step == old.trainer.steps
