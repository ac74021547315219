"""The flow lab: rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2023; the objective of Stable
Diffusion 3, Esser et al. 2024) with the text conditioning and classifier-free guidance of the DDPM.

    path.py      the straight path x_t = (1 - t) x0 + t eps, its velocity eps - x0, the training times
                 (logit-normal or uniform, SD3's shift) and the sampler's time grid (no network, no parameters)
    sampling.py  Euler and Heun steps of the ODE dx/dt = v from t = 1 to t = 0
    lab.py       FlowConfig, FlowSampleOptions (sampler, steps, guidance: the config's `sampling` and what `sample`
                 takes), flow_matching_loss, FlowLab (training step, sampling pipeline)
    exercises.py the notebook's check of flow_matching_loss (03_diffusion.ipynb, section 5)

    genlab train model=flow data=shapes preset=cpu
    genlab sample run=<dir> prompt="a red circle" sampler=heun steps=10 guidance=3 n=16

A composite lab: it imports ``labs.diffusion``, the lab it is built from (its UNet, its one sampling loop and
classifier-free guidance), besides the shared ``labs.text_encoder``. No other lab imports it.
"""

from .lab import FlowConfig, FlowLab, FlowSampleOptions, flow_matching_loss
from .path import add_noise, pred_x0, sample_times, shift_time, time_grid, velocity
from .sampling import SAMPLER_STEPS, euler_step, evaluations, heun_step

__all__ = [
    "SAMPLER_STEPS",
    "FlowConfig",
    "FlowLab",
    "FlowSampleOptions",
    "add_noise",
    "euler_step",
    "evaluations",
    "flow_matching_loss",
    "heun_step",
    "pred_x0",
    "sample_times",
    "shift_time",
    "time_grid",
    "velocity",
]
