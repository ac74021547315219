"""What ``genlab serve`` serves: the models it loaded once at start-up, by name, and the limits of a request.

Models come from the zoo (``lab_utils.harness.zoo``: ``models=[ddpm, ...]``) or from a configured folder of
runs (``runs=<folder>``: every run folder under it with a ``checkpoints/last.pt``, named by its path inside
the folder, e.g. ``shapes/ddpm/2026-12-03_10-00-00``). A request names a model; the name is looked up in the
table built here, and nothing a client sends is ever used as a path.

Each model's images are scored against the prompt by the CLIP scorer of its dataset (``labs.clip.score``: the zoo's
``clip``, or one cached by an evaluation; none is trained at start): the cosine of image and prompt in the
lab's joint embedding, the per-image CLIP score of ``genlab eval``.

A model's sampling options, their types, bounds, choices and help come from its family's ``SampleOptions``
dataclass (:func:`option_schema`), capped by the server's :class:`Limits` of the same name; the server names no
family's options, and refuses to start on an option it cannot bound.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from lab_utils.commands.evaluation.clip_scorer import find_clip_scorer
from lab_utils.core.lab import Lab, option_kind
from lab_utils.harness.checkpoint import LoadedLab, load_lab
from lab_utils.harness.zoo import entries
from lab_utils.harness.zoo import load as load_pretrained
from labs.clip.score import ClipScorer
from labs.text_encoder.tokenizer import Tokenizer

log = logging.getLogger("genlab")


@dataclass
class Limits:
    """What one request may ask for (``serve.limits`` in ``conf/serve.yaml``): a lab machine stays responsive.

    ``steps``, ``guidance`` and ``temperature`` cap the sampling options of those names, below the bounds their
    ``SampleOptions`` fields set themselves (these have no upper bound of their own)."""

    prompt_chars: int = 200
    n: int = 16  # images per request
    steps: int = 250  # caps `steps`: sampling steps (a DDPM's 1000 would take minutes on a CPU)
    guidance: float = 20.0  # caps `guidance`
    temperature: float = 3.0  # caps `temperature`
    queue: int = 8  # requests that may wait while `workers` run; one more gets 503 with Retry-After
    workers: int = 1  # generations at once (each uses all of torch's threads)
    timeout_s: float = 60.0  # a generation stops (504) after this long
    preview_every: int = 5  # diffusion: the stream shows the x0 estimate every this many steps
    retry_after_s: int = 5  # what a 503 tells the client to wait

    def __post_init__(self) -> None:
        for item in fields(self):
            if getattr(self, item.name) <= 0:
                raise ValueError(f"serve.limits.{item.name} must be positive, got {getattr(self, item.name)}")


@dataclass
class Connections:
    """How long the server waits on a client (``serve.connections`` in ``conf/serve.yaml``): a client that sends
    half a request and stops is dropped after a bounded time, and a long generation's stream shows it is alive."""

    header_timeout_s: float = 10.0  # a request's headers must all arrive within this long (else 408, closed)
    body_timeout_s: float = 10.0  # and its body within this long after them (else 408, closed)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this long (uvicorn's timeout_keep_alive)
    sse_keep_alive_s: float = 15.0  # the stream sends a `: keep-alive` comment after this long with nothing to send

    def __post_init__(self) -> None:
        for item in fields(self):
            if getattr(self, item.name) <= 0:
                raise ValueError(f"serve.connections.{item.name} must be positive, got {getattr(self, item.name)}")


@dataclass
class ServeConfig:
    """``conf/serve.yaml``."""

    host: str = "127.0.0.1"  # only this machine; 0.0.0.0 puts the lab on the network
    port: int = 8000
    # Host headers accepted besides `host` (and localhost, 127.0.0.1, [::1] when `host` is one of them): a web page
    # cannot drive the server through a DNS name of its own. ["*"]: any (the default when `host` is 0.0.0.0 or ::)
    allowed_hosts: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["dcgan", "vae", "ddpm", "ldm", "flow"])  # zoo names
    runs: Optional[str] = None  # a folder of run folders to serve as well (by their path inside it)
    device: str = "cpu"
    threads: Optional[int] = None  # torch's intra-op threads (None: torch's default)
    batch_size: int = 64  # as `genlab sample`'s: the same request gives the same pixels as the command
    # score each image against its prompt with the CLIP scorer of the model's dataset (the zoo's or a cached one)
    clip_score: bool = True
    limits: Limits = field(default_factory=Limits)
    connections: Connections = field(default_factory=Connections)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.models and not self.runs:
            raise ValueError("nothing to serve: give models=[...] (`genlab pretrained` lists them) or runs=<folder>")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class ServedModel:
    """One model the server holds, loaded once and shared by every request (sampling reads its weights only;
    each request brings its own ``torch.Generator``, so no request touches another's random state)."""

    name: str
    source: str  # "zoo" or "runs"
    loaded: LoadedLab
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time on this model
    scorer: Optional[ClipScorer] = None  # scores its images against the prompt (None: no CLIP score)

    @property
    def lab(self):
        return self.loaded.lab

    @property
    def family(self) -> str:
        return str(self.loaded.cfg.model.name)

    @functools.cached_property
    def max_prompt_tokens(self) -> int | None:
        """The most tokens of a prompt this model reads ([CLS] included: ``max_length`` of its tokenizer, found
        wherever the lab keeps it, e.g. inside the latent DDPM's diffusion lab); None: it reads no prompt."""
        found = [value.max_length for module in self.lab.modules() for value in vars(module).values()
                 if isinstance(value, Tokenizer)]
        return min(found) if found else None

    def describe(self, limits: Limits) -> dict[str, Any]:
        """What ``GET /models`` says of this model."""
        info = self.lab.data_info
        defaults = asdict(self.lab.sampling_defaults())
        options = {name: spec | {"default": defaults[name]}  # the page builds a control from each, help as its tooltip
                   for name, spec in option_schema(self.lab.SampleOptions, limits).items()}
        return {"name": self.name, "family": self.family, "source": self.source, "dataset": info.name,
                "image": {"channels": info.channels, "size": info.image_size},
                "parameters": sum(p.numel() for p in self.lab.parameters()),
                "step": int(self.loaded.state.get("trainer", {}).get("step", 0)),
                "options": options, "example_prompts": list(info.prompts),
                "vocabulary": [word for word in info.vocab if not word.startswith("[")],
                "live_preview": type(self.lab).sample_with_progress is not Lab.sample_with_progress,
                "max_prompt_tokens": self.max_prompt_tokens, **self.describe_scorer()}

    def describe_scorer(self) -> dict[str, Any]:
        """Which CLIP model scores this model's images, and what the dataset's real images score with it (their
        own captions, as ``genlab eval`` reads them; known for a shipped scorer)."""
        if self.scorer is None:
            return {"clip_scorer": None, "clip_score_real": None}
        real = ((self.scorer.info.get("prompt_match_real") or {}).get("real_held_out") or {}).get("clip_score")
        return {"clip_scorer": self.scorer.info.get("name") or f"cached {self.scorer.key}", "clip_score_real": real}


REQUEST_FIELDS = ("prompt", "model", "n", "seed", "format")  # a request's own fields; every other is an option


def option_schema(options: type, limits: Limits) -> dict[str, dict[str, Any]]:
    """Each field of a family's ``SampleOptions`` dataclass as the server offers it: ``{"type": "integer"|"number",
    "min", "max"}`` (the field's bounds, the maximum capped by the :class:`Limits` entry of its name) or ``{"type":
    "string", "choices"}``, with its ``help``. An option the server cannot bound (no maximum and no limit of its
    name), or named like a request field, is a ValueError naming it: the server does not start."""
    capped = {item.name for item in fields(Limits)}
    schema = {}
    for item in fields(options):
        where = f"{options.__module__}.{options.__qualname__}.{item.name}"
        try:
            kind = option_kind(options, item)
        except TypeError as err:
            raise ValueError(f"genlab serve cannot offer a sampling option: {err}") from None
        if item.name in REQUEST_FIELDS:
            raise ValueError(f"the sampling option {where} is named like a request field "
                             f"({', '.join(REQUEST_FIELDS)}): rename it")
        meta = item.metadata
        if kind is str:
            schema[item.name] = {"type": "string", "choices": list(meta["choices"]), "help": meta["help"]}
            continue
        highs = [high for high in (meta["max"], getattr(limits, item.name) if item.name in capped else None)
                 if high is not None]  # the field's own maximum, and the server's cap of the same name
        if meta["min"] is None:
            raise ValueError(f"the sampling option {where} has no lower bound, so genlab serve cannot limit a "
                             "request: give its field one (option(..., min=...))")
        if not highs:
            raise ValueError(f"the sampling option {where} has no upper bound, so genlab serve cannot limit a "
                             "request: give its field one (option(..., max=...)) or a cap in serve.limits")
        schema[item.name] = {"type": "integer" if kind is int else "number", "min": kind(meta["min"]),
                             "max": kind(min(highs)), "help": meta["help"]}
    return schema


def run_folders(root: Path) -> dict[str, Path]:
    """Every run folder under ``root`` (one holding ``checkpoints/last.pt``), by its path inside ``root``."""
    found = {}
    for last in sorted(root.rglob("checkpoints/last.pt")):
        run = last.parent.parent
        found[run.relative_to(root).as_posix()] = run
    return found


def load_models(config: ServeConfig, device: torch.device) -> dict[str, ServedModel]:
    """Load every model the config names, once (a bad name or file stops the server before it listens)."""
    from lab_utils.harness.checkpoint import CheckpointError

    served: dict[str, ServedModel] = {}
    available = entries()
    for name in config.models:
        if name not in available or not available[name].generative:
            raise CheckpointError(f"models: no pretrained model {name!r}; the zoo has {', '.join(available) or 'none'}")
        served[name] = ServedModel(name, "zoo", load_pretrained(name, device))
    if config.runs:
        root = Path(config.runs).expanduser()
        if not root.is_dir():
            raise CheckpointError(f"runs={config.runs}: no such folder")
        for name, run in run_folders(root).items():
            loaded = load_lab(run, device=device, ema=True)
            if not loaded.lab.generative:  # the evaluator, CLIP: nothing to draw
                continue
            served[name] = ServedModel(name, "runs", loaded)
    if config.clip_score:
        attach_scorers(served, device)
    for model in served.values():
        log.info("serving %s (%s, %s, step %s; CLIP score: %s)", model.name, model.family, model.source,
                 model.loaded.state.get("trainer", {}).get("step"), model.describe_scorer()["clip_scorer"])
    return served


def attach_scorers(served: dict[str, ServedModel], device: torch.device) -> None:
    """Give each model the CLIP scorer of its data config (one per distinct config, shared: scoring only reads it)."""
    scorers: dict[str, Optional[ClipScorer]] = {}
    for model in served.values():
        data = OmegaConf.to_container(model.loaded.cfg.data, resolve=True)
        ident = repr(sorted(data.items()))
        if ident not in scorers:
            scorers[ident] = find_clip_scorer(model.loaded.cfg.data, device)
        model.scorer = scorers[ident]
