r"""The GAN family: config, the two-player training step and sampling.

One training step (Gulrajani et al. 2017, Algorithm 1, with the text conditioning of a cGAN):

1. ``n_critic`` critic updates, each on a fresh real batch $(x, c)$ and fresh noise $z$:
   $\min_D\ \mathcal L_D = \mathbb E[D(G(z, c), c)] - \mathbb E[D(x, c)] + \lambda\,\mathbb E_{\hat x}[(\lVert\nabla_{\hat x} D(\hat x, c)\rVert_2 - 1)^2]$
   for ``wgan_gp`` (eq. 3), the hinge or the BCE critic loss otherwise (``losses.py``), plus the
   optional R1 penalty $\frac{\gamma}{2}\mathbb E_x\lVert\nabla_x D(x, c)\rVert^2$ (Mescheder et al. 2018, eq. 9)
   and the *matching-aware* term $w\,\mathbb E[\mathrm{softplus}(D(x, \hat c) - D(x, c))]$ after Reed et al.
   2016 (GAN-CLS): a real image must score higher with its own prompt than with another image's
   prompt $\hat c$, so the critic checks that image and prompt agree, not only that the image looks
   real (``losses.matching_loss`` says why it is a relative, bounded term);
2. one generator update: $\min_G\ -\mathbb E[D(G(z, c), c)]$ (``wgan_gp``, ``hinge``) or the
   non-saturating $-\mathbb E[\log\sigma(D(G(z, c), c))]$ (``bce``).

The two players have their own Adam optimisers and learning rates (TTUR, Heusel et al. 2017).

Who owns the text encoder. There is one shared encoder (``labs.text_encoder``, the same module
every family uses), and it is trained by the *critic's* optimiser. The critic is the player that has
to tell prompts apart: the projection term and the matching-aware term reward it for scoring
(image, right prompt) above (image, wrong prompt), a discriminative signal like a classifier's.
The generator reads the pooled vector *detached*: it learns to follow the prompt, but cannot
reshape how prompts are read. The other way round (the generator trains the encoder, the critic
reads it detached) fails in practice: nothing in the generator's loss keeps different prompts
apart before the critic has learnt to use them, and on ``shapes`` the pooled vectors of all
prompts drifted to cosine similarities of 0.95-0.99 within 600 steps, after which neither player
could use them. The encoder is in the EMA with the generator, so sampling uses a matching pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lab_utils.core.lab import DataInfo, Lab, SampleOptions, StepContext, adam, option
from labs.text_encoder import TextEncoder, TextEncoderConfig, Tokenizer, encode_prompts

from .losses import LOSSES, critic_loss, generator_loss, gradient_penalty, matching_loss, r1_penalty
from .model import Critic, CriticConfig, Generator, GeneratorConfig


def _betas(name: str, betas: list[float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {list(betas)}")


@dataclass
class GANSampleOptions(SampleOptions):
    """What ``GANLab.sample`` takes: the model config's ``sampling`` section (its defaults, a preset may change
    them) and ``genlab sample candidates=...``."""

    # The critic picks (the greedy form of discriminator rejection sampling, Azadi et al. 2019): k noises per image,
    # the critic scores each G(z, c) with its prompt, the highest is kept. A continuous G maps its one Gaussian to
    # one connected set, so a prompt that leaves 18 layouts open ("a red circle") gets blends between them, which
    # the critic scores as fakes; it costs k generator and critic passes per image and trades variety for them
    candidates: int = option(1, min=1, max=64, help="noises drawn per image, the critic keeping the one it scores "
                                                    "highest (1 = plain G(z, c))")


@dataclass
class DCGANConfig:
    """Schema and defaults of ``model=dcgan`` (the one home of its values; ``conf/model/dcgan.yaml`` only names it):
    a text-conditioned DCGAN (transposed-conv generator, strided-conv projection critic) trained with the WGAN-GP
    loss. The presets (``conf/preset_model/dcgan_{smoke,cpu,gpu}.yaml``) change the size and the schedule."""

    _target_: str = "labs.gan.GANLab"
    name: str = "dcgan"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    # captions have < 12 words from a ~40-word vocabulary: a small encoder suffices
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=64, depth=2, heads=4))
    loss: str = "wgan_gp"  # wgan_gp (Gulrajani et al.) | hinge (Miyato et al.) | bce (Goodfellow et al.)
    n_critic: int = 5  # critic updates per generator update (Gulrajani et al.: 5)
    gp_weight: float = 10.0  # lambda of the gradient penalty (wgan_gp only; Gulrajani et al.: 10)
    r1_gamma: float = 0.0  # gamma of the R1 penalty on real data (Mescheder et al.); 0 = off
    penalty_every: int = 1  # lazy regularisation (Karras et al. 2020, StyleGAN2 sec. 3.1): the gradient penalty and
    #                         R1 on one critic update in k, weighted by k, saving k-1 of every k double backwards;
    #                         1 = every update
    label_smoothing: float = 0.0  # bce only: real target 1 - s (one-sided, Salimans et al.: s = 0.1)
    # bce only: G minimises -log D(G(z)) instead of log(1 - D(G(z))) (Goodfellow et al. sec. 3)
    non_saturating: bool = True
    mismatch_weight: float = 1.0  # matching-aware critic (after Reed et al. 2016): weight of the term that ranks
    #                               (x, its prompt) above (x, another image's prompt); it is what teaches the critic
    #                               (which trains the text encoder) to tell prompts apart. 0 = off
    lr_generator: float = 1e-4  # TTUR (Heusel et al.): the players have their own learning rates
    lr_critic: float = 3e-4
    text_lr: Optional[float] = None  # the text encoder's learning rate (trained with the critic); null = lr_critic
    # Adam betas of Gulrajani et al.: no momentum for a moving target
    betas_generator: list[float] = field(default_factory=lambda: [0.0, 0.9])
    betas_critic: list[float] = field(default_factory=lambda: [0.0, 0.9])
    sampling: GANSampleOptions = field(default_factory=GANSampleOptions)  # the defaults of sample()

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {self.n_critic}")
        if isinstance(self.penalty_every, bool) or not isinstance(self.penalty_every, int) or self.penalty_every < 1:
            raise ValueError(f"penalty_every must be an int >= 1 (1 = every critic update), got {self.penalty_every!r}")
        if self.gp_weight < 0 or self.r1_gamma < 0:
            raise ValueError(f"gp_weight and r1_gamma must be >= 0, got {self.gp_weight} and {self.r1_gamma}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.mismatch_weight < 0:
            raise ValueError(f"mismatch_weight must be >= 0, got {self.mismatch_weight}")
        if self.label_smoothing > 0 and self.loss != "bce":
            raise ValueError(f"label_smoothing applies to loss=bce only (loss={self.loss}); set it to 0")
        if self.critic.norm == "batch" and (self.loss == "wgan_gp" or self.r1_gamma > 0):
            raise ValueError("critic.norm=batch cannot be used with a gradient penalty (loss=wgan_gp or r1_gamma > 0): "
                             "the penalty is per sample and BatchNorm mixes the samples of a batch; "
                             "use critic.norm=none or layer")
        if self.text_lr is not None and self.text_lr <= 0:
            raise ValueError(f"text_lr must be positive or null (= lr_critic), got {self.text_lr}")
        if self.lr_generator <= 0 or self.lr_critic <= 0:
            raise ValueError(f"lr_generator and lr_critic must be positive, got {self.lr_generator}, {self.lr_critic}")
        _betas("betas_generator", self.betas_generator)
        _betas("betas_critic", self.betas_critic)


class GANLab(Lab):
    """A text-conditioned DCGAN: a shared text encoder, a generator G(z, c) and a critic D(x, c)."""

    Config = DCGANConfig
    SampleOptions = GANSampleOptions

    def __init__(self, config: DCGANConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        config = self.config  # the typed config (Lab.__init__)
        self.tokenizer = Tokenizer(data_info.vocab, max_length=config.text.max_length)
        self.text_encoder = TextEncoder(config.text, self.tokenizer.vocab_size)
        C, size = data_info.channels, data_info.image_size
        self.generator = Generator(config.generator, C, size, text_dim=config.text.dim)
        self.critic = Critic(config.critic, C, size, text_dim=config.text.dim)
        # the last gradient-penalty / R1 statistics, logged on the updates that skip them (penalty_every > 1)
        self._penalty_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        # the text encoder learns with the critic (see the docstring), in a group of its own when text_lr is set
        # (one group otherwise, as runs saved before the option have, so that they resume)
        if cfg.text_lr is None:
            critic_params = [{"params": list(self.critic.parameters()) + list(self.text_encoder.parameters())}]
        else:
            critic_params = [{"params": list(self.critic.parameters())},
                             {"params": list(self.text_encoder.parameters()), "lr": cfg.text_lr}]
        return {
            "generator": adam(self.generator.parameters(), decoupled=False, lr=cfg.lr_generator,
                              betas=tuple(cfg.betas_generator)),
            "critic": adam(critic_params, decoupled=False, lr=cfg.lr_critic, betas=tuple(cfg.betas_critic)),
        }

    def ema_modules(self) -> list[str]:
        return ["generator", "text_encoder"]

    def batches_per_step(self) -> int:
        """One real batch per critic update (the generator's update reads none): an image budget counts every real
        image the critic is shown, as StyleGAN's kimg does, so it buys max_images / (n_critic x batch) steps."""
        return self.config.n_critic

    def differentiates_critic_twice(self) -> bool:
        """The gradient penalty (``loss=wgan_gp``) and R1 (``r1_gamma``) differentiate the critic's gradient."""
        return (self.config.loss == "wgan_gp" and self.config.gp_weight > 0) or self.config.r1_gamma > 0

    def compile_modules(self) -> list[str]:
        """The generator and the text encoder always; the critic only when no penalty differentiates it twice
        (torch.compile does not support double backward). The text encoder is differentiated once even then:
        the penalty's second backward runs through the critic alone and reaches the text vectors as an input."""
        return ["generator", "text_encoder"] + ([] if self.differentiates_critic_twice() else ["critic"])

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' pooled text vectors (B, text_dim); "" is the empty prompt ([CLS] only)."""
        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), device=self.device).pooled

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ N(0, I): (n, z_dim), from ``generator`` if given, else the global RNG (training)."""
        if generator is None:
            return torch.randn(n, self.config.generator.z_dim, device=self.device)
        z = torch.randn(n, self.config.generator.z_dim, generator=generator, device=generator.device)
        return z.to(self.device)

    def critic_objective(self, x: torch.Tensor, captions: list[str],
                         penalty_weight: float = 1.0) -> dict[str, torch.Tensor]:
        r"""The critic's objective on one real batch (B, C, H, W) and fresh fakes, with its statistics (a loss:
        nothing is stepped here, ``ctx.optimize`` does that).

        ``penalty_weight`` multiplies the gradient penalty and R1: ``penalty_every`` $k$ on the critic
        updates that take them, 0 on the others (lazy regularisation: the penalties are skipped, not
        computed and zeroed, so the double backward is saved). Their statistics are those of the last
        update that took them.
        """
        cfg = self.config
        text = self.encode_prompts(captions)  # c: (B, text_dim); the critic's loss trains the text encoder
        with torch.no_grad():  # G does not learn from the critic's loss
            fake = self.generator(self.noise(len(x)), text)  # G(z, c): (B, C, H, W)
        if cfg.mismatch_weight > 0:  # matching-aware: (x, c_wrong) with c_wrong another image's prompt
            wrong = text.roll(1, dims=0)  # c_wrong: the prompts shifted by one within the batch
            scores = self.critic(torch.cat([x, fake, x]), torch.cat([text, text, wrong]))  # (3B,): one pass
            real_scores, fake_scores, mismatched_scores = scores.chunk(3)  # (B,) each
        else:
            scores = self.critic(torch.cat([x, fake]), torch.cat([text, text]))  # (2B,): one pass for both
            real_scores, fake_scores = scores.chunk(2)  # D(x, c), D(G(z, c), c): (B,) each
        loss = critic_loss(cfg.loss, real_scores, fake_scores, cfg.label_smoothing)
        out = {"loss": loss, "real_score": real_scores.mean(), "fake_score": fake_scores.mean(),
               "wasserstein": real_scores.mean() - fake_scores.mean()}  # E[D(x)] - E[D(G(z))]
        if cfg.mismatch_weight > 0:
            matching = matching_loss(real_scores, mismatched_scores)  # E[softplus(D(x, c_wrong) - D(x, c))]
            out["loss"] = out["loss"] + cfg.mismatch_weight * matching
            out["matching"], out["mismatch_score"] = matching, mismatched_scores.mean()
        if cfg.loss == "wgan_gp" and cfg.gp_weight > 0 and penalty_weight > 0:
            gp = gradient_penalty(lambda x_hat: self.critic(x_hat, text.float()), x, fake)  # fp32 inside
            out["loss"] = out["loss"] + penalty_weight * cfg.gp_weight * gp.penalty  # + lambda E[(||grad D|| - 1)^2]
            self._penalty_stats["gradient_penalty"] = gp.penalty.detach()
            self._penalty_stats["interpolate_grad_norm"] = gp.grad_norm.mean().detach()
        if cfg.r1_gamma > 0 and penalty_weight > 0:
            r1 = r1_penalty(lambda x_real: self.critic(x_real, text.float()), x)
            out["loss"] = out["loss"] + penalty_weight * cfg.r1_gamma / 2 * r1  # + gamma/2 E||grad_x D(x)||^2
            self._penalty_stats["r1"] = r1.detach()
        out.update(self._penalty_stats)
        return out

    def generator_loss(self, captions: list[str]) -> torch.Tensor:
        """The generator's loss for fresh noise and the given prompts (gradients reach G only)."""
        with torch.no_grad():
            text = self.encode_prompts(captions)  # c: (B, text_dim), read but not trained by the generator
        fake = self.generator(self.noise(len(captions)), text)  # G(z, c)
        return generator_loss(self.config.loss, self.critic(fake, text), self.config.non_saturating)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg = self.config
        stats: dict[str, torch.Tensor] = {}
        # (1) Update D (n_critic times): maximise E[D(x, c)] - E[D(G(z, c), c)] - lambda GP  (wgan_gp),
        #     or minimise the hinge / BCE critic loss; each update sees a fresh real batch.
        for i in range(cfg.n_critic):
            if i > 0:
                batch = ctx.next_batch()
            update = ctx.step * cfg.n_critic + i  # the critic updates made before this one
            weight = float(cfg.penalty_every) if update % cfg.penalty_every == 0 else 0.0  # lazy: k on 1 update in k
            out = ctx.optimize("critic", lambda: self.critic_objective(batch["image"], list(batch["caption"]), weight))
            for key, value in out.items():
                stats[key] = stats.get(key, 0.0) + value.detach() / cfg.n_critic  # mean over critic updates
        # (2) Update G: maximise E[D(G(z, c), c)] (wgan_gp, hinge) or E[log D(G(z, c), c)] (bce,
        #     non-saturating), with the last batch's captions as the prompts. The critic is frozen meanwhile:
        #     the gradient reaches G through D's input, and D's own weight gradients (never used: the critic's
        #     update zeroes them first) are not computed. The same numbers, one backward's weight grads fewer.
        self.critic.requires_grad_(False)
        try:
            g_loss = ctx.optimize("generator", lambda: self.generator_loss(list(batch["caption"])))
        finally:
            self.critic.requires_grad_(True)
        logged = {"critic": stats.pop("loss"), "generator": g_loss.detach()}
        logged.update({f"stats/{key}": value for key, value in stats.items()})
        return logged

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: list[str], z: torch.Tensor) -> torch.Tensor:
        """G(z, c) for given noise z (N, z_dim) and prompts: (N, C, H, W) in [-1, 1]."""
        if len(z) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(z)} noise vectors")
        return self.generator(z.to(self.device), self.encode_prompts(prompts))

    def sampling_defaults(self) -> GANSampleOptions:
        return self.config.sampling

    def nfe(self, options: GANSampleOptions | None = None, **given: Any) -> int:
        """Network evaluations per image: one generator pass per candidate (each candidate's critic pass besides)."""
        return self.sample_options(given, options).candidates

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               options: GANSampleOptions | None = None, **given: Any) -> torch.Tensor:
        """Images for ``prompts``, (N, C, H, W) in [-1, 1]; noise from ``generator`` only (a fresh, randomly seeded
        one if None), never from the global RNG. ``candidates`` k > 1: k noises per image, the critic keeps the
        G(z, c) it scores highest with the prompt (``GANSampleOptions``)."""
        options = self.sample_options(given, options)
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # seeds this generator only
        prompts = list(prompts)
        text = self.encode_prompts(prompts)  # (N, text_dim)
        best = self.generator(self.noise(len(prompts), generator), text)  # (N, C, H, W)
        if options.candidates > 1:
            best_score = self.critic(best, text)  # (N,)
            for _ in range(options.candidates - 1):
                candidate = self.generator(self.noise(len(prompts), generator), text)
                score = self.critic(candidate, text)
                better = score > best_score  # (N,)
                best = torch.where(better[:, None, None, None], candidate, best)
                best_score = torch.where(better, score, best_score)
        return best

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the generator, the critic, the text encoder and the total."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                  for name in ("generator", "critic", "text_encoder")}
        counts["total"] = sum(counts.values())
        return counts
