"""The model zoo: trained models that ship inside the package, weights only, and how to load them.

Each family's package holds its pretrained models beside its code, ``labs/<family>/pretrained/``:

- ``<name>.<sha256[:12]>.safetensors`` (``<name>.safetensors`` in a zoo built before names held the content's
  hash): the sampling weights (the EMA's, where the run kept one) in the safetensors
  format, which holds tensors and a header of strings and nothing else: loading it runs no code. The
  header carries the run's resolved config and its ``DataInfo`` as JSON, so the file rebuilds the model
  alone, like a checkpoint (``lab_utils.harness.checkpoint``), without the optimiser and trainer state.
- ``manifest.json``: for each model of the folder, the file that holds it, its family, dataset, the command that
  trained it, the key of that run (``lab_utils.harness.cached_run.run_key``: its settings and its labs' source, as
  the caches key a run), the code's git version, the file's sha256 and size, its dtype and its ``genlab eval``
  figures. It is the zoo's single commit point: a build writes new weights under a new name, then replaces the
  manifest (``lab_utils.commands.pretrained.publish``), so a file's bytes never change under its name and a
  manifest never names a file that disagrees with it.

A model is chosen by its name (``ddpm``, ``vae`` ...), never by a path: ``genlab sample pretrained=ddpm``,
``genlab eval pretrained=ddpm``, ``genlab serve``. The file's sha256 is checked against the manifest at
every load, and the config it carries can name only a registered lab (``lab_utils.core.registry``).
``genlab pretrained`` lists the zoo; ``make pretrained`` retrains it (``lab_utils.commands.pretrained``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lab_utils.core.data.base import without_write_locations
from lab_utils.core.lab import DataInfo, Lab
from lab_utils.core.registry import BUILTIN_LABS, MEASURING_FAMILIES, build_lab
from lab_utils.harness.checkpoint import CheckpointError, LoadedLab, first_line, load_state_into

FORMAT = "genlab-pretrained"
FORMAT_VERSION = 1
FOLDER = "pretrained"  # inside each family's package
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PretrainedEntry:
    """One model of the zoo, as its manifest describes it."""

    name: str  # what users pass: pretrained=<name>
    family: str  # model.name of the family, e.g. "ddpm"
    dataset: str
    path: Path  # the .safetensors file
    info: dict[str, Any]  # the whole manifest entry (command, key, sha256, eval figures ...)

    @property
    def sha256(self) -> str:
        return str(self.info.get("sha256", ""))

    @property
    def generative(self) -> bool:
        """Whether it draws images (not a measuring instrument: the evaluator, CLIP)."""
        return self.family not in MEASURING_FAMILIES


def family_packages(measuring: bool = False) -> dict[str, str]:
    """model.name -> the package of genlab's own family (``ddpm`` -> ``labs.diffusion``): the generative families,
    and with ``measuring`` the measuring instruments too (``MEASURING_FAMILIES``: the evaluator of ``genlab eval``'s
    features and alignment, and CLIP, which reads its CLIP score and R-precision; shipped as ``evaluator-<dataset>``
    and ``clip``)."""
    return {name: target.rpartition(".")[0] for target, name in BUILTIN_LABS.items()
            if measuring or name not in MEASURING_FAMILIES}


def zoo_folder(package: str) -> Path:
    """``labs/<family>/pretrained/`` of ``package`` (it may not exist)."""
    return Path(str(resources.files(package))) / FOLDER


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable manifest ({first_line(err)}); reinstall genlab "
                              "or rebuild the zoo with `make pretrained`") from None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(models, dict):
        raise CheckpointError(f"{path} has no 'models' table; rebuild the zoo with `make pretrained`")
    return models


def entries() -> dict[str, PretrainedEntry]:
    """Every shipped model, by name, in the families' order (dcgan, vae, ddpm, ldm, flow ...)."""
    found: dict[str, PretrainedEntry] = {}
    packages = family_packages(measuring=True)
    for family, package in sorted(packages.items(), key=lambda item: _FAMILY_ORDER.get(item[0], 99)):
        folder = zoo_folder(package)
        for name, info in read_manifest(folder).items():
            found[name] = PretrainedEntry(name=name, family=str(info.get("family", family)),
                                   dataset=str(info.get("dataset", "?")),
                                   path=folder / str(info.get("file", f"{name}.safetensors")), info=info)
    return found


_FAMILY_ORDER = {"dcgan": 0, "vae": 1, "ddpm": 2, "ldm": 3, "flow": 4, "evaluator": 5, "clip": 6}


def shipped_instrument(family: str, dataset: str, key: str) -> PretrainedEntry | None:
    """The shipped measuring model of ``family`` (``evaluator``, ``clip``) for ``dataset`` whose manifest key is
    ``key`` (``run_key`` of the settings asked for, with the current source of its lab), or None: none shipped was
    trained as they say."""
    for entry in entries().values():
        if entry.family == family and entry.dataset == dataset and entry.info.get("key") == key:
            return entry
    return None


def find(name: Any) -> PretrainedEntry:
    """The zoo entry called ``name``; a name that is not one (a path, a typo) is refused with the list."""
    shipped = entries()
    if not isinstance(name, str) or name not in shipped:
        known = ", ".join(shipped) or "none (this installation ships no pretrained models)"
        raise CheckpointError(f"no pretrained model {name!r}; the zoo has {known} (`genlab pretrained` lists them)")
    return shipped[name]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ the file
def sampling_weights(lab: Lab, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The lab's state dict as it samples (load it with its EMA weights applied), floating-point parameters
    cast to ``dtype``; buffers (scale factors, statistics) and integer tensors keep their own dtype."""
    parameters = {name for name, _ in lab.named_parameters()}
    out = {}
    for name, tensor in lab.state_dict().items():
        tensor = tensor.detach().cpu()
        if name in parameters and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous().clone()  # safetensors refuses shared or strided storage
    return out


def save_pretrained(lab: Lab, config: dict[str, Any], trainer: dict[str, Any], path: Path,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write ``lab``'s sampling weights and what rebuilds it (config, data info) to ``path``, with the trainer's
    counters of the run (``step``, ``images_seen``, ``train_seconds``: how much training it had)."""
    from safetensors.torch import save_file

    counters = {key: trainer[key] for key in ("step", "images_seen", "train_seconds") if key in trainer}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config),
              "data_info": json.dumps(lab.data_info.to_dict()), "trainer": json.dumps(counters)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sampling_weights(lab, dtype), str(tmp), metadata=header)
    tmp.chmod(0o644)  # package data: readable by everyone who installs it
    tmp.replace(path)
    return path


def read_pretrained(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of a pretrained file, with the header checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(err)}); "
                              "reinstall genlab or rebuild the zoo with `make pretrained`") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a genlab pretrained model (no '{FORMAT}' marker)")
    if int(header.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer genlab (format {header['format_version']}); upgrade genlab")
    return tensors, header


def load_file_lab(path: Path, device: str | torch.device = "cpu") -> LoadedLab:
    """Rebuild the lab a pretrained file describes (any path: the caller chose it; users go through :func:`load`)."""
    tensors, header = read_pretrained(path)
    try:
        config = json.loads(header["config"])
        data_info = DataInfo.from_dict(json.loads(header["data_info"]))
        trainer = json.loads(header.get("trainer", "{}"))
        trainer = {key: float(value) if key == "train_seconds" else int(value) for key, value in trainer.items()
                   if key in ("step", "images_seen", "train_seconds")}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its header holds no valid config and data info ({first_line(err)})") from None
    if isinstance(config.get("data"), dict):  # where to write is not a file's choice
        config["data"] = without_write_locations(config["data"])
    cfg = OmegaConf.create(config)
    name = cfg.model.get("name", "?")
    lab = build_lab(cfg, data_info)
    load_state_into(lab, tensors, path, name)  # copies into the lab's own (fp32) tensors
    lab.to(device).eval()
    state = {"trainer": {"step": 0, **trainer}, "pretrained": str(path)}
    return LoadedLab(lab=lab, cfg=cfg, state=state, path=path)


def load(name: str, device: str | torch.device = "cpu") -> LoadedLab:
    """The zoo model ``name``, its file checked against the manifest's sha256 first."""
    entry = find(name)
    if not entry.path.is_file():  # a build may have replaced the manifest and removed the old file meanwhile
        entry = find(name)
    if not entry.path.is_file():
        raise CheckpointError(f"pretrained model {name!r}: {entry.path} is missing; reinstall genlab "
                              "or rebuild the zoo with `make pretrained`")
    digest = sha256_of(entry.path)
    if digest != entry.sha256:
        raise CheckpointError(f"pretrained model {name!r}: {entry.path} does not match its manifest (sha256 "
                              f"{digest[:12]}..., the manifest says {entry.sha256[:12]}...); it was altered or "
                              "truncated: reinstall genlab or rebuild the zoo with `make pretrained`")
    return load_file_lab(entry.path, device)


def training_log(name: str) -> list[dict[str, Any]]:
    """The rows the trainer logged while training the zoo model ``name`` (its ``metrics.jsonl``, shipped beside
    it): the notebooks plot the curves of a model they load instead of training."""
    entry = find(name)
    path = entry.path.with_name(str(entry.info.get("training_log", f"{name}.metrics.jsonl")))
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_source(run: Any, pretrained: Any, device: str | torch.device = "cpu", ema: bool = True) -> LoadedLab:
    """What ``run=`` or ``pretrained=`` of a command names (exactly one of the two)."""
    from lab_utils.harness.checkpoint import load_lab

    has_run = run is not None and str(run) not in ("", "???")
    if has_run == (pretrained is not None):
        raise CheckpointError("which model? pass run=<a run folder or checkpoint> or pretrained=<name> (one of the "
                              "two; `genlab pretrained` lists the shipped models)")
    if pretrained is not None:
        return load(str(pretrained), device)
    return load_lab(run, device=device, ema=ema)


def take_module(lab: Lab, name: str, source: str, device: str | torch.device = "cpu") -> Path:
    """Copy into ``lab``'s submodule ``name`` (dotted) the weights of the submodule of the same last name in the
    model ``source`` (a shipped model's name, or a run folder or checkpoint, with its EMA weights where it kept
    them), strictly: every tensor, of the same shape. ``Lab.initial_modules`` says which; the source must have read
    the same vocabulary (a token's id means the same word). Returns the file the weights came from."""
    try:
        loaded = load(source, device) if source in entries() else load_source(source, None, device)
    except CheckpointError as err:
        raise CheckpointError(f"cannot take the {name} from {source!r} (e.g. model.text_from): {err}") from None
    target = lab.get_submodule(name)
    last = name.rsplit(".", 1)[-1]
    found = [path for path, _ in loaded.lab.named_modules() if path.rsplit(".", 1)[-1] == last]
    if len(found) != 1:
        raise CheckpointError(f"{source} ({loaded.cfg.model.get('name', '?')}) has "
                              f"{'no' if not found else 'more than one'} submodule {last!r} to take")
    if list(loaded.lab.data_info.vocab) != list(lab.data_info.vocab):
        raise CheckpointError(f"{source} read another vocabulary than this run's data ({len(loaded.lab.data_info.vocab)} "
                              f"and {len(lab.data_info.vocab)} words): take a {last} trained on the same dataset")
    try:
        target.load_state_dict(loaded.lab.get_submodule(found[0]).state_dict())
    except RuntimeError as err:
        raise CheckpointError(f"the {last} of {source} does not fit this model's (its settings must be the "
                              f"source's): {first_line(err, 300)}") from None
    return loaded.path
