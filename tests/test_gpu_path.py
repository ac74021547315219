"""The GPU path on a CPU: no host-device sync in any family's training step, the EMA warm-up and its fused
update, the GAN's frozen critic during the generator update, and the shared clock of several processes.

A CPU has no device to sync with, so :class:`HostSyncGuard` emulates one. It follows where every tensor made
during the step would live on a GPU: a tensor made by a factory without ``device=`` (``torch.rand(B)`` for the
caption dropout, ``torch.tensor(...)``) and anything computed from such tensors only is *host* memory by
design; the batch, the parameters, the buffers and everything computed from them is on the *device*. It fails
where a GPU would wait: a device tensor read on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool``,
``float``, ``int``, ``.numpy()``), a blocking host-to-device copy (``.to(device)`` of a host tensor without
``non_blocking=True``), or a host tensor of several elements combined with device tensors (which copies it).
A 0-dim host tensor combined with device tensors is read as a plain scalar (no copy), as CUDA does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lab_utils.core.config import compose
from lab_utils.core.data import build_dataset
from lab_utils.core.registry import build_lab
from lab_utils.harness import distributed
from lab_utils.harness.ema import EMA
from lab_utils.harness.run import trainer_settings
from lab_utils.harness.step_context import TrainingStepContext
from lab_utils.harness.trainer import Trainer
from labs.text_encoder import Tokenizer

from conftest import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")

_HOST = "_genlab_host_memory"  # the attribute that marks a tensor as host memory by design


def is_host(tensor: torch.Tensor) -> bool:
    return getattr(tensor, _HOST, False)


class HostSync(AssertionError):
    """The training step did something that makes the host wait for the GPU."""


_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _moves_to_a_device(func, args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device (``.to(dtype)`` alone keeps the tensor where it is)."""
    if func is torch.Tensor.cuda or kwargs.get("device") is not None:
        return True
    return any(isinstance(arg, (torch.device, str, torch.Tensor)) for arg in args[1:])


class HostSyncGuard(TorchFunctionMode):
    """Fails on a host-device sync of the code run inside it (see the module docstring), except inside
    :meth:`paused` (the data loader: it reads host memory by design and moves the batch with non_blocking)."""

    active: "HostSyncGuard | None" = None

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        super().__init__()
        self.monkeypatch = monkeypatch
        self.pauses = 0

    @classmethod
    @contextlib.contextmanager
    def paused(cls):
        guard = cls.active
        if guard is not None:
            guard.pauses += 1
        try:
            yield
        finally:
            if guard is not None:
                guard.pauses -= 1

    def __enter__(self):
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def guarded(tensor, *args, _original=original, _name=name, **kwargs):
                if not self.pauses and not is_host(tensor):
                    raise HostSync(f"Tensor.{_name}() of a device tensor {tuple(tensor.shape)} in the training step")
                return _original(tensor, *args, **kwargs)

            self.monkeypatch.setattr(torch.Tensor, name, guarded)
        HostSyncGuard.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        HostSyncGuard.active = None
        self.monkeypatch.undo()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pauses:
            return func(*args, **kwargs)
        inputs = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        host = [tensor for tensor in inputs if is_host(tensor)]
        if func in _MOVES and inputs and inputs[0] is args[0] and _moves_to_a_device(func, args, kwargs):
            if is_host(args[0]) and not kwargs.get("non_blocking", False):
                raise HostSync(f"a blocking copy of a host tensor {tuple(args[0].shape)} to the device")
            return func(*args, **kwargs)  # now on the device (not marked)
        if host and len(host) < len(inputs) and any(tensor.ndim > 0 for tensor in host):
            raise HostSync(f"{getattr(func, '__name__', func)} mixes a host tensor with device tensors (a copy)")
        out = func(*args, **kwargs)
        factory_on_host = not inputs and kwargs.get("device") is None
        if factory_on_host or (inputs and len(host) == len(inputs)):
            for leaf in tree_flatten(out)[0]:
                if isinstance(leaf, torch.Tensor):
                    setattr(leaf, _HOST, True)
        return out


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as patch, HostSyncGuard(patch):
        yield


def test_the_guard_fails_on_what_a_gpu_would_wait_for(monkeypatch):
    weight = torch.randn(3)  # made outside: stands for a parameter on the device
    with no_host_sync(monkeypatch):
        drop = torch.rand(4).lt(0.5).tolist()  # host memory by design: allowed
        assert len(drop) == 4
        assert (weight * torch.tensor(2.0)).shape == (3,)  # a 0-dim host scalar: no copy
        on_device = torch.ones(3, device=weight.device) * weight
        for read in (lambda: on_device.sum().item(), lambda: on_device.tolist(), lambda: on_device.cpu(),
                     lambda: bool(on_device.sum() > 0), lambda: float(on_device.sum()), lambda: int(on_device[0])):
            with pytest.raises(HostSync):
                read()
        with pytest.raises(HostSync, match="blocking copy"):
            torch.tensor([1, 2]).to(weight.device)
        torch.tensor([1, 2]).to(weight.device, non_blocking=True)  # queued on the stream: allowed
        with pytest.raises(HostSync, match="mixes"):
            weight + torch.tensor([1.0, 2.0, 3.0])
    assert weight.sum().item() == weight.sum().item()  # undone after the block


# --------------------------------------------------------------------------- one step of each family
def family_trainer(model: str, tmp_path: Path, *overrides: str) -> Trainer:
    """A smoke-sized trainer for ``model`` on a small `shapes` subset, with the GPU preset's NaN guard
    (``nan_check=log``: ``step`` syncs by design)."""
    cfg = compose([f"model={model}", "data=shapes", "preset=smoke", "data.subset=32", "trainer.batch_size=4",
                   "trainer.nan_check=log", *overrides])
    train_set = build_dataset(cfg.data, "train")
    info = train_set.data_info()
    torch.manual_seed(cfg.seed)
    return Trainer(cfg, trainer_settings(cfg), tmp_path, build_lab(cfg, info), train_set, info, torch.device("cpu"))


def guarded_step(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """One ``trainer.run_step()`` with ``lab.training_step`` and the EMA update under :class:`HostSyncGuard`;
    the values the step returns must be device tensors (a Python number or a host tensor would be copied to the
    device by the harness right after, a sync)."""
    lab, ema = trainer.lab, trainer.ema
    step, update = lab.training_step, ema.update
    returned: dict[str, Any] = {}

    def training_step(batch, ctx):
        with no_host_sync(monkeypatch):
            out = step(batch, ctx)
        returned.update(out)
        return out

    def ema_update(model, at):
        with no_host_sync(monkeypatch):
            update(model, at)

    next_batch = TrainingStepContext.next_batch

    def unguarded_next_batch(ctx):  # the loader runs on the host (or in worker processes) by design
        with HostSyncGuard.paused():
            return next_batch(ctx)

    with monkeypatch.context() as patch:
        patch.setattr(lab, "training_step", training_step)
        patch.setattr(ema, "update", ema_update)
        patch.setattr(TrainingStepContext, "next_batch", unguarded_next_batch)
        named, _ = trainer.run_step()
    for key, value in returned.items():
        assert isinstance(value, torch.Tensor) and not is_host(value), f"{key} is not a device tensor"
    assert all(torch.isfinite(value).all() for value in named.values())  # read after the step: allowed
    return named


@pytest.mark.parametrize("model", ["dcgan", "vae", "ddpm", "flow"])
def test_a_training_step_makes_no_host_sync(model, tmp_path, monkeypatch):
    trainer = family_trainer(model, tmp_path)
    guarded_step(trainer, monkeypatch)  # the first step creates the optimiser state and the scheduler's table
    guarded_step(trainer, monkeypatch)


def test_both_latent_diffusion_stages_make_no_host_sync(tmp_path, monkeypatch):
    trainer = family_trainer("ldm", tmp_path, "model.autoencoder_steps=1")
    guarded_step(trainer, monkeypatch)  # stage 1: the autoencoder
    # The first step of stage 2 measures the scale factor once per run (float(1 / std(z))): a sync by design,
    # not on the path of any other step.
    trainer.run_step()
    named = guarded_step(trainer, monkeypatch)  # stage 2: the latent DDPM
    assert "loss/diffusion" in named


# --------------------------------------------------------------------------- the tokenizer on a device
def test_the_tokenizer_builds_the_same_batch_on_the_cpu_and_copies_pinned_memory_to_cuda(monkeypatch):
    tokenizer = Tokenizer(VOCAB, max_length=8)
    prompts = ["a red circle", "", "a small blue square at the top"]
    encoded = [tokenizer.encode(p) for p in prompts]
    length = max(map(len, encoded))
    expected = torch.tensor([ids + [tokenizer.PAD_ID] * (length - len(ids)) for ids in encoded])  # (3, L)
    for device in (None, "cpu", torch.device("cpu")):
        ids, mask = tokenizer(prompts, device=device)
        assert ids.dtype == torch.long and torch.equal(ids, expected) and torch.equal(mask, expected != tokenizer.PAD_ID)
    # CUDA (mocked: no GPU here): pinned host memory, then a non-blocking copy; the mask is made on the device
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin", None)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", (a, k))) or self)
    ids, mask = tokenizer(prompts, device="cuda")
    assert calls == [("pin", None), ("to", ((torch.device("cuda"),), {"non_blocking": True}))]
    assert torch.equal(ids, expected) and torch.equal(mask, expected != tokenizer.PAD_ID)


def test_the_scheduler_keeps_one_table_per_device_with_the_same_numbers():
    from labs.diffusion.scheduler import NoiseScheduler, SchedulerConfig

    scheduler = NoiseScheduler(SchedulerConfig(num_train_timesteps=50))
    t = torch.tensor([-1, 0, 7, 49])
    x = torch.zeros(4, 1, 2, 2)
    got = scheduler.alpha_bar_at(t, x).flatten()
    expected = torch.cat([torch.ones(1, dtype=torch.float64), scheduler.alpha_bar[[0, 7, 49]]]).float()
    assert torch.equal(got, expected)  # float64, then cast: bit for bit
    assert scheduler._alpha_bar_on(t.device) is scheduler._alpha_bar_on(t.device)  # copied once per device


# --------------------------------------------------------------------------- the EMA warm-up
def linear_model() -> nn.Module:
    model = nn.Module()
    model.net = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.net.weight, 0.0)
    return model


def test_ema_warmup_follows_its_formula_and_is_capped_at_the_decay():
    model = linear_model()
    warm = EMA(model, ["net"], decay=0.9999, warmup=True)
    # d_t = min(d, (1 + t) / (10 + t)) with t = step - start - 1
    assert warm.decay_at(1) == pytest.approx(1 / 10)  # t = 0
    assert warm.decay_at(11) == pytest.approx(11 / 20)  # t = 10
    assert warm.decay_at(1001) == pytest.approx(1001 / 1010)  # t = 1000
    assert EMA(model, ["net"], decay=0.9, warmup=True).decay_at(1001) == 0.9  # capped: 1001/1010 > 0.9
    assert EMA(model, ["net"], decay=0.99, start=5, warmup=True).decay_at(6) == pytest.approx(0.1)  # t counts from start
    plain = EMA(model, ["net"], decay=0.9999)
    assert all(plain.decay_at(step) == 0.9999 for step in (1, 11, 1001))  # the default: no warm-up
    with torch.no_grad():
        model.net.weight.fill_(1.0)
    warm.update(model, step=1)
    assert warm.shadow["net.weight"].item() == pytest.approx(0.9)  # 0.1 * 0 + 0.9 * 1: mostly the new weights


def test_fused_ema_update_with_warmup_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    ema = EMA(model, ["net"], decay=0.999, start=1, warmup=True)
    reference = {name: tensor.clone() for name, tensor in ema.shadow.items()}
    live = {f"net.{name}": tensor for name, tensor in
            list(model.net.named_parameters()) + list(model.net.named_buffers())}
    for step in range(1, 6):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param), alpha=0.1)
            model.net(torch.randn(2, 3, 6, 6))  # new BatchNorm statistics
        ema.update(model, step)
        for name, shadow in reference.items():  # the per-tensor loop
            if step <= 1:
                shadow.copy_(live[name])
            else:
                t = step - 1 - 1
                shadow.lerp_(live[name], 1 - min(0.999, (1 + t) / (10 + t)))
        for name in reference:
            assert torch.equal(ema.shadow[name], reference[name]), (step, name)  # float32, bit for bit
    assert "net.2.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged (as before)


def test_the_trainer_default_keeps_the_ema_without_warmup(tmp_path):
    trainer = family_trainer("vae", tmp_path)
    assert trainer.ema is not None and trainer.ema.warmup is False
    assert trainer.ema.decay_at(1) == trainer.settings.ema_decay


# --------------------------------------------------------------------------- the GAN's generator update
def _dcgan_steps(tmp_path: Path, freeze: bool, seen: dict[str, Any] | None = None) -> tuple[list[dict], dict]:
    """Three steps of ``family_trainer("dcgan")``: the named values of each step and the parameter sums after them.
    ``freeze=False`` is the reference: the critic's ``requires_grad_`` does nothing, so the generator update also
    computes the critic's weight gradients (the update before the critic was frozen)."""
    trainer = family_trainer("dcgan", tmp_path, "trainer.nan_check=step")
    lab = trainer.lab
    if not freeze:
        lab.critic.requires_grad_ = lambda requires_grad=True: lab.critic  # type: ignore[method-assign]
    steps = []
    for _ in range(3):
        named, _ = trainer.run_step()
        steps.append({key: value.item() for key, value in named.items()})
        if seen is not None:
            assert seen["frozen"] and all(p.requires_grad for p in lab.critic.parameters())  # frozen, then back
            for before, after in zip(seen["before"], seen["after"]):
                assert before is not None and torch.equal(before, after)  # no new .grad from the generator update
    sums = {name: sum(p.double().sum().item() for p in getattr(lab, name).parameters())
            for name in ("critic", "generator")}
    return steps, sums


def test_the_generator_update_leaves_the_critic_gradients_alone_and_the_numbers_unchanged(tmp_path, monkeypatch):
    """Freezing the critic during the generator update changes which gradients are computed, not the numbers: the
    losses, gradient norms and parameters of three steps match a reference run in this process whose critic is not
    frozen. Both runs do the same arithmetic on the same kernels of this machine, so the tolerance only absorbs a
    backward kernel that sums in another order when it also computes weight gradients (fp32: relative 1e-5 is ~100
    ulps, far below any change a frozen critic could make to a GAN step)."""
    reference_steps, reference_sums = _dcgan_steps(tmp_path / "reference", freeze=False)
    seen: dict[str, Any] = {}
    original = TrainingStepContext.optimize

    def spy(ctx, name, loss):
        critic = ctx._trainer.lab.critic
        if name == "generator":
            seen["before"] = [None if p.grad is None else p.grad.clone() for p in critic.parameters()]
            seen["frozen"] = not any(p.requires_grad for p in critic.parameters())
        out = original(ctx, name, loss)
        if name == "generator":
            seen["after"] = [None if p.grad is None else p.grad.clone() for p in critic.parameters()]
        return out

    monkeypatch.setattr(TrainingStepContext, "optimize", spy)
    steps, sums = _dcgan_steps(tmp_path / "frozen", freeze=True, seen=seen)
    assert [sorted(step) for step in steps] == [sorted(step) for step in reference_steps]
    for step, reference in zip(steps, reference_steps):
        for key, value in reference.items():
            assert step[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, value in reference_sums.items():
        assert sums[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


# --------------------------------------------------------------------------- the shared clock under DDP
def test_a_time_budget_over_several_processes_is_shared_only_at_log_rows(tmp_path, monkeypatch):
    from tiny_lab import TinyLab, tiny_config

    cfg = tiny_config(tmp_path)
    cfg.trainer.steps, cfg.trainer.log_every, cfg.trainer.max_seconds = 8, 4, 1e6
    cfg.trainer.checkpoint_every, cfg.trainer.sample_every = 100, 0
    train_set = build_dataset(cfg.data, "train")
    info = train_set.data_info()
    trainer = Trainer(cfg, trainer_settings(cfg), tmp_path, TinyLab(cfg.model, info), train_set, info,
                      torch.device("cpu"))
    trainer.dist = distributed.DistInfo(rank=0, world_size=2)  # rank 0 of two (no process group: nothing to send)
    flags: list[tuple[int, bool]] = []
    monkeypatch.setattr(distributed, "broadcast_flag", lambda flag, device: flags.append((trainer.step, flag)) or flag)
    result = trainer.fit()
    assert result.step == 8
    assert flags == [(0, False), (4, False), (8, True)]  # before the loop, then every log_every steps


# --------------------------------------------------------------------------- the optimiser's kernel
def test_adam_takes_the_fused_kernel_of_the_parameters_device_and_falls_back_to_foreach(tmp_path, monkeypatch):
    """The labs' optimisers are built after the lab moved to its device, so they are fused on CUDA as on this CPU;
    where torch has no fused kernel for the parameters it refuses ``fused=True`` and they fall back to foreach."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    from lab_utils.core.lab import adam

    trainer = family_trainer("dcgan", tmp_path)
    assert {name: opt.defaults["fused"] for name, opt in trainer.optimizers.items()} == {"generator": True,
                                                                                          "critic": True}
    assert "cuda" in _get_fused_kernels_supported_devices()  # what adam(...) on CUDA parameters takes

    class NoFusedKernel(torch.optim.AdamW):  # torch's answer on a device it has no fused kernel for
        def __init__(self, params, fused=None, **options):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices")
            super().__init__(params, fused=fused, **options)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedKernel)
    fallback = adam(nn.Linear(3, 3).parameters(), lr=1e-3)
    assert isinstance(fallback, NoFusedKernel) and not fallback.defaults["fused"] and fallback.defaults["foreach"]


# --------------------------------------------------------------------------- sampling precision
def test_sampling_runs_in_the_training_precision_on_a_gpu_and_in_fp32_elsewhere():
    from lab_utils.harness.devices import sampling_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [sampling_precision(p, cuda) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert [sampling_precision(p, cpu) for p in ("bf16", "fp16", "fp32")] == ["fp32"] * 3  # CPU figures unchanged


class AutocastSpy:
    """Wraps ``lab.sample`` (or ``reconstruct``): records whether each call ran under a CPU autocast, and its dtype."""

    def __init__(self, method):
        self.method, self.calls = method, []

    def __call__(self, *args, **kwargs):
        enabled = torch.is_autocast_enabled("cpu")
        self.calls.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return self.method(*args, **kwargs)


def test_grids_and_evaluation_sample_under_the_sampling_autocast(tmp_path, monkeypatch):
    from lab_utils.commands.evaluation.sets import generate

    trainer = family_trainer("vae", tmp_path)
    assert trainer.sampling_precision == "fp32"  # a CPU run: grids exactly as before
    spy = AutocastSpy(trainer.lab.sample)
    monkeypatch.setattr(trainer.lab, "sample", spy)
    trainer.write_samples()
    trainer.sampling_precision = "bf16"  # what a bf16 run on CUDA samples in
    trainer.write_samples()
    assert spy.calls == [None, torch.bfloat16]
    images, _ = generate(trainer.lab, ["a red circle"] * 3, 0, 2, {}, torch.device("cpu"), "bf16")
    assert spy.calls[2:] == [torch.bfloat16] * 2 and images.dtype == torch.uint8 and images.shape[0] == 3
    generate(trainer.lab, ["a red circle"], 0, 2, {}, torch.device("cpu"))
    assert spy.calls[-1] is None  # evaluation's default: fp32
