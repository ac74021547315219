"""`genlab serve`: the API through the ASGI test client (every endpoint, every refused input, determinism against
`genlab sample`, the queue, the timeout; every body checked against the OpenAPI document), then a live server on
127.0.0.1: what only a socket shows (a client that leaves, one that sends half a request), a bounded load test and
a real browser (Debian's Chromium driven by Playwright) on the page and on /docs."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from conftest import GENLAB, REPO, data_info, subprocess_env
from lab_utils.commands.serve import (Connections, Limits, ServeConfig, ServedModel, check_hosts, create_app,
                                      server_config)
from lab_utils.commands.serve.connections import accepted_hosts
from lab_utils.core.data import words as split_words
from lab_utils.core.lab import Lab
from lab_utils.core.plotting import tiles
from lab_utils.harness.checkpoint import LoadedLab
from lab_utils.harness.zoo import find, load
from labs.vae.lab import VAESampleOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LIMITS = Limits(n=8, steps=60, queue=4, timeout_s=60, preview_every=5)


@pytest.fixture(scope="module")
def models():
    return {name: ServedModel(name, "zoo", load(name)) for name in ("vae", "ddpm", "dcgan")}


def api(config: ServeConfig, models: dict[str, ServedModel]) -> TestClient:
    """The app as `genlab serve` serves it (behind its Host check) through the ASGI test client, as 127.0.0.1."""
    return TestClient(check_hosts(create_app(config, models), config), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def client(models):
    with api(ServeConfig(models=list(models), limits=LIMITS), models) as test_client:
        yield test_client


def documented(client: TestClient, response, events: list[tuple[str, dict]] = ()) -> None:
    """``response`` is what /openapi.json declares for its method, path and status: a declared status, and a body
    (each stream event's data: ``x-events``) that validates against the declared schema, $refs resolved in the
    document."""
    document = client.get("/openapi.json").json()
    method, path = response.request.method.lower(), response.request.url.path
    declared = document["paths"][path][method]["responses"].get(str(response.status_code))
    assert declared, f"{method.upper()} {path} answered {response.status_code}, which its document does not declare"
    for header in declared.get("headers", {}):
        assert header.lower() in response.headers, f"{path} {response.status_code} declares {header}"
    media = response.headers["content-type"].split(";")[0]
    assert media in declared.get("content", {}), f"{path} {response.status_code}: {media} is not declared"
    content = declared["content"][media]

    def check(body, schema) -> None:
        root = {**schema, "components": document["components"]}  # "#/components/..." resolves against this root
        jsonschema.Draft202012Validator.check_schema(root)
        jsonschema.Draft202012Validator(root).validate(body)

    if media == "text/event-stream":
        assert events and all(name in content["x-events"] for name, _ in events)
        for name, data in events:
            check(data, content["x-events"][name])
    elif media == "application/json":
        check(response.json(), content["schema"])


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(name, data) of each event of a server-sent stream; comment lines (``: keep-alive``) dropped."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if lines:
            events.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
    return events


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def expected_tiles(model: str, prompt: str, n: int, seed: int, **options) -> np.ndarray:
    """What `genlab sample pretrained=<model> ... layout=tiles` draws (one batch, one generator)."""
    lab = load(model).lab
    images = lab.sample([prompt] * n, generator=torch.Generator().manual_seed(seed), **options)
    return tiles(images, ncols=min(8, n))


# ------------------------------------------------------------------------------------ the API
def test_health_and_models(client):
    documented(client, client.get("/models"))
    documented(client, client.get("/health"))
    health = client.get("/health").json()
    assert health == {"status": "ok", "models": ["vae", "ddpm", "dcgan"], "running": 0, "waiting": 0,
                      "capacity": 1 + LIMITS.queue}
    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert listed["ddpm"]["family"] == "ddpm" and listed["ddpm"]["dataset"] == "shapes"
    steps = listed["ddpm"]["options"]["steps"]
    assert steps.pop("help").startswith("noise levels visited")  # the field's help: the page's tooltip
    assert steps == {"type": "integer", "min": 1, "max": LIMITS.steps, "default": 25}
    assert listed["ddpm"]["options"]["sampler"]["choices"] == ["ddim", "ddpm"]
    assert listed["vae"]["options"] == {"temperature": {"type": "number", "min": 0.0, "max": LIMITS.temperature,
                                                       "default": 1.0, "help": VAESampleOptions.__dataclass_fields__[
                                                           "temperature"].metadata["help"]}}
    candidates = listed["dcgan"]["options"]["candidates"]
    assert candidates.pop("help").startswith("noises drawn per image")
    shipped = load("dcgan").lab.sampling_defaults().candidates  # the shipped model's own (its preset's: 32)
    assert candidates == {"type": "integer", "min": 1, "max": 64, "default": shipped} and shipped > 1
    assert listed["ddpm"]["live_preview"] and not listed["vae"]["live_preview"]
    assert listed["ddpm"]["parameters"] == sum(p.numel() for p in load("ddpm").lab.parameters())
    assert "circle" in listed["vae"]["vocabulary"] and listed["vae"]["example_prompts"]


def test_openapi_documents_the_limits(client):
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert body["n"]["maximum"] == LIMITS.n and body["prompt"]["maxLength"] == LIMITS.prompt_chars
    assert {"/generate-image", "/generate-image/stream", "/models", "/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def test_openapi_declares_every_body(client):
    """Every error of every route is the one-line ErrorBody (the stream's 422 too, not FastAPI's list), every JSON
    answer has its model, and the seed's documented maximum is a seed the server takes (a float above 2**53 is not)."""
    document = client.get("/openapi.json").json()
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    expected = {("/generate-image", "post"): {200, 400, 408, 422, 503, 504},
                ("/generate-image/stream", "post"): {200, 400, 408, 422, 503},
                ("/models", "get"): {200, 400}, ("/health", "get"): {200, 400}, ("/health", "head"): {200, 400}}
    assert {(path, method) for path, item in document["paths"].items() for method in item} == set(expected)
    for (path, method), statuses in expected.items():
        responses = document["paths"][path][method]["responses"]
        assert {int(status) for status in responses} == statuses, path
        for status in statuses - {200}:
            if method != "head":
                assert responses[str(status)]["content"]["application/json"]["schema"] == error_body, (path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, model in (("/models", "ModelList"), ("/health", "Health"), ("/generate-image", "GenerateResult")):
        method = "post" if path == "/generate-image" else "get"
        schema = document["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}
    seed = document["components"]["schemas"]["GenerateRequest"]["properties"]["seed"]
    assert float(seed["maximum"]).is_integer() and float(seed["maximum"]) <= 2**53  # read exactly as a double
    body = {"prompt": "a red circle", "model": "vae", "format": "json"}
    assert client.post("/generate-image", json={**body, "seed": int(seed["maximum"])}).status_code == 200
    refused = client.post("/generate-image", json={**body, "seed": int(seed["maximum"]) + 1})
    assert refused.status_code == 422 and refused.json()["field"] == "seed"
    documented(client, refused)


def test_docs_need_no_network(client):
    """/docs loads every script, style sheet and icon from this server (a lab machine may be offline); ReDoc's page,
    which fetches its logo online, is not served."""
    html = client.get("/docs").text
    links = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert len(links) == 4 and not [link for link in links if re.match(r"(https?:)?//", link)], links
    for link in links:  # the script, the style sheet, the icon and the document
        asset = client.get(link)
        assert asset.status_code == 200 and len(asset.content) > 100, link
    assert "SwaggerUIBundle" in client.get(re.search(r'src="([^"]+bundle\.js)"', html)[1]).text
    assert client.get("/redoc").status_code == 404


def test_head_and_the_host_header(client):
    """HEAD /health is GET's status and headers; a Host the server does not answer to is 400 (a DNS-rebinding
    guard): its own names when bound to loopback, any when bound to every interface, plus `allowed_hosts`."""
    head = client.head("/health")
    assert head.status_code == 200 and head.headers["content-type"] == "application/json" and not head.content
    assert head.headers["content-length"] == client.get("/health").headers["content-length"]
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.", ""):
        refused = client.get("/health", headers={"Host": host})
        assert refused.status_code == 400 and "allowed_hosts" in refused.json()["detail"], (host, refused.text)
        documented(client, refused)
    refused = client.post("/generate-image", json={"prompt": "a red circle", "model": "vae"},
                          headers={"Host": "evil.example"})
    assert refused.status_code == 400
    documented(client, refused)
    assert accepted_hosts("0.0.0.0", []) is None and accepted_hosts("::", []) is None
    assert accepted_hosts("127.0.0.1", ["lab.example"]) == ["127.0.0.1", "localhost", "[::1]", "lab.example"]
    assert accepted_hosts("10.0.0.5", []) == ["10.0.0.5"] and accepted_hosts("fe80::1", []) == ["[fe80::1]"]
    assert accepted_hosts("0.0.0.0", ["Lab.Example"]) == ["127.0.0.1", "localhost", "[::1]", "lab.example"]
    assert accepted_hosts("127.0.0.1", ["*"]) is None


@pytest.mark.filterwarnings("ignore:prompt .* was truncated:UserWarning")  # the tokenizer's own, on the server
def test_a_long_prompt_says_what_the_model_ignored(client):
    """The tokenizer reads [CLS] and 23 words: the JSON, the PNG's header and the stream's events name the words
    after those, and the images are those of the prompt cut there."""
    prompt = ("a large red circle at the top left and a small blue square at the bottom right next to a green "
              "triangle in the center of the picture")
    ignored = split_words(prompt)[23:]
    assert ignored and len(prompt) <= LIMITS.prompt_chars
    body = {"prompt": prompt, "model": "vae", "n": 2, "seed": 4}
    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert listed["vae"]["max_prompt_tokens"] == 24
    answer = client.post("/generate-image", json={**body, "format": "json"})
    documented(client, answer)
    assert answer.json()["ignored_words"] == ignored
    cut = client.post("/generate-image", json={**body, "prompt": " ".join(split_words(prompt)[:23]), "format": "json"})
    assert cut.json()["ignored_words"] == [] and cut.json()["image"] == answer.json()["image"]
    png = client.post("/generate-image", json=body)
    assert png.headers["x-genlab-ignored-words"] == ",".join(ignored)
    assert client.post("/generate-image", json={**body, "prompt": "a red circle"}).headers[
        "x-genlab-ignored-words"] == ""
    with client.stream("POST", "/generate-image/stream", json=body) as response:
        events = sse_events("".join(response.iter_text()))
    documented(client, response, events)
    assert [data["ignored_words"] for name, data in events if name in ("start", "done")] == [ignored, ignored]


@pytest.mark.parametrize("model, options", [("vae", {}), ("ddpm", {"steps": 10}), ("dcgan", {}),
                                            ("vae", {"temperature": 0.5})])
def test_png_is_what_genlab_sample_draws(client, model, options):
    body = {"prompt": "a large red circle at the top left", "model": model, "n": 3, "seed": 11, **options}
    response = client.post("/generate-image", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(pixels(response.content),
                                  expected_tiles(model, body["prompt"], 3, 11, **options))
    again = client.post("/generate-image", json=body)
    assert again.content == response.content  # the same request, the same bytes


def test_json_by_format_or_accept(client):
    body = {"prompt": "a small blue square on the right", "model": "ddpm", "n": 2, "seed": 3, "steps": 10}
    by_field = client.post("/generate-image", json={**body, "format": "json"}).json()
    by_header = client.post("/generate-image", json=body, headers={"Accept": "application/json"}).json()
    assert by_field["images"] == by_header["images"] and len(by_field["images"]) == 2
    documented(client, client.post("/generate-image", json={**body, "format": "json"}))
    assert by_field["options"] == {"sampler": "ddim", "steps": 10, "guidance": 3.0, "eta": 1.0}  # defaults filled in
    assert by_field["model"] == "ddpm" and by_field["seed"] == 3 and by_field["seconds"] > 0
    grid = pixels(base64.b64decode(by_field["image"]))
    np.testing.assert_array_equal(grid, expected_tiles("ddpm", body["prompt"], 2, 3, steps=10))
    np.testing.assert_array_equal(pixels(base64.b64decode(by_field["images"][1])), grid[:, 34:66])
    unknown = client.post("/generate-image", json={**body, "prompt": "a red dragon", "format": "json"}).json()
    assert unknown["unknown_words"] == ["dragon"]


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "", "model": "vae"}, "prompt", "empty"),
    ({"prompt": "   ", "model": "vae"}, "prompt", "empty"),
    ({"prompt": "a red circle " * 20, "model": "vae"}, "prompt", "at most 200 characters"),
    ({"prompt": "un cercle rouge é", "model": "vae"}, "prompt", "printable ASCII"),
    ({"prompt": "a red\ncircle", "model": "vae"}, "prompt", "printable ASCII"),
    ({"prompt": "a red circle", "model": "gpt"}, "model", "no model 'gpt'"),
    ({"prompt": "a red circle", "model": "../../labs/vae/pretrained/vae.safetensors"}, "model", "chosen by name"),
    ({"prompt": "a red circle", "model": "/etc/passwd"}, "model", "no model"),
    ({"prompt": "a red circle", "model": "vae", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a red circle", "model": "vae", "n": 9}, "n", "less than or equal to 8"),
    ({"prompt": "a red circle", "model": "ddpm", "steps": 61}, "steps", "less than or equal to 60"),
    ({"prompt": "a red circle", "model": "vae", "steps": 10}, "steps", "takes no option steps"),
    ({"prompt": "a red circle", "model": "dcgan", "temperature": 1}, "temperature", "it takes candidates"),
    ({"prompt": "a red circle", "model": "dcgan", "candidates": 65}, "candidates", "less than or equal to 64"),
    ({"prompt": "a red circle", "model": "ddpm", "sampler": "euler"}, "sampler", "'ddim' or 'ddpm'"),
    ({"prompt": "a red circle", "model": "ddpm", "guidance": -1}, "guidance", "greater than or equal to 0"),
    ({"prompt": "a red circle", "model": "vae", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "a red circle", "model": "vae", "n": "many"}, "n", "valid integer"),
    ({"prompt": "a red circle", "model": "vae", "path": "/tmp"}, "path", "unknown field 'path'"),
    ({"model": "vae"}, "prompt", "prompt is required"),
])
def test_bad_inputs_are_422_naming_the_field(client, body, field, words):
    response = client.post("/generate-image", json=body)
    assert response.status_code == 422
    error = response.json()
    assert error["field"] == field and words in error["detail"], error
    assert "Traceback" not in response.text
    documented(client, response)


def test_a_body_that_is_not_json(client):
    for content in (b"garbage", b"[1, 2]", b""):
        response = client.post("/generate-image", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "JSON object" in response.json()["detail"], response.text
        documented(client, response)


def test_stream_reports_progress_then_the_same_image(client):
    body = {"prompt": "a large green triangle in the center", "model": "ddpm", "n": 2, "seed": 5, "steps": 20}
    with client.stream("POST", "/generate-image/stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = sse_events(text)
    documented(client, response, events)
    names = [name for name, _ in events]
    assert names == ["start", "progress", "progress", "progress", "done"]  # every 5 of 20 steps, then the result
    assert [data["step"] for name, data in events if name == "progress"] == [5, 10, 15]
    estimate = pixels(base64.b64decode(events[1][1]["image"]))
    done = pixels(base64.b64decode(events[-1][1]["image"]))
    assert estimate.shape == done.shape and not np.array_equal(estimate, done)  # an early x0 estimate
    np.testing.assert_array_equal(done, expected_tiles("ddpm", body["prompt"], 2, 5, steps=20))
    refused = client.post("/generate-image/stream", json={**body, "steps": 1000})
    assert refused.status_code == 422 and refused.json()["field"] == "steps"
    documented(client, refused)  # the stream's 422 is this API's one-line body, not FastAPI's list


def test_each_image_is_scored_against_the_prompt(models):
    """A model served with its dataset's CLIP scorer (the zoo's `clip`, which `genlab serve` attaches to every model
    of shapes) answers each image's CLIP score: in the JSON, the PNG's header and the stream's `done` event, the
    scorer's cosines of the very pixels returned with the prompt; GET /models names the scorer and the real images'
    score; a model without a scorer answers null."""
    from lab_utils.commands.evaluation.clip_scorer import clip_scorer_from_pretrained
    from lab_utils.commands.serve import load_models

    scorer = clip_scorer_from_pretrained("clip")
    served_models = {"vae": ServedModel("vae", "zoo", models["vae"].loaded, scorer=scorer), "ddpm": models["ddpm"]}
    with api(ServeConfig(models=list(served_models), limits=LIMITS), served_models) as client:
        body = {"prompt": "a large red circle at the top left", "model": "vae", "n": 3, "seed": 2}
        answer = client.post("/generate-image", json={**body, "format": "json"})
        documented(client, answer)
        scores = answer.json()["clip_scores"]
        shown = torch.stack([torch.from_numpy(pixels(base64.b64decode(image))).permute(2, 0, 1)
                             for image in answer.json()["images"]])  # (3, 3, 32, 32) uint8, as a client sees them
        assert scores == pytest.approx(scorer.cosines(shown, [body["prompt"]] * 3).tolist(), abs=1e-4)
        elsewhere = scorer.cosines(shown, ["a small blue square at the bottom right"] * 3)
        assert min(scores) > float(elsewhere.max()) + 0.2  # the shipped VAE draws its prompt; another reads far lower
        png = client.post("/generate-image", json=body)
        assert [float(value) for value in png.headers["x-genlab-clip-scores"].split(",")] == pytest.approx(scores,
                                                                                                         abs=1e-4)
        with client.stream("POST", "/generate-image/stream", json=body) as response:
            events = sse_events("".join(response.iter_text()))
        documented(client, response, events)
        assert events[-1][0] == "done" and events[-1][1]["clip_scores"] == scores
        listed = {model["name"]: model for model in client.get("/models").json()["models"]}
        real = find("clip").info["prompt_match_real"]["real_held_out"]["clip_score"]
        assert listed["vae"]["clip_scorer"] == "clip" and listed["vae"]["clip_score_real"] == pytest.approx(real)
        assert listed["ddpm"]["clip_scorer"] is None and listed["ddpm"]["clip_score_real"] is None
        unscored = client.post("/generate-image", json={**body, "model": "ddpm", "steps": 2, "format": "json"})
        assert unscored.json()["clip_scores"] is None and unscored.headers["x-genlab-clip-scores"] == ""
    # `genlab serve` attaches the zoo's scorer to the shipped models (their data is the scorer's), unless told not to
    assert load_models(ServeConfig(models=["vae"]), torch.device("cpu"))["vae"].scorer.info["name"] == "clip"
    assert load_models(ServeConfig(models=["vae"], clip_score=False), torch.device("cpu"))["vae"].scorer is None


# ------------------------------------------------------------------------------------ the queue and the timeout
class BlockingLab(Lab):
    """Draws grey images once ``release`` is set: holds the only worker while the test fills the queue."""

    Config = dict

    def __init__(self):
        super().__init__({}, data_info(size=8))
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.release, self.started = threading.Event(), threading.Event()

    def sample(self, prompts, generator=None, options=None):
        self.started.set()
        self.release.wait(30)
        return torch.zeros(len(prompts), 3, 8, 8)


def served(name: str, lab: Lab) -> ServedModel:
    return ServedModel(name, "runs", LoadedLab(lab, OmegaConf.create({"model": {"name": name}}), {}, Path(name)))


def blocking_model() -> ServedModel:
    return served("blocker", BlockingLab())


class SlowLab(Lab):
    """Draws grey images in ``seconds``, 10 ms a step, reporting every ``every`` steps to ``on_step`` (which stops it
    by raising: a timeout, a client gone); ``release`` ends it early (a test's cleanup)."""

    Config = dict

    def __init__(self, seconds: float):
        super().__init__({}, data_info(size=8))
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.steps = round(seconds / 0.01)
        self.started, self.stopped, self.release = threading.Event(), threading.Event(), threading.Event()

    def sample(self, prompts, generator=None, options=None):
        return torch.zeros(len(prompts), 3, 8, 8)

    def sample_with_progress(self, prompts, generator=None, on_step=None, every=1, options=None, **given):
        self.started.set()
        images = self.sample(prompts)
        try:
            for step in range(1, self.steps + 1):
                if self.release.wait(0.01):
                    break
                if on_step is not None and (step % every == 0 or step == self.steps):
                    on_step(step, self.steps, images)
        except Exception:
            self.stopped.set()
            raise
        return images


def test_a_full_queue_answers_503_with_retry_after():
    model = blocking_model()
    limits = Limits(queue=1, retry_after_s=7)
    with api(ServeConfig(models=["blocker"], limits=limits), {"blocker": model}) as client:
        body = {"prompt": "a red circle", "model": "blocker"}
        answers = []
        first = threading.Thread(target=lambda: answers.append(client.post("/generate-image", json=body)))
        first.start()
        assert model.lab.started.wait(10)
        second = threading.Thread(target=lambda: answers.append(client.post("/generate-image", json=body)))
        second.start()  # waits in the queue (capacity: 1 running + 1 waiting)
        for _ in range(100):
            if client.get("/health").json()["waiting"] == 1:
                break
            time.sleep(0.05)
        busy = client.post("/generate-image", json=body)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
        assert "busy" in busy.json()["detail"]
        documented(client, busy)
        busy_stream = client.post("/generate-image/stream", json=body)
        assert busy_stream.status_code == 503 and busy_stream.headers["retry-after"] == "7"
        documented(client, busy_stream)
        model.lab.release.set()
        first.join(10)
        second.join(10)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert client.get("/health").json()["running"] == 0


def test_a_slow_generation_answers_504(models):
    limits = Limits(timeout_s=0.01, preview_every=1)
    with api(ServeConfig(models=["ddpm"], limits=limits), {"ddpm": models["ddpm"]}) as client:
        response = client.post("/generate-image", json={"prompt": "a red circle", "model": "ddpm", "steps": 200})
        assert response.status_code == 504 and "longer than 0.01 s" in response.json()["detail"]
        documented(client, response)
        assert client.get("/health").json() == {"status": "ok", "models": ["ddpm"], "running": 0, "waiting": 0,
                                                "capacity": 1 + limits.queue}


def test_a_long_generation_streams_keep_alive_comments():
    """Half a second with nothing to say (no previews): the stream sends `: keep-alive` every 0.1 s meanwhile."""
    model = served("slow", SlowLab(0.5))
    config = ServeConfig(models=["slow"], limits=Limits(preview_every=1000),
                         connections=Connections(sse_keep_alive_s=0.1))
    with api(config, {"slow": model}) as client:
        with client.stream("POST", "/generate-image/stream", json={"prompt": "a red circle", "model": "slow"}) as response:
            text = "".join(response.iter_text())
        between = text.split("event: start")[1].split("event: done")[0]
        assert between.count("\n: keep-alive\n\n") >= 2, text[:300]
        events = sse_events(text)
        assert [name for name, _ in events] == ["start", "done"]
        documented(client, response, events)


def test_requests_do_not_share_random_state(client):
    """Each request seeds its own generator: interleaving other seeds changes nothing, nor does the global RNG."""
    body = {"prompt": "a small purple circle at the top", "model": "vae", "n": 2, "seed": 21}
    alone = client.post("/generate-image", json=body).content
    torch.manual_seed(123)
    results = {}

    def ask(seed):
        results[seed] = client.post("/generate-image", json={**body, "seed": seed}).content

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (20, 21, 22, 21)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[21] == alone and results[20] != alone


# ------------------------------------------------------------------------------------ a live server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """Sends ``request`` (perhaps only part of one) and reads until the server closes: (all it sent, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_a_live_server_drops_clients_that_leave_or_stall():
    """What only a socket shows, on a server run as `genlab serve` runs it (server_config) with 0.3 s timeouts from
    its config: a client that closes its connection stops its generation at once (not after the generation's
    10 s), and one that sends half its headers or half its body is answered 408 and dropped after 0.3 s."""
    lab = SlowLab(10.0)
    port = free_port()
    config = ServeConfig(port=port, models=["slow"], limits=Limits(preview_every=1),
                         connections=Connections(header_timeout_s=0.3, body_timeout_s=0.3))
    server = uvicorn.Server(server_config(config, create_app(config, {"slow": served("slow", lab)}), log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.025)
        host = f"Host: 127.0.0.1:{port}\r\n".encode()
        # half the headers
        answer, seconds = raw_http(port, b"GET /health HTTP/1.1\r\n" + host)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer
        assert b"headers did not arrive within 0.3 s" in answer and 0.25 < seconds < 3, (answer, seconds)
        # half the body
        body = json.dumps({"prompt": "a red circle", "model": "slow"}).encode()
        head = (b"POST /generate-image HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        answer, seconds = raw_http(port, head + body[:10])
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"].startswith("the request body did not arrive")
        assert 0.25 < seconds < 3, seconds
        assert not lab.started.is_set()
        # a client that leaves while its generation runs
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(head + body)
            assert lab.started.wait(5)
        left = time.monotonic()
        assert lab.stopped.wait(2), "the generation went on after its client left"
        assert time.monotonic() - left < 1.0
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert json.loads(health.read())["running"] == 0
    finally:
        lab.release.set()
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live_server():
    port = free_port()
    process = subprocess.Popen([*GENLAB, "serve", f"port={port}", "models=[vae,ddpm,ldm]",
                                "limits.queue=16"], cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"genlab serve exited: {process.stdout.read()}")
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("genlab serve did not answer /health within 60 s")
    yield url, process
    process.terminate()
    process.wait(10)


def test_serve_refuses_a_taken_port(live_server):
    url, _ = live_server
    port = url.rsplit(":", 1)[1]
    out = subprocess.run([*GENLAB, "serve", f"port={port}"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_load_200_requests_from_16_clients(live_server):
    from serve_load import load_test

    url, process = live_server
    load_test(url, requests=20, clients=4)  # warm-up
    before = rss_kib(process.pid)
    # 16 clients fit the server's 1 worker + 16 waiting: every request is served
    result = load_test(url, requests=200, clients=16)
    print(json.dumps(result))
    assert result["statuses"] == {"200": 200} and result["every_200_is_png"], result
    # 48 clients do not: the ones over the bound get 503 with Retry-After at once, and nothing else fails
    burst = load_test(url, requests=150, clients=48)
    after = rss_kib(process.pid)
    print(json.dumps(burst), f"RSS {before} -> {after} KiB")
    assert set(burst["statuses"]) == {"200", "503"} and burst["every_200_is_png"], burst
    assert burst["every_503_has_retry_after"]
    assert after - before < 64 * 1024, f"memory grew from {before} to {after} KiB"


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_the_page_in_a_real_browser(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = live_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_selector("#families input")
        boxes = page.locator("#families input")
        assert boxes.count() == 3
        page.uncheck("#families input[value=vae]")  # two families: the pixel and the latent DDPM
        page.fill("#prompt", "a large yellow square at the bottom left")
        # one control per sampling option GET /models lists (the union over the served families), none written
        # into the page: eta (the DDPMs') is there although the page never names it
        offered = sorted({name for model in page.evaluate("models") for name in model["options"]})
        assert offered == ["eta", "guidance", "sampler", "steps", "temperature"]
        assert sorted(page.locator("#sampling-options [data-option]").evaluate_all(
            "controls => controls.map(c => c.dataset.option)")) == offered
        assert page.locator("#option-sampler option").all_inner_texts() == ["default", "ddim", "ddpm"]
        page.fill("#option-steps", "30")
        page.fill("#seed", "3")
        page.click("#generate")
        page.wait_for_selector(".card[data-model=ddpm][data-progress]", timeout=60_000)  # an x0 estimate, live
        page.wait_for_selector(".card[data-model=ddpm][data-done=true]", timeout=60_000)
        page.wait_for_selector(".card[data-model=ldm][data-done=true]", timeout=60_000)
        assert page.locator(".card").count() == 2
        assert "seed 3" in page.inner_text("#comparison-title")
        for name in ("ddpm", "ldm"):
            card = page.locator(f".card[data-model={name}]")
            assert "done in" in card.locator(".status").inner_text()
            assert int(card.get_attribute("data-progress-events")) >= 5  # 30 steps, a preview every 5
            images = card.locator(".images img")
            assert images.count() == 4  # the page's default n
            assert all(images.nth(i).get_attribute("src").startswith("data:image/png;base64,") for i in range(4))
            assert "steps=30" in card.locator(".settings").inner_text()
            assert card.locator(".clip").inner_text().startswith("CLIP score vs the prompt: ")  # one per image
            assert len(card.get_attribute("data-clip-scores").split(",")) == 4
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("GENLAB_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["GENLAB_SCREENSHOT"])
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_the_docs_in_a_real_browser_offline(live_server, tmp_path):
    """/docs renders the API's operations with every request it makes going to this server (any other is refused,
    as on a lab machine with no network)."""
    from playwright.sync_api import sync_playwright

    url, _ = live_server
    elsewhere = []

    def local_only(route):
        if route.request.url.startswith(url + "/") or route.request.url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("**/*", local_only)
        page.goto(f"{url}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        shown = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/generate-image", "/generate-image/stream", "/models", "/health"} <= {text.strip() for text in shown}
        page.locator(".opblock-summary-path", has_text="/models").first.click()
        page.wait_for_selector(".responses-table", timeout=10_000)
        assert not elsewhere, elsewhere
        shot = tmp_path / "docs.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("GENLAB_DOCS_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["GENLAB_DOCS_SCREENSHOT"])
        browser.close()
