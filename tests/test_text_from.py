"""model.text_from: a text-to-image model conditioned on another model's text encoder (CLIP's), frozen, as Stable
Diffusion conditions on CLIP's. The weights are taken at the start of a run, stay fixed while the rest learns, come
back with the checkpoint, and a source that cannot serve is refused with one line."""

from __future__ import annotations

import pytest
import torch

from conftest import data_info
from lab_utils.core.config import compose
from lab_utils.core.registry import build_lab
from lab_utils.harness.checkpoint import CheckpointError, load_checkpoint, load_lab
from lab_utils.harness.run import train
from lab_utils.harness.zoo import take_module
from labs.text_encoder import TextEncoder, TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text_from") / "clip"
    train(compose(["model=clip", "data=shapes", "preset=smoke", f"out={run}"]))
    return run


def text_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("model, text_path, trained_path", [
    ("ddpm", "text_encoder", "unet"),
    ("flow", "text_encoder", "unet"),
    ("ldm", "diffusion.text_encoder", "diffusion.unet"),
])
def test_a_model_conditions_on_clips_text_encoder_frozen(clip_run, tmp_path, model, text_path, trained_path):
    clip = load_lab(clip_run).lab  # with its EMA weights, what the harness takes
    expected = text_weights(clip.clip.text_encoder)
    run = tmp_path / model
    steps = ["trainer.steps=6", "model.autoencoder_steps=2"] if model == "ldm" else ["trainer.steps=4"]
    steps.append("trainer.sample_every=0")  # no grids: the weights are the point
    train(compose([f"model={model}", "data=shapes", "preset=smoke", f"out={run}", f"model.{'diffusion.' * (model == 'ldm')}"
                   f"text_from={clip_run}", *steps]))
    assert f"took {text_path} from {clip_run / 'checkpoints' / 'last.pt'}" in (run / "train.log").read_text()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    for weights in (state["model"], state["ema"]):  # the live weights and their average: CLIP's, unchanged
        for name, tensor in expected.items():
            assert torch.equal(weights[f"{text_path}.{name}"], tensor), name
    loaded = load_lab(run).lab  # rebuilt from the checkpoint alone: frozen again, CLIP's weights from the file
    encoder = loaded.get_submodule(text_path)
    assert encoder.frozen and not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    # the rest learnt: the UNet's weights differ from a fresh build's with the run's seed
    torch.manual_seed(0)
    fresh = type(loaded)(loaded.config, loaded.data_info).state_dict()
    assert any(not torch.equal(tensor, fresh[name]) for name, tensor in state["model"].items()
               if name.startswith(trained_path + ".")), "the UNet did not train"


def test_a_frozen_encoder_stays_in_eval_mode_and_out_of_the_gradients():
    encoder = TextEncoder(TextEncoderConfig(dim=16, depth=1, heads=2, dropout=0.5), vocab_size=10).freeze()
    holder = torch.nn.Sequential(encoder, torch.nn.Linear(2, 2))
    holder.train()
    assert holder.training and holder[1].training and not encoder.training  # dropout stays off
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(encoder(ids).tokens, encoder(ids).tokens)  # no dropout: the same twice
    assert all(not p.requires_grad for p in encoder.parameters())


def test_a_source_that_cannot_serve_is_refused_in_one_line(clip_run, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint"):
        train(compose(["model=ddpm", "data=shapes", "preset=smoke", f"out={tmp_path / 'a'}",
                       f"model.text_from={missing}"]))
    with pytest.raises(CheckpointError, match="does not fit this model's") as refused:
        train(compose(["model=ddpm", "data=shapes", "preset=smoke", f"out={tmp_path / 'b'}",
                       f"model.text_from={clip_run}", "model.text.dim=32"]))
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    other = build_lab(compose(["model=ddpm", "preset=smoke"]), data_info(size=16))  # another dataset's words
    with pytest.raises(CheckpointError, match="another vocabulary"):
        take_module(other, "text_encoder", str(clip_run))
