r"""The noise scheduler: the mathematics of DDPM and DDIM, with no network and no parameters.

Everything here follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM),
Song et al. 2020, "Denoising Diffusion Implicit Models" (DDIM), Nichol & Dhariwal 2021,
"Improved DDPM" (cosine schedule) and Salimans & Ho 2022, "Progressive Distillation" (v).
Like diffusers' ``DDPMScheduler``, the scheduler knows the schedule $\beta_1..\beta_T$, the
closed-form forward process (:meth:`NoiseScheduler.add_noise`, used for training) and one
reverse update per sampler (:meth:`NoiseScheduler.ddpm_step`, :meth:`NoiseScheduler.ddim_step`,
used by the sampling loops in ``labs/diffusion/sampling.py``); the network only predicts.

Indexing: the code's ``t`` runs over ``0 .. T-1`` and is the paper's $t = 1..T$; ``t = -1``
stands for "no noise at all", $\bar\alpha_{-1} = 1$ (the paper's $\bar\alpha_0 = 1$).
The schedule is kept in float64 on the CPU, copied once to each device a (B,) ``t`` lives on (so
training and sampling index it without a host round trip), and cast to the data's dtype on use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


PREDICTION_TYPES = ("eps", "v", "x0", "edm")


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000  # T, the number of noise levels of the forward process (Ho et al.'s 1000)
    # linear (Ho et al.) | cosine (Nichol & Dhariwal), which wastes fewer steps near pure noise at 32 px than linear
    beta_schedule: str = "cosine"
    beta_start: float = 1e-4  # beta_1 of the linear schedule (Ho et al. sec. 4)
    beta_end: float = 0.02  # beta_T of the linear schedule
    cosine_s: float = 0.008  # offset s of the cosine schedule (Nichol & Dhariwal eq. 17)
    max_beta: float = 0.999  # the cosine schedule's betas are clipped here (near t = T)
    # SNR(t) divided by snr_shift^2 at every t: the schedule shifted towards noise (Hoogeboom et al. 2023,
    # "simple diffusion", sec. 3.1; Esser et al. 2024 sec. 5.3.2), so more training and sampling steps fall at high
    # noise. 1 = the schedule as defined above.
    snr_shift: float = 1.0
    # What the network predicts (see NoiseScheduler.target): eps (Ho et al.) | v (Salimans & Ho) | x0 |
    # edm (Karras et al.'s preconditioning)
    prediction_type: str = "eps"
    # The data's standard deviation in EDM's preconditioning (Karras et al. 2022, Table 1), prediction_type edm only.
    # v is edm with sigma_data = 1; shapes' pixels have std 0.30 (mostly background).
    sigma_data: float = 0.5
    variance_type: str = "fixed_small"  # DDPM sampler variance: fixed_small (beta_tilde) | fixed_large (beta)
    clip_x0: bool = True  # clip the predicted x0 to [-clip_range, clip_range] while sampling
    clip_range: float = 1.0  # the data lies in [-1, 1]

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 1:
            raise ValueError(f"scheduler.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"scheduler.beta_schedule must be 'linear' or 'cosine', got {self.beta_schedule!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"scheduler needs 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0.0 < self.max_beta < 1.0:
            raise ValueError(f"scheduler.max_beta must be in (0, 1), got {self.max_beta}")
        if self.snr_shift <= 0:
            raise ValueError(f"scheduler.snr_shift must be positive (1 = no shift), got {self.snr_shift}")
        if self.cosine_s < 0:
            raise ValueError(f"scheduler.cosine_s must be >= 0, got {self.cosine_s}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                             f"got {self.prediction_type!r}")
        if not self.sigma_data > 0:  # NaN fails too
            raise ValueError(f"scheduler.sigma_data must be positive, got {self.sigma_data}")
        if self.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"scheduler.variance_type must be 'fixed_small' or 'fixed_large', got {self.variance_type!r}")
        if self.clip_range <= 0:
            raise ValueError(f"scheduler.clip_range must be positive, got {self.clip_range}")


@dataclass
class SchedulerStep:
    """One reverse step: the less noisy sample and the x0 the network's prediction implies."""

    prev_sample: torch.Tensor  # x_{t_prev}, (B, C, H, W)
    pred_x0: torch.Tensor  # \hat x_0 (clipped if clip_x0), (B, C, H, W)


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    r"""$\beta_t$ evenly spaced from $\beta_1$ to $\beta_T$ (Ho et al. sec. 4). (T,) float64."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    r"""$\bar\alpha_t = f(t)/f(0)$, $f(t) = \cos^2\!\big(\frac{t/T + s}{1 + s}\frac{\pi}{2}\big)$
    (Nichol & Dhariwal eq. 17), so $\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1}$, clipped at ``max_beta``."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T  # t/T for t = 0..T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # f(t), (T+1,)
    alpha_bar = f / f[0]  # alpha_bar_t = f(t) / f(0)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)  # beta_t, (T,)


def shift_snr(betas: torch.Tensor, shift: float, max_beta: float = 0.999) -> torch.Tensor:
    r"""The betas whose $\mathrm{SNR}'(t) = \mathrm{SNR}(t) / \mathrm{shift}^2$, i.e.
    $\log\mathrm{SNR}'(t) = \log\mathrm{SNR}(t) - 2\log\mathrm{shift}$ (Hoogeboom et al. 2023, eq. 4):
    $\bar\alpha'_t = \bar\alpha_t / (\bar\alpha_t + \mathrm{shift}^2(1 - \bar\alpha_t))$, then
    $\beta'_t = 1 - \bar\alpha'_t / \bar\alpha'_{t-1}$, clipped at ``max_beta``. (T,) float64.

    Uniform t then spends more of training, and a sampler's steps, at high noise, where the *layout* of
    an image is decided: on ``shapes`` a shape's position can be read from x_t only once SNR > ~0.03
    (t/T < 0.9 on the cosine schedule), so below that the prompt alone must say where it goes."""
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    shifted = alpha_bar / (alpha_bar + shift**2 * (1 - alpha_bar))
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return (1 - shifted / previous).clamp(max=max_beta)


class NoiseScheduler:
    """The schedule and the update rules. Holds tensors, but no ``nn.Parameter`` and no network."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.num_train_timesteps = T = cfg.num_train_timesteps
        self.prediction_type = cfg.prediction_type
        if cfg.beta_schedule == "linear":
            self.betas = linear_betas(T, cfg.beta_start, cfg.beta_end)  # beta_t, (T,)
        else:
            self.betas = cosine_betas(T, cfg.cosine_s, cfg.max_beta)  # beta_t, (T,)
        if cfg.snr_shift != 1.0:
            self.betas = shift_snr(self.betas, cfg.snr_shift, cfg.max_beta)
        # alpha_t = 1 - beta_t
        self.alphas = 1.0 - self.betas
        # alpha_bar_t = prod_{s <= t} alpha_s  (Ho et al., above eq. 4)
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (no noise before the first step)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t  (Ho et al. eq. 7)
        self.posterior_variance = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * self.betas
        self._tables: dict[torch.device, torch.Tensor] = {}  # alpha_bar copied to each device it is used on

    # ----------------------------------------------------------------- helpers
    def _alpha_bar_on(self, device: torch.device) -> torch.Tensor:
        r"""The $\bar\alpha$ table on ``device``, copied there once and kept (float32 where the device has no
        float64, as MPS): indexing it with a (B,) ``t`` on that device needs no host round trip."""
        table = self._tables.get(device)
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            source = self.alpha_bar.to(dtype=dtype)  # (T,), the same float64 values (cast on the CPU for MPS)
            if device.type == "cuda":  # from pinned memory, queued on the stream: no host sync even the first time
                table = source.pin_memory().to(device, non_blocking=True)
            else:
                table = source.to(device)
            self._tables[device] = table
        return table

    def _alpha_bar64(self, t: torch.Tensor | int) -> torch.Tensor:
        r"""$\bar\alpha_t$ with $\bar\alpha_{-1} = 1$: (B,) on ``t``'s device for a (B,) tensor ``t``,
        else a () float64 CPU tensor (which PyTorch combines with tensors on any device as a plain scalar)."""
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            table = self._alpha_bar_on(t.device)
            return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=table.dtype, device=t.device))
        level = int(t)
        return self.alpha_bar[level] if level >= 0 else torch.ones((), dtype=torch.float64)

    @staticmethod
    def _like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A () or (B,) coefficient cast and shaped to broadcast against ``like`` (B, C, H, W).

        A () coefficient stays on the CPU (a scalar operand, no copy to the device); a (B,) one is on
        ``like``'s device already (see ``_alpha_bar64``)."""
        if values.ndim == 0:
            return values.to(dtype=like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)  # (B, 1, 1, 1)

    def alpha_bar_at(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        r"""$\bar\alpha_t$ shaped to broadcast against ``like`` (B, C, H, W); $\bar\alpha_{-1} = 1$.

        ``t`` is an int (one level for the whole batch) or a (B,) tensor (one per sample)."""
        return self._like(self._alpha_bar64(t), like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        r"""Signal-to-noise ratio $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$ (Kingma et al. 2021), (B,) float32."""
        t = torch.as_tensor(t)
        alpha_bar = self._alpha_bar_on(t.device)[t]  # indexed on t's device
        return (alpha_bar / (1 - alpha_bar)).to(dtype=torch.float32)

    def level_of_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        r"""The noise level t (long, same shape and device) whose $\log\mathrm{SNR}(t)$ is nearest above ``log_snr``:
        draws of $\log\mathrm{SNR}$ from a continuous distribution (EDM's log-normal $\sigma$, the logit-normal times
        of rectified flow) turned into this schedule's discrete levels. $\log\mathrm{SNR}(t)$ falls with t."""
        table = self._alpha_bar_on(log_snr.device)
        log_snr_table = (table / (1 - table)).log().to(log_snr.dtype)  # (T,), decreasing
        # searchsorted needs ascending values: count the levels whose log-SNR is still >= the draw
        levels = torch.searchsorted(-log_snr_table, -log_snr.contiguous(), right=True) - 1
        return levels.clamp(0, self.num_train_timesteps - 1)

    # ------------------------------------------------------- forward process
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""Sample $x_t \sim q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t)I)$
        in closed form (Ho et al. eq. 4): $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$."""
        alpha_bar = self.alpha_bar_at(t, x0)  # (B, 1, 1, 1)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # x_t, (B, C, H, W)

    # -------------------------------------------- eps, v and x0 conversions
    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$ (Salimans & Ho sec. 4, appendix D)."""
        alpha_bar = self.alpha_bar_at(t, x0)
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0

    def x0_from_eps(self, xt: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}$ (eq. 4 solved for $x_0$)."""
        alpha_bar = self.alpha_bar_at(t, xt)
        return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def eps_from_x0(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$\epsilon = (x_t - \sqrt{\bar\alpha_t}\,x_0) / \sqrt{1-\bar\alpha_t}$."""
        alpha_bar = self.alpha_bar_at(t, xt)
        return (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    def x0_from_v(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\,v$."""
        alpha_bar = self.alpha_bar_at(t, xt)
        return alpha_bar.sqrt() * xt - (1 - alpha_bar).sqrt() * v

    def eps_from_v(self, xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$\epsilon = \sqrt{1-\bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,v$."""
        alpha_bar = self.alpha_bar_at(t, xt)
        return (1 - alpha_bar).sqrt() * xt + alpha_bar.sqrt() * v

    def edm_coefficients(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""EDM's preconditioning (Karras et al. 2022, Table 1) written for VP's $x_t$: $\hat x_0 = c_	ext{skip} x_t
        + c_	ext{out} F_	heta$. In EDM's terms $	ilde x = x_t / \sqrt{arlpha_t} = x_0 + \sigma\epsilon$ with
        $\sigma^2 = 1/\mathrm{SNR}$, $\hat x_0 = rac{\sigma_d^2}{\sigma^2 + \sigma_d^2}	ilde x
        + rac{\sigma\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}} F_	heta$; with $D = 1 - arlpha_t + arlpha_t\sigma_d^2$:

        $c_	ext{skip} = \sigma_d^2\sqrt{arlpha_t} / D$, $c_	ext{out} = \sigma_d\sqrt{1 - arlpha_t} / \sqrt D$.

        At low noise $\hat x_0 	o x_t$ (the network adds a correction), at high noise $\hat x_0 	o \sigma_d F_	heta$ (it
        predicts the image); the target $F^* = (x_0 - c_	ext{skip} x_t) / c_	ext{out}$ has unit variance at every level
        when the data's std is $\sigma_d$. $\sigma_d = 1$ gives $c_	ext{skip} = \sqrt{arlpha_t}$,
        $c_	ext{out} = \sqrt{1 - arlpha_t}$: $F^* = -v$."""
        alpha_bar = self._alpha_bar64(t)
        sd2 = self.cfg.sigma_data ** 2
        d = 1 - alpha_bar + alpha_bar * sd2
        c_skip = sd2 * alpha_bar.sqrt() / d
        c_out = self.cfg.sigma_data * (1 - alpha_bar).sqrt() / d.sqrt()
        return self._like(c_skip, like), self._like(c_out, like)

    def x0_weight(self, t: torch.Tensor) -> torch.Tensor:
        r"""$\lambda(t)$ such that the MSE of the network's target is $\lambda(t)\,\lVert\hat x_0 - x_0
Vert^2$: SNR (eps),
        SNR + 1 (v), 1 (x0), SNR + $1/\sigma_d^2$ (edm). (B,) float32: min-SNR divides by it (``diffusion_loss``)."""
        snr = self.snr(t)
        if self.prediction_type == "eps":
            return snr
        if self.prediction_type == "v":
            return snr + 1
        if self.prediction_type == "x0":
            return torch.ones_like(snr)
        return snr + 1 / self.cfg.sigma_data ** 2

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""What the network is trained to predict: $\epsilon$ (Ho et al.), $v$ (Salimans & Ho), $x_0$ itself, or
        EDM's $F^* = (x_0 - c_	ext{skip} x_t) / c_	ext{out}$ (:meth:`edm_coefficients`)."""
        if self.prediction_type == "x0":
            return x0
        if self.prediction_type == "edm":
            c_skip, c_out = self.edm_coefficients(t, x0)
            return (x0 - c_skip * self.add_noise(x0, eps, t)) / c_out
        return eps if self.prediction_type == "eps" else self.velocity(x0, eps, t)

    def pred_x0(self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        r"""$\hat x_0$ from the network's output (eps, v, x0 or EDM's F), clipped to the data range if ``clip_x0``."""
        if self.prediction_type == "x0":
            x0 = model_output
        elif self.prediction_type == "edm":
            c_skip, c_out = self.edm_coefficients(t, xt)
            x0 = c_skip * xt + c_out * model_output
        elif self.prediction_type == "eps":
            x0 = self.x0_from_eps(xt, model_output, t)
        else:
            x0 = self.x0_from_v(xt, model_output, t)
        if self.cfg.clip_x0:
            x0 = x0.clamp(-self.cfg.clip_range, self.cfg.clip_range)
        return x0

    # ------------------------------------------------------ reverse process
    def posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int, prev_t: torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of $q(x_{s} \mid x_t, x_0)$ for $s$ = ``prev_t`` < t (default t - 1), Ho et al. eq. 6-7:

        $\tilde\mu = \frac{\sqrt{\bar\alpha_s}\,\beta_{t|s}}{1-\bar\alpha_t} x_0
        + \frac{\sqrt{\alpha_{t|s}}\,(1-\bar\alpha_s)}{1-\bar\alpha_t} x_t$,
        $\tilde\beta = \frac{1-\bar\alpha_s}{1-\bar\alpha_t}\beta_{t|s}$,
        with $\alpha_{t|s} = \bar\alpha_t / \bar\alpha_s$ and $\beta_{t|s} = 1 - \alpha_{t|s}$
        (for $s = t-1$ these are $\alpha_t$ and $\beta_t$; the general form lets DDPM skip steps).
        """
        if prev_t is None:
            prev_t = torch.as_tensor(t) - 1
        alpha_bar = self._alpha_bar64(t)  # alpha_bar_t (coefficients in float64, then cast)
        alpha_bar_prev = self._alpha_bar64(prev_t)  # alpha_bar_s
        alpha = alpha_bar / alpha_bar_prev  # alpha_{t|s}
        beta = 1 - alpha  # beta_{t|s}
        coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
        coef_xt = alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = self._like(coef_x0, xt) * x0 + self._like(coef_xt, xt) * xt  # mu_tilde(x_t, x_0)
        variance = self._like((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, xt)  # beta_tilde
        return mean, variance

    def inference_timesteps(self, steps: int) -> torch.Tensor:
        """The ``steps`` noise levels a sampler visits, from T-1 down to 0, evenly spaced (long, (steps,)).

        ``steps = T`` visits every level (the DDPM sampler of Ho et al.)."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}] (num_train_timesteps), got {steps}")
        if steps == 1:
            return torch.tensor([T - 1])
        return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()  # (steps,)

    def ddpm_step(
        self, model_output: torch.Tensor, t: int, xt: torch.Tensor, prev_t: int | None = None,
        generator: torch.Generator | None = None,
    ) -> SchedulerStep:
        r"""Ancestral sampling, $x_{t-1} \sim p_\theta(x_{t-1} \mid x_t)$ (Ho et al. Algorithm 2):

        $x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sigma_t z$, which for an unclipped
        $\hat x_0$ is eq. 11, $\frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta\big)$.
        $\sigma_t^2 = \tilde\beta_t$ (``fixed_small``) or $\beta_t$ (``fixed_large``), Ho et al. sec. 3.2;
        no noise is added on the last step. ``prev_t < t - 1`` skips levels (``steps < T``).
        """
        prev_t = t - 1 if prev_t is None else prev_t
        pred_x0 = self.pred_x0(model_output, xt, t)  # \hat x_0, clipped
        mean, variance = self.posterior_mean_variance(pred_x0, xt, t, prev_t)
        if self.cfg.variance_type == "fixed_large":
            variance = self._like(1 - self._alpha_bar64(t) / self._alpha_bar64(prev_t), xt)  # sigma^2 = beta_{t|s}
        if prev_t < 0:
            return SchedulerStep(prev_sample=mean, pred_x0=pred_x0)  # z = 0 on the last step
        z = randn_like(xt, generator)  # z ~ N(0, I)
        return SchedulerStep(prev_sample=mean + variance.sqrt() * z, pred_x0=pred_x0)

    def ddim_step(
        self, model_output: torch.Tensor, t: int, xt: torch.Tensor, prev_t: int, eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> SchedulerStep:
        r"""DDIM update (Song et al. eq. 12), from level t to level s = ``prev_t``:

        $x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z$,
        $\sigma = \eta\sqrt{(1-\bar\alpha_s)/(1-\bar\alpha_t)}\sqrt{1 - \bar\alpha_t/\bar\alpha_s}$ (eq. 16).
        $\eta = 0$ is deterministic (DDIM); $\eta = 1$ is DDPM's ancestral step with $\tilde\beta$.
        When $\hat x_0$ is clipped, $\hat\epsilon$ is recomputed from it (as GLIDE and diffusers do).
        """
        alpha_bar = self._alpha_bar64(t)  # alpha_bar_t
        alpha_bar_prev = self._alpha_bar64(prev_t)  # alpha_bar_s
        pred_x0 = self.pred_x0(model_output, xt, t)  # \hat x_0
        pred_eps = self.eps_from_x0(xt, pred_x0, t)  # \hat eps, consistent with the clipped \hat x_0
        # sigma_t(eta), eq. 16
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).clamp(min=0).sqrt()
        # "direction pointing to x_t", eq. 12
        direction = self._like((1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt(), xt) * pred_eps
        sigma, alpha_bar_prev = self._like(sigma, xt), self._like(alpha_bar_prev, xt)
        prev_sample = alpha_bar_prev.sqrt() * pred_x0 + direction  # x_s without noise
        if eta > 0 and prev_t >= 0:
            prev_sample = prev_sample + sigma * randn_like(xt, generator)  # + sigma_t z
        return SchedulerStep(prev_sample=prev_sample, pred_x0=pred_x0)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` only (never the global RNG).

    Drawn on the generator's device, then moved: a seed gives the same noise on CPU and GPU."""
    if generator is None:
        raise ValueError("sampling needs an explicit torch.Generator (the global RNG is left alone)")
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)
