"""``genlab bench``: how fast a family trains and samples here, and how close that is to the hardware.

For each *variant* of the trainer's speed switches (``trainer.precision``, ``tf32``,
``channels_last``, ``compile``) it builds the lab afresh, runs ``bench.warmup_steps`` training
steps, then times ``bench.steps`` more with the device synchronised at both ends:

- ``eager_fp32``: every switch off, the plain baseline every ratio is taken against;
- ``preset``: the switches as the config sets them (what ``genlab train`` would use);
- one variant per switch turned on alone over the baseline (``bf16``, ``fp16``, ``tf32``,
  ``channels_last``, ``compile``), so each feature's gain shows as its own ratio.

Achieved FLOP/s = the FLOPs of one training step, counted by ``torch.utils.flop_counter`` on the
eager model (forward, backward and, for the GAN, the gradient penalty's double backward), times
steps per second. It is divided by the peak of a large matmul in the variant's compute dtype,
measured in the same run on the same device, so the fraction reads against what this machine
really does (not a datasheet). Sampling speed is measured per sampler the lab lists
(``Lab.benchmark_samplers``; for the DDPM per sampler and step count). Peak memory: CUDA's
allocator peak per variant; on CPU the process's peak resident set size (a high-water mark over
the whole run, so it only grows from one variant to the next).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lab_utils.core.config import validate
from lab_utils.core.schema import to_container
from lab_utils.core.schema import typed_section
from lab_utils.harness.devices import effective_precision

log = logging.getLogger("genlab.bench")

SWITCHES_OFF = {"precision": "fp32", "tf32": False, "channels_last": False, "compile": False}
FEATURES = {  # a feature turned on alone over the eager fp32 baseline
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "tf32": {"tf32": True},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
}
CUDA_ONLY = ("fp16", "tf32")


@dataclass
class BenchConfig:
    warmup_steps: int = 3  # untimed steps per variant (allocations, cuDNN autotuning, compilation)
    steps: int = 10  # timed training steps per variant
    # Images per timed sampling call; null = on CUDA evaluation's batch (the preset's compare.eval_batch_size,
    # else genlab eval's eval.batch_size default), so the figure is the speed evaluation samples at (a batch of
    # 16 is launch-bound on a GPU and unlike evaluation's); off CUDA cpu_sample_batch.
    sample_batch: Optional[int] = None
    # The batch of null off CUDA: evaluation's 250 images of guided DDPM-1000 would take ~25 minutes on 2 cores.
    cpu_sample_batch: int = 16
    # Variants to run; null = eager_fp32, preset and every feature that applies to the device
    # (compile only on CUDA by default: on a CPU its compile time outweighs a short benchmark).
    variants: Optional[list[str]] = None
    samplers: Optional[dict[str, Any]] = None  # {name: sample options}; null = the lab's benchmark_samplers()
    peak_size: Optional[int] = None  # n of the n x n matmul that measures the peak; null = 1024 CPU, 8192 CUDA

    def __post_init__(self) -> None:
        for name in ("steps", "sample_batch", "cpu_sample_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"bench.{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"bench.warmup_steps must be >= 0, got {self.warmup_steps}")
        known = ["eager_fp32", "preset", *FEATURES]
        unknown = [v for v in self.variants or [] if v not in known]
        if unknown:
            raise ValueError(f"bench.variants {unknown} are unknown; choose from {known}")


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["eager_fp32", "preset", *FEATURES]
    return ["eager_fp32", "preset", "bf16", "channels_last"]


def variant_switches(name: str, cfg: DictConfig) -> dict[str, Any]:
    if name == "preset":
        return {key: cfg.trainer[key] for key in SWITCHES_OFF}
    return {**SWITCHES_OFF, **FEATURES.get(name, {})}


def sampling_batch(options: BenchConfig, cfg: DictConfig, device: torch.device) -> int:
    """``bench.sample_batch``; else on CUDA evaluation's batch (the preset's ``compare.eval_batch_size``, else the
    ``eval.batch_size`` default of ``genlab eval``), and ``bench.cpu_sample_batch`` on other devices."""
    if options.sample_batch is not None:
        return options.sample_batch
    if device.type != "cuda":
        return options.cpu_sample_batch
    from lab_utils.commands.evaluation import EvalConfig

    compare = cfg.get("compare") or {}
    return int(compare.get("eval_batch_size") or EvalConfig.batch_size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_dtype(switches: dict[str, Any], device: torch.device) -> str:
    """The dtype the matmuls of a variant run in (what its peak is measured in)."""
    precision = effective_precision(switches["precision"], device)
    if precision != "fp32":
        return precision
    return "tf32" if switches["tf32"] and device.type == "cuda" else "fp32"


def matmul_peak(device: torch.device, dtype: str, size: int, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (tf32 = fp32 with TF32 allowed), after warm-up."""
    torch_dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        a = torch.randn(size, size, device=device, dtype=torch_dtype)
        b = torch.randn(size, size, device=device, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        synchronize(device)
        count, started = 0, time.perf_counter()
        while count < 3 or time.perf_counter() - started < seconds:
            a @ b
            count += 1
            if device.type == "cuda" and count % 10 == 0:
                synchronize(device)
        synchronize(device)
        return 2 * size**3 * count / (time.perf_counter() - started)  # 2 n^3 FLOPs per matmul
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def make_trainer(cfg: DictConfig, switches: dict[str, Any], train_set, data_info, device: torch.device,
                 run_dir: Path):
    from lab_utils.core.registry import build_lab
    from lab_utils.harness.devices import speed_setup
    from lab_utils.harness.run import trainer_settings
    from lab_utils.harness.trainer import Trainer

    variant = cfg.copy()
    OmegaConf.set_struct(variant, False)
    for key, value in switches.items():
        variant.trainer[key] = value
    variant = validate(variant)
    torch.manual_seed(cfg.seed)
    lab = speed_setup(build_lab(variant, data_info).to(device), variant, device)
    trainer = Trainer(variant, trainer_settings(variant), run_dir, lab, train_set, data_info, device)
    stages = lab.stages()
    if stages:  # a family trained in stages (the ldm) is timed on its last, main one: start there, set it up once
        trainer.step = max(stages.values())
        trainer.run_step()
    return trainer


class StepFlops(TorchDispatchMode):
    """Sums the FLOPs of every aten op run inside it, with ``torch.utils.flop_counter``'s formulas
    (matmuls, convolutions, attention; ops without a formula are decomposed or count 0).

    ``FlopCounterMode`` itself attributes FLOPs to modules with hooks that cannot follow
    ``torch.autograd.grad`` (the GAN's gradient penalty), so this counts the total only."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.total += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def count_step_flops(trainer) -> tuple[int, int]:
    """(FLOPs, images) of one training step, counted on the eager model."""
    with StepFlops() as counter:
        _, images = trainer.run_step()
    return counter.total, images


def time_training(trainer, bench: BenchConfig, device: torch.device) -> dict[str, float]:
    trainer.lab.train()
    for _ in range(bench.warmup_steps):
        trainer.run_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images, started = 0, time.perf_counter()
    for _ in range(bench.steps):
        _, drawn = trainer.run_step()
        images += drawn
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "steps_per_s": bench.steps / seconds,
            "peak_memory_mb": peak_memory_mb(device)}


@torch.no_grad()
def time_sampling(lab, samplers: dict[str, dict[str, Any]], batch: int, device: torch.device,
                  precision: str = "fp32") -> list[dict[str, Any]]:
    """Images/s of each sampler at ``batch`` images per call, under the autocast of ``precision`` (evaluation's)."""
    from lab_utils.commands.evaluation.evaluate import nfe_per_sample
    from lab_utils.harness.devices import autocast_for

    lab.eval()
    prompts = (list(lab.data_info.prompts) or [""]) * batch
    rows = []
    for name, options in samplers.items():
        options = dict(options)
        warm = {**options, "steps": min(int(options["steps"]), 3)} if "steps" in options else options
        with autocast_for(precision, device):
            lab.sample(prompts[:2], generator=torch.Generator(device=device).manual_seed(0), **warm)  # warm-up
            synchronize(device)
            started = time.perf_counter()
            lab.sample(prompts[:batch], generator=torch.Generator(device=device).manual_seed(0), **options)
            synchronize(device)
        seconds = time.perf_counter() - started
        rows.append({"sampler": name, "options": options, "nfe_per_image": nfe_per_sample(lab, options),
                     "images_per_s": batch / seconds, "seconds_per_image": seconds / batch})
        log.info("sampling %s: %.2f images/s", name, batch / seconds)
    return rows


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Run ``genlab bench`` for the composed ``conf/bench.yaml``; returns what it writes to bench.json."""
    from lab_utils.core.data import build_dataset
    from lab_utils.harness.devices import pick_device

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    options: BenchConfig = typed_section(cfg.get("bench") or {}, BenchConfig, "bench")
    cfg = validate(cfg)
    device = pick_device(cfg.trainer.device)
    names = options.variants or default_variants(device)
    skipped = [n for n in names if n in CUDA_ONLY and device.type != "cuda"]
    if skipped:
        log.warning("variants %s need CUDA; skipped on %s", skipped, device.type)
    names = [n for n in names if n not in skipped]
    if "eager_fp32" not in names:
        names = ["eager_fp32", *names]  # every ratio is against it
    train_set = build_dataset(cfg.data, "train")
    data_info = train_set.data_info()
    size = options.peak_size or (8192 if device.type == "cuda" else 1024)
    peaks: dict[str, float] = {}
    result: dict[str, Any] = {
        "model": cfg.model.name, "data": cfg.data.name, "preset": cfg.get("preset_name"), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": cfg.trainer.batch_size,
        "warmup_steps": options.warmup_steps, "steps": options.steps,
        "sample_batch": sampling_batch(options, cfg, device), "variants": [], "sampling": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            switches = variant_switches(name, cfg)
            row: dict[str, Any] = {"variant": name, "switches": switches}
            try:
                trainer = make_trainer(cfg, switches, train_set, data_info, device, Path(scratch))
                if name == "eager_fp32":
                    flops, images = count_step_flops(trainer)
                    result.update(parameters=sum(p.numel() for p in trainer.lab.parameters()),
                                  flops_per_step=flops, images_per_step=images)
                row.update(time_training(trainer, options, device))
                if name == "preset":
                    samplers = options.samplers or trainer.lab.benchmark_samplers()
                    result["sample_precision"] = trainer.sampling_precision  # evaluation's (bf16 on CUDA in gpu)
                    result["sampling"] = time_sampling(trainer.lab, samplers, result["sample_batch"], device,
                                                       trainer.sampling_precision)
                del trainer
            except Exception as err:  # one variant failing (e.g. compile + double backward) must not lose the rest
                row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                log.warning("variant %s failed: %s", name, row["error"])
                if name == "eager_fp32":
                    raise
            dtype = compute_dtype(switches, device)
            if dtype not in peaks:
                peaks[dtype] = matmul_peak(device, dtype, size)
            row["compute_dtype"] = dtype
            if "images_per_s" in row:
                row["achieved_flops"] = result["flops_per_step"] * row["steps_per_s"]
                row["fraction_of_peak"] = row["achieved_flops"] / peaks[dtype]
            result["variants"].append(row)
            log.info("variant %s: %s", name, row.get("error") or f"{row['images_per_s']:.1f} images/s")
    baseline = result["variants"][0]["images_per_s"]
    for row in result["variants"]:
        if "images_per_s" in row:
            row["speedup"] = row["images_per_s"] / baseline
    result["peak_flops"] = peaks
    result["peak_matmul_size"] = size
    result["config"] = to_container(cfg)
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def table(result: dict[str, Any]) -> str:
    lines = [f"genlab bench: {result['model']} on {result['data']} ({result['preset']}), {result['device_name']}, "
             f"{result['parameters'] / 1e6:.2f}M parameters, {result['flops_per_step'] / 1e9:.2f} GFLOP per step "
             f"({result['images_per_step']} images)", "",
             "| variant | images/s | x eager fp32 | GFLOP/s | peak GFLOP/s (dtype) | of peak | peak memory MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in result["variants"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error'][:80]} | | | | | |")
            continue
        peak = result["peak_flops"][row["compute_dtype"]]
        lines.append(f"| {row['variant']} | {row['images_per_s']:.1f} | {row['speedup']:.2f} | "
                     f"{row['achieved_flops'] / 1e9:.1f} | {peak / 1e9:.0f} ({row['compute_dtype']}) | "
                     f"{100 * row['fraction_of_peak']:.1f}% | {row['peak_memory_mb']:.0f} |")
    if result["sampling"]:
        lines += ["", f"Sampling, {result.get('sample_batch', '?')} images per call in "
                      f"{result.get('sample_precision', 'fp32')}:", "",
                  "| sampler | NFE/image | images/s | s/image |", "|---|---|---|---|"]
        for row in result["sampling"]:
            lines.append(f"| {row['sampler']} | {row['nfe_per_image']} | {row['images_per_s']:.2f} | "
                         f"{_fmt(row['seconds_per_image'])} |")
    return "\n".join(lines)


def bench_command_main(cfg: DictConfig) -> Path:
    result = bench(cfg)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out_dir / "bench.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {path}")
    return path
