"""A family's sampling options have one home, its ``SampleOptions`` dataclass: a new option is one field (and the line
that uses it). ``tiny_lab.ContrastLab`` adds ``contrast`` to the tiny lab and nothing else; `genlab sample` checks it,
`genlab serve` lists it in GET /models and its request model bounds it, with no edit of their own. And an option the
server cannot bound stops the server at start, naming it."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, data_info, subprocess_env
from lab_utils.commands.serve import Limits, ServeConfig, ServedModel, create_app, request_model
from lab_utils.core.lab import SampleOptions, option
from lab_utils.core.plotting import tiles
from lab_utils.harness.checkpoint import LoadedLab, load_lab
from forked_cli import run_genlab_many
from test_cli import GENLAB
from tiny_lab import ContrastLab, ContrastSampleOptions, TinyConfig, TinyLab, tiny_config

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def contrast_run(tmp_path_factory) -> Path:
    """An 8-step run of the tiny lab with the extra option (its checkpoint names tiny_lab.ContrastLab)."""
    from lab_utils.harness.run import train

    run = tmp_path_factory.mktemp("contrast") / "run"
    train(tiny_config(run, _target_="tiny_lab.ContrastLab"))  # its sample grids pass the trainer's options too
    return run


def test_the_new_option_lives_in_the_test_lab_only():
    """No command, config or schema names it: the commands read the option from the dataclass."""
    named = [path for top in ("lab_utils", "conf", "genlab") for path in (REPO / top).rglob("*")
             if path.suffix in (".py", ".yaml", ".js", ".html")
             and re.search(r"\bcontrast\b", path.read_text().lower())]  # the option's name (not "contrastive")
    assert not named, named


def test_the_one_parser_reads_the_new_option(contrast_run):
    lab = load_lab(contrast_run).lab
    assert isinstance(lab, ContrastLab) and lab.sampling_defaults() == ContrastSampleOptions(scale=1.0, contrast=1.0)
    assert lab.sample_options({"contrast": 0.5, "scale": None}) == ContrastSampleOptions(contrast=0.5)
    with pytest.raises(ValueError, match=r"sampling.contrast must be a finite number in \[0, 2\], got 5"):
        lab.sample_options({"contrast": 5})
    with pytest.raises(ValueError, match="ContrastLab.sample does not take option.*it takes scale, contrast"):
        lab.sample_options({"steps": 3})
    generator = torch.Generator().manual_seed(0)
    half = lab.sample([PROMPT] * 2, generator, lab.sample_options({"contrast": 0.5}))
    assert torch.equal(half, lab.sample([PROMPT] * 2, torch.Generator().manual_seed(0), contrast=0.5))  # keywords
    assert torch.allclose(half * 2, lab.sample([PROMPT] * 2, torch.Generator().manual_seed(0)))


def test_genlab_sample_checks_and_passes_the_new_option(contrast_run, tmp_path):
    env = subprocess_env(GENLAB_LABS="tiny_lab.ContrastLab")  # the user's own lab, named by the user's environment
    common = ["sample", f"run={contrast_run}", f"prompt={PROMPT}", "n=2", "layout=tiles", "device=cpu"]
    # three processes of `python -m lab_utils.commands.cli`, forked from one that imported torch once
    bad, *done = run_genlab_many(GENLAB, [([*common, *extra, f"out={tmp_path / name}"], Path.cwd()) for name, extra in
                                          (("bad.png", ["contrast=5"]), ("half.png", ["contrast=0.5"]),
                                           ("default.png", []))], tmp_path / "processes", env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("genlab: error:")]
    assert errors == ["genlab: error: model tiny: sampling.contrast must be a finite number in [0, 2], got 5.0"]
    assert not (tmp_path / "bad.png").exists()
    for out in done:
        assert out.returncode == 0, out.stderr[-2000:]
    half, default = (np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("half.png", "default.png"))
    assert not np.array_equal(half, default)  # the value reached the sampler
    lab = load_lab(contrast_run).lab
    expected = tiles(lab.sample([PROMPT] * 2, torch.Generator().manual_seed(0), contrast=0.5), ncols=2)
    np.testing.assert_array_equal(half, expected)


def test_genlab_serve_lists_bounds_and_checks_the_new_option(contrast_run):
    model = ServedModel("contrast", "runs", load_lab(contrast_run))
    limits = Limits(n=4)
    body = request_model(limits, [model]).model_json_schema()["properties"]["contrast"]
    assert body["anyOf"][0] == {"type": "number", "minimum": 0.0, "maximum": 2.0}
    assert "about grey" in body["description"]
    with TestClient(create_app(ServeConfig(models=["contrast"], limits=limits), {"contrast": model})) as client:
        listed = client.get("/models").json()["models"][0]
        assert listed["options"] == {  # what the page builds its controls from, help as their tooltips
            "scale": {"type": "number", "min": 0.0, "max": 10.0, "default": 1.0, "help": "the noise's scale"},
            "contrast": {"type": "number", "min": 0.0, "max": 2.0, "default": 1.0,
                         "help": "scales the images about grey (1 = as drawn)"}}
        refused = client.post("/generate-image", json={"prompt": PROMPT, "model": "contrast", "contrast": 5})
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/json"
        assert refused.json()["field"] == "contrast" and "less than or equal to 2" in refused.json()["detail"]
        drawn = client.post("/generate-image", json={"prompt": PROMPT, "model": "contrast", "n": 2, "seed": 4,
                                                     "contrast": 0.5, "format": "json"})
        assert drawn.status_code == 200 and drawn.json()["options"] == {"scale": 1.0, "contrast": 0.5}
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawn.json()["image"]))).convert("RGB"))
    expected = tiles(model.lab.sample([PROMPT] * 2, torch.Generator().manual_seed(4), contrast=0.5), ncols=2)
    np.testing.assert_array_equal(png, expected)


@dataclass
class UnboundedOptions(SampleOptions):
    gain: float = option(1.0, min=0.0, help="no maximum of its own, and no serve.limits.gain")


class UnboundedLab(TinyLab):
    SampleOptions = UnboundedOptions


def test_an_option_the_server_cannot_bound_stops_it_at_start():
    lab = UnboundedLab(OmegaConf.structured(TinyConfig), data_info(size=8))
    model = ServedModel("loose", "runs", LoadedLab(lab, OmegaConf.create({"model": {"name": "tiny"}}), {},
                                                   Path("loose")))
    with pytest.raises(ValueError, match=r"option test_sample_options.UnboundedOptions.gain has no upper bound.*"
                                         r"serve.limits"):
        create_app(ServeConfig(models=["loose"]), {"loose": model})
    assert lab.sample_options({"gain": 100.0}).gain == 100.0  # the lab itself takes it: the bound is the server's
