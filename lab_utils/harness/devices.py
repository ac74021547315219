"""Where and in what precision the harness runs: the device, the effective precision and its autocast,
and the speed switches (TF32, channels_last, torch.compile) applied to a lab."""

from __future__ import annotations

import contextlib
import logging

import torch
from omegaconf import DictConfig

from lab_utils.core.lab import Lab

log = logging.getLogger("genlab.train")


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. An explicit device that is not there is an error.
    The device's backend is set up for it (:func:`backend_setup`)."""
    return backend_setup(find_device(name))


def find_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("trainer.device=mps but MPS is not available here; use trainer.device=auto or cpu")
    return torch.device(name)


def backend_setup(device: torch.device) -> torch.device:
    """cuDNN autotuning on CUDA, off elsewhere: a training step, an evaluation batch and a sampling step keep
    their shapes, so timing each convolution's algorithms once (on the first call with a shape) and keeping the
    fastest pays back within a few steps. It picks among algorithms of the same result up to rounding, and
    the CPU never reads it (CPU numbers do not change)."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16), where oneDNN runs bf16
    matmuls and convolutions several times faster than fp32; elsewhere bf16 is emulated and slower."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def effective_precision(precision: str, device: torch.device) -> str:
    """What ``trainer.precision`` trains in on ``device``: bf16 on CUDA and on CPUs that multiply bf16 in
    hardware, fp16 on CUDA only, fp32 everywhere else (emulated bf16 would be slower than fp32)."""
    if precision == "fp16" and device.type == "cuda":
        return "fp16"
    if precision == "bf16" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())):
        return "bf16"
    return "fp32"


def sampling_precision(precision: str, device: torch.device) -> str:
    """What a run trained in ``trainer.precision`` samples in (its grids, KID probes, evaluation and
    ``genlab bench``'s sampling): its training precision on CUDA (bf16: ~2x on tensor cores); fp32 on every
    other device, so a CPU's figures stay what they were whether or not it multiplies bf16 in hardware
    (``eval.precision`` asks for another)."""
    return effective_precision(precision, device) if device.type == "cuda" else "fp32"


def precision_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of ``trainer.precision`` on ``device`` (see ``effective_precision``)."""
    return autocast_for(effective_precision(precision, device), device)


def autocast_for(effective: str, device: torch.device) -> contextlib.AbstractContextManager:
    if effective == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if effective == "bf16" else torch.float16)


def speed_setup(lab: Lab, cfg: DictConfig, device: torch.device) -> Lab:
    """Apply the trainer's speed switches to a lab on ``device`` (TF32, channels_last, torch.compile)."""
    tcfg = cfg.trainer
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tcfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(tcfg.tf32)
    if tcfg.channels_last:
        lab = lab.to(memory_format=torch.channels_last)  # 4-d weights (convolutions) become NHWC
    if tcfg.compile:
        blocker = lab.compile_blocker()
        if blocker:
            raise ValueError(f"trainer.compile=true cannot train {cfg.model.name} as configured: {blocker}; "
                             "use trainer.compile=false")
        chosen = lab.compile_modules()
        for name, child in lab.named_children():
            if name in chosen:
                child.compile()  # in place: the state_dict keys do not change
                log.info("compiled %s.%s", type(lab).__name__, name)
            elif any(True for _ in child.parameters()):
                log.info("kept %s.%s eager (see %s.compile_modules)", type(lab).__name__, name, type(lab).__name__)
    return lab
