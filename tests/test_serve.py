"""`genlab serve`: the API through the ASGI test client (every endpoint, every refused input, determinism against
`genlab sample`, the queue, the timeout), then a live server on 127.0.0.1: a bounded load test and a real
browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image

from conftest import GENLAB, REPO, data_info, subprocess_env
from lab_utils.commands.serve import Limits, ServeConfig, ServedModel, create_app
from lab_utils.core.lab import Lab
from lab_utils.core.plotting import tiles
from lab_utils.harness.checkpoint import LoadedLab
from lab_utils.harness.zoo import load
from labs.vae.lab import VAESampleOptions

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LIMITS = Limits(n=8, steps=60, queue=4, timeout_s=60, preview_every=5)


@pytest.fixture(scope="module")
def models():
    return {name: ServedModel(name, "zoo", load(name)) for name in ("vae", "ddpm", "dcgan")}


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(ServeConfig(models=list(models), limits=LIMITS), models)) as test_client:
        yield test_client


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def expected_tiles(model: str, prompt: str, n: int, seed: int, **options) -> np.ndarray:
    """What `genlab sample pretrained=<model> ... layout=tiles` draws (one batch, one generator)."""
    lab = load(model).lab
    images = lab.sample([prompt] * n, generator=torch.Generator().manual_seed(seed), **options)
    return tiles(images, ncols=min(8, n))


# ------------------------------------------------------------------------------------ the API
def test_health_and_models(client):
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


def test_a_body_that_is_not_json(client):
    for content in (b"garbage", b"[1, 2]", b""):
        response = client.post("/generate-image", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "JSON object" in response.json()["detail"], response.text


def test_stream_reports_progress_then_the_same_image(client):
    body = {"prompt": "a large green triangle in the center", "model": "ddpm", "n": 2, "seed": 5, "steps": 20}
    with client.stream("POST", "/generate-image/stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in text.strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names == ["start", "progress", "progress", "progress", "done"]  # every 5 of 20 steps, then the result
    assert [data["step"] for name, data in events if name == "progress"] == [5, 10, 15]
    estimate = pixels(base64.b64decode(events[1][1]["image"]))
    done = pixels(base64.b64decode(events[-1][1]["image"]))
    assert estimate.shape == done.shape and not np.array_equal(estimate, done)  # an early x0 estimate
    np.testing.assert_array_equal(done, expected_tiles("ddpm", body["prompt"], 2, 5, steps=20))
    refused = client.post("/generate-image/stream", json={**body, "steps": 1000})
    assert refused.status_code == 422 and refused.json()["field"] == "steps"


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


def blocking_model() -> ServedModel:
    lab = BlockingLab()
    return ServedModel("blocker", "runs", LoadedLab(lab, OmegaConf.create({"model": {"name": "blocker"}}), {},
                                                    Path("blocker")))


def test_a_full_queue_answers_503_with_retry_after():
    model = blocking_model()
    limits = Limits(queue=1, retry_after_s=7)
    with TestClient(create_app(ServeConfig(models=["blocker"], limits=limits), {"blocker": model})) as client:
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
        model.lab.release.set()
        first.join(10)
        second.join(10)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert client.get("/health").json()["running"] == 0


def test_a_slow_generation_answers_504(models):
    limits = Limits(timeout_s=0.01, preview_every=1)
    with TestClient(create_app(ServeConfig(models=["ddpm"], limits=limits), {"ddpm": models["ddpm"]})) as client:
        response = client.post("/generate-image", json={"prompt": "a red circle", "model": "ddpm", "steps": 200})
        assert response.status_code == 504 and "longer than 0.01 s" in response.json()["detail"]
        assert client.get("/health").json() == {"status": "ok", "models": ["ddpm"], "running": 0, "waiting": 0,
                                                "capacity": 1 + limits.queue}


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
        shot = tmp_path / "serve.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("GENLAB_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["GENLAB_SCREENSHOT"])
        browser.close()
