r"""The VAE family: config, the training objective and the three ways to use a trained model.

Training maximises the (beta-weighted) ELBO of a conditional VAE, one reparameterised sample
per image (Kingma & Welling 2014, eq. 10; Higgins et al. 2017, eq. 4):

$\text{loss} = \mathbb E_{x, c}\big[-\log p_\theta(x \mid z, c) + \beta_t\, D_{KL}(q_\phi(z \mid x, c) \Vert \mathcal N(0, I))\big]$,
$z = \mu_\phi(x, c) + \sigma_\phi(x, c) \odot \epsilon$

where $c$ is the caption's pooled text vector, replaced by the empty prompt's with probability
``p_uncond`` (so the same model also samples unconditionally), and $\beta_t$ ramps up from 0
over ``kl_warmup_steps``. Using the model:

- ``sample``: $z \sim \mathcal N(0, I)$ (times ``temperature``), decode with the prompt;
- ``reconstruct``: decode the posterior mean $\mu_\phi(x, c)$;
- ``interpolate``: decode points on the path between two prior draws $z_0, z_1$ (slerp or linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from lab_utils.core.lab import DataInfo, Lab, SampleOptions, StepContext, adam, option
from labs.text_encoder import TextEncoder, TextEncoderConfig, Tokenizer, encode_prompts

from .elbo import (
    LIKELIHOODS, SIGMA_MODES, ELBOTerms, bits_per_dim, decoded_to_image, gaussian_kl, kl_divergence, kl_weight,
    negative_elbo,
    reconstruction_nll, reparameterize,
)
from .model import ConditionalPrior, ConvNetConfig, Decoder, Encoder, Posterior

INTERPOLATIONS = ("slerp", "linear")
PRIORS = ("learned", "standard")


@dataclass
class VAEConfig:
    """Schema and defaults of ``model=vae`` (the one home of its values; ``conf/model/vae.yaml`` only names it): a
    convolutional, text-conditional VAE (Kingma & Welling 2014) with its ELBO written out (``labs/vae/elbo.py``).
    The presets (``conf/preset_model/vae_{smoke,cpu,gpu}.yaml``) change the size and the budget."""

    _target_: str = "labs.vae.VAELab"
    name: str = "vae"
    # Z, the size of z: the caption gives shape/colour/size/position; z carries the rest (jitter, and everything for
    # empty or partial prompts). ~30 nats of KL fit easily in 16 dims
    latent_dim: int = 16
    # the pooled text vector enters the encoder and the decoder; false: a plain VAE that ignores prompts (no text
    # encoder)
    conditional: bool = True
    # probability of training on the empty prompt instead of the caption, so the prompt "" samples unconditionally
    # (as in the other families)
    p_uncond: float = 0.1
    # The prior of z. learned: p(z | c) = N(mu(c), s(c)^2), an MLP on the pooled prompt (ConditionalPrior; Sohn et
    # al. 2015), trained through the KL term; standard: N(0, I). With N(0, I) the encoder puts *where* the shape is
    # into z before the text path has learned the position words, the decoder reads position from z, and prior draws
    # land anywhere: position alignment stayed at chance (0.15-0.17 against 0.11) at the full cpu preset. A learned
    # prior may keep position in z; its mean learns where each prompt puts it. (An unconditional VAE has no prompt:
    # it always uses N(0, I).)
    prior: str = "learned"
    net: ConvNetConfig = field(default_factory=ConvNetConfig)  # the encoder, and the decoder as its mirror image
    # captions have < 12 words from a ~40-word vocabulary: a small encoder suffices
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=64, depth=2, heads=4))
    # The reconstruction term -log p(x | z, c). `shapes` is ~90% flat dark background, and a small shape covers ~40
    # of the 1024 pixels. The scale sigma of a Gaussian likelihood sets how many nats a pixel's error costs against
    # the KL, i.e. what is worth encoding. Measured after 800 steps (preset=cpu otherwise):
    #   sigma = 1 (the textbook N(x_hat, I)): an error costs only (x - x_hat)^2 / 2 nats, the KL settles at
    #     ~6 nats and reconstructions are soft blobs whose circle/square/triangle is hard to tell
    #     (reconstruction MSE 0.014);
    #   sigma = 0.2 fixed (the default): 12.5x dearer errors, KL ~33 nats, crisp edges and the right shape
    #     (MSE 0.007 after 800 steps, 0.002 after the cpu preset's 1500).
    #   sigma learned (one global log sigma, Rybkin et al. 2021): it tracks the RMS error (an early run went
    #     from 0.1 up to 0.18 in 500 steps), so it is loose while the model is poor and tightens as it
    #     improves. A fine option, not tuned for these presets.
    # gaussian | discretized_gaussian (8-bit bins: honest bits/dim) | bernoulli (BCE on [0, 1])
    likelihood: str = "gaussian"
    sigma: str = "fixed"  # Gaussian likelihoods: one global sigma for all pixels, fixed or learned
    sigma_init: float = 0.2  # the fixed sigma, or the learned one's start (in [-1, 1] pixel units)
    sigma_min: float = 0.02  # floor of the learned sigma (keeps the density, and the loss, bounded)
    beta: float = 1.0  # KL weight (beta-VAE); 1 = the true ELBO
    # beta_t ramps linearly from 0 to beta over this many steps (Bowman et al. 2016): the decoder learns to use z first
    kl_warmup_steps: int = 200
    # false (with beta=0): z = mu, a plain deterministic autoencoder (notebook 02's starting point)
    sample_posterior: bool = True
    # std of the prior draws at sampling time (1 = the prior itself; < 1 = cleaner, less varied)
    temperature: float = 1.0
    interpolation: str = "slerp"  # slerp (stays on the Gaussian shell) | linear path between z0 and z1
    # AdamW learning rate of the encoder and decoder: a small ConvNet tolerates 2e-3 with warm-up and clipping
    lr: float = 2e-3
    # ... and of the text encoder: at 2e-3 it collapses every prompt onto one direction within ~100 steps (pooled
    # vectors at cosine ~1) and only colour gets through
    text_lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    # What a key meant in a config saved before it existed (lab_utils.core.config.saved_model_config fills it in):
    # runs saved before the option had N(0, I), so their checkpoints (no prior weights) load unchanged.
    SAVED_WITHOUT: ClassVar[dict[str, Any]] = {"prior": "standard"}

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.prior not in PRIORS:
            raise ValueError(f"prior must be one of {list(PRIORS)}, got {self.prior!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {self.likelihood!r}")
        if self.sigma not in SIGMA_MODES:
            raise ValueError(f"sigma must be one of {list(SIGMA_MODES)}, got {self.sigma!r}")
        if not 0.0 < self.sigma_min <= self.sigma_init:
            raise ValueError(f"need 0 < sigma_min <= sigma_init, got sigma_min={self.sigma_min}, "
                             f"sigma_init={self.sigma_init}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.lr <= 0 or self.text_lr <= 0:
            raise ValueError(f"lr and text_lr must be positive, got lr={self.lr}, text_lr={self.text_lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


class VAEOutput(NamedTuple):
    """One forward pass: the decoded batch and the posterior it came from."""

    recon: torch.Tensor  # (B, C, H, W) decoder output: Gaussian mean or Bernoulli logits
    mu: torch.Tensor  # (B, Z)
    logvar: torch.Tensor  # (B, Z)
    z: torch.Tensor  # (B, Z) the latent that was decoded
    c: torch.Tensor | None = None  # (B, D_c) the pooled text vectors, None for an unconditional VAE


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r"""Spherical interpolation (Shoemake 1985; White 2016 for latents):
    $\frac{\sin((1-t)\Omega)}{\sin\Omega} z_0 + \frac{\sin(t\Omega)}{\sin\Omega} z_1$, $\cos\Omega = \hat z_0 \cdot \hat z_1$.

    Stays near the shell of radius $\sqrt{Z}$ where Gaussian draws live, whereas the midpoint of a
    straight line is shorter by about $\sqrt 2$. z0, z1: (B, Z); t: (N,) -> (B, N, Z).
    """
    cos_omega = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1 + 1e-7, 1 - 1e-7)  # (B,)
    omega = torch.acos(cos_omega)[:, None, None]  # (B, 1, 1)
    t = t[None, :, None]  # (1, N, 1)
    w0 = torch.sin((1 - t) * omega) / torch.sin(omega)  # (B, N, 1)
    w1 = torch.sin(t * omega) / torch.sin(omega)
    return w0 * z0[:, None] + w1 * z1[:, None]  # (B, N, Z)


@dataclass
class VAESampleOptions(SampleOptions):
    """What ``VAELab.sample`` (and ``interpolate``) take; the default is the model's ``temperature`` (``VAEConfig``,
    its one home: ``VAELab.sampling_defaults``)."""

    temperature: float = option(min=0.0, help="std of the prior draws (1 = the prior; < 1 = cleaner, less varied)")


class VAELab(Lab):
    """A (conditional) convolutional VAE: text encoder, encoder, decoder and the ELBO."""

    Config = VAEConfig
    SampleOptions = VAESampleOptions
    ddp_find_unused_parameters = False  # every update uses every parameter

    def __init__(self, config: VAEConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        config = self.config  # the typed config (Lab.__init__)
        C, S = data_info.channels, data_info.image_size
        self.image_shape = (C, S, S)
        cond_dim = config.text.dim if config.conditional else 0
        if config.conditional:
            self.tokenizer = Tokenizer(data_info.vocab, max_length=config.text.max_length)
            self.text_encoder = TextEncoder(config.text, self.tokenizer.vocab_size)
        self.encoder = Encoder(config.net, C, S, config.latent_dim, cond_dim)
        self.decoder = Decoder(config.net, C, S, config.latent_dim, cond_dim)
        self.learned_prior = config.conditional and config.prior == "learned"  # an unconditional VAE has no c
        if self.learned_prior:
            self.prior = ConditionalPrior(cond_dim, config.latent_dim, config.net.hidden_dim)
        # log sigma of the Gaussian likelihood: one global value, a parameter only when learned
        log_sigma = torch.tensor(math.log(config.sigma_init))
        if config.sigma == "learned" and config.likelihood != "bernoulli":
            self.log_sigma = torch.nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    # ------------------------------------------------------------------ the model
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | None:
        """The pooled text vectors c: (B, D_c), or None for an unconditional VAE."""
        if not self.config.conditional:
            return None
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), device=self.device).pooled

    def prior_of(self, c: torch.Tensor | None, n: int) -> Posterior:
        """(mu, logvar) of the prior for ``n`` prompts with pooled vectors ``c``: p(z | c), or N(0, I)."""
        if self.learned_prior:
            mu, logvar = self.prior(c)
            return Posterior(mu.float(), logvar.float())
        zeros = torch.zeros(n, self.config.latent_dim, device=self.device)
        return Posterior(zeros, zeros)

    def likelihood_log_sigma(self) -> torch.Tensor:
        """The Gaussian likelihood's log sigma, floored at log(sigma_min) (a 0-dim tensor)."""
        return self.log_sigma.clamp(min=math.log(self.config.sigma_min))

    def forward(self, x0: torch.Tensor, prompts: list[str], generator: torch.Generator | None = None) -> VAEOutput:
        """Encode, draw z = mu + sigma * eps (or take z = mu), decode. x0: (B, C, H, W) in [-1, 1]."""
        c = self.encode_prompts(prompts)  # (B, D_c) or None
        mu, logvar = self.encoder(x0, c)  # 2 x (B, Z)
        z = reparameterize(mu, logvar, generator=generator) if self.config.sample_posterior else mu  # (B, Z)
        return VAEOutput(recon=self.decoder(z, c), mu=mu, logvar=logvar, z=z, c=c)

    def elbo_terms(self, x0: torch.Tensor, prompts: list[str], beta: float = 1.0,
                   generator: torch.Generator | None = None) -> ELBOTerms:
        """Reconstruction, KL and beta-weighted loss of a batch, each (B,) in nats per image."""
        out = self(x0, prompts, generator)
        log_sigma = self.likelihood_log_sigma()
        recon = reconstruction_nll(self.config.likelihood, x0, out.recon.float(), log_sigma)  # -log p(x|z)
        if self.learned_prior:  # D_KL(q(z|x, c) || p(z|c))
            kl = gaussian_kl(out.mu.float(), out.logvar.float(), *self.prior_of(out.c, len(x0)))
        else:  # D_KL(q(z|x) || N(0, I))
            kl = kl_divergence(out.mu.float(), out.logvar.float())
        return negative_elbo(recon, kl, beta)  # recon + beta * KL

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        text = list(self.text_encoder.parameters()) if self.config.conditional else []
        text_ids = {id(p) for p in text}
        groups = [{"params": [p for p in self.parameters() if id(p) not in text_ids]}]
        if text:
            groups.append({"params": text, "lr": self.config.text_lr})
        return {"model": adam(groups, lr=self.config.lr, betas=tuple(self.config.betas),
                              weight_decay=self.config.weight_decay)}

    def ema_modules(self) -> list[str]:
        return (["encoder", "decoder"] + (["text_encoder"] if self.config.conditional else [])
                + (["prior"] if self.learned_prior else []))

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        # Maximise the beta-ELBO: minimise -log p(x|z,c) + beta_t KL(q(z|x,c) || N(0, I)), all networks together.
        x0, captions = batch["image"], list(batch["caption"])
        drop = torch.rand(len(captions)).lt(self.config.p_uncond).tolist()  # caption dropout: c <- ""
        prompts = ["" if dropped else caption for caption, dropped in zip(captions, drop)]
        beta = kl_weight(ctx.step, self.config.beta, self.config.kl_warmup_steps)  # beta_t

        def elbo_loss() -> dict[str, Any]:
            terms = self.elbo_terms(x0, prompts, beta)
            # nats per image, averaged over the batch; the per-image terms (B,) for the statistics
            return {"loss": terms.loss.mean(), "recon": terms.recon, "kl": terms.kl}

        out = ctx.optimize("model", elbo_loss)
        loss = out["loss"]
        dims = x0[0].numel()  # D = C * H * W
        negative = (out["recon"] + out["kl"]).detach().mean()  # -ELBO (beta = 1)
        stats = {
            "loss": loss.detach(),
            "stats/recon_nats": out["recon"].detach().mean(),
            "stats/kl_nats": out["kl"].detach().mean(),
            "stats/elbo_nats": -negative,
            "stats/bits_per_dim": bits_per_dim(negative, dims, self.config.likelihood),
            "stats/beta": torch.full((), float(beta), device=loss.device),  # filled on the device: no copy to it
        }
        if self.config.likelihood != "bernoulli":
            stats["stats/sigma"] = self.likelihood_log_sigma().detach().exp()
        return stats

    # ------------------------------------------------------------------ using the model
    @torch.no_grad()
    def decode(self, z: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Images for latents z: (N, Z) and their prompts, (N, C, H, W) in [-1, 1]."""
        return self._decode(z, self.encode_prompts(prompts))

    def _decode(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Images for latents z: (N, Z) and pooled prompt vectors ``c`` (or None), in [-1, 1]."""
        decoded = self.decoder(z.to(self.device), c)  # (N, C, H, W)
        return decoded_to_image(self.config.likelihood, decoded.float())

    def _noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """eps ~ N(0, I): (n, Z), from ``generator`` only (a freshly seeded one if None)."""
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # seeds this generator only, not the global RNG
        return torch.randn((n, self.config.latent_dim), generator=generator, device=generator.device).to(self.device)

    def prior_latents(self, eps: torch.Tensor, c: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """z = mu(c) + temperature * s(c) * eps: prior draws for eps (N, Z) and pooled prompts ``c``
        (N(0, I): z = temperature * eps)."""
        prior = self.prior_of(c, len(eps))
        return prior.mu + temperature * torch.exp(0.5 * prior.logvar) * eps  # (N, Z)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: VAESampleOptions | None = None, **given: Any) -> torch.Tensor:
        """z ~ p(z | c) (or N(0, I)) decoded with each prompt: (N, C, H, W) in [-1, 1] ("" = unconditional)."""
        temperature = self.sample_options(given, options).temperature
        prompts = list(prompts)
        c = self.encode_prompts(prompts)  # (N, D_c) or None: encoded once, for the prior and the decoder
        z = self.prior_latents(self._noise(len(prompts), generator), c, temperature)  # (N, Z)
        return self._decode(z, c)

    def sampling_defaults(self) -> VAESampleOptions:
        return VAESampleOptions(temperature=self.config.temperature)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Decode the posterior mean: x0 (N, C, H, W) in [-1, 1] -> (N, C, H, W) in [-1, 1]."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"reconstruct takes a (N, C, H, W) tensor of images, got {type(images).__name__}")
        if images.shape[1:] != torch.Size(self.image_shape):
            raise ValueError(f"images must be (N, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        c = self.encode_prompts(captions)
        mu, _ = self.encoder(images.to(self.device), c)  # (N, Z): z = mu, no sampling noise
        return decoded_to_image(self.config.likelihood, self.decoder(mu, c).float())

    @torch.no_grad()
    def interpolate(self, prompts: list[str], generator: torch.Generator | None = None,
                    interpolation: str | None = None, options: VAESampleOptions | None = None,
                    **given: Any) -> torch.Tensor:
        """Draw two prior latents and decode z_i on the path between them at t_i = i / (N - 1) with prompt i.

        ``interpolation``: slerp (default, see :func:`slerp`) or linear; ``options`` and keywords (the temperature)
        as for :meth:`sample`. -> (N, C, H, W) in [-1, 1]."""
        interpolation = self.config.interpolation if interpolation is None else str(interpolation)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
        temperature = self.sample_options(given, options).temperature
        prompts = list(prompts)
        n = len(prompts)
        # the path runs between two standard-normal draws eps0, eps1; each point is then mapped
        # through its prompt's prior (z = mu(c) + s(c) eps), which with N(0, I) is the path itself
        eps0, eps1 = self._noise(2, generator).chunk(2)  # 2 x (1, Z)
        t = torch.linspace(0, 1, n, device=self.device) if n > 1 else torch.zeros(1, device=self.device)  # (N,)
        if interpolation == "slerp":
            eps = slerp(eps0, eps1, t)[0]  # (N, Z)
        else:
            eps = torch.lerp(eps0, eps1, t[:, None])  # (1, Z), (N, 1) -> (N, Z): (1 - t) eps0 + t eps1
        c = self.encode_prompts(prompts)  # (N, D_c) or None
        return self._decode(self.prior_latents(eps, c, temperature), c)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the encoder, decoder, text encoder and the total."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in ("encoder", "decoder", "prior", "text_encoder") if hasattr(self, name)}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts
