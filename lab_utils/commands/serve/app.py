"""The web service: ``POST /generate-image`` (a prompt in, an image out), its live variant, and the page.

    POST /generate-image          {"prompt": "...", "model": "ddpm", "n": 4, "seed": 0, "steps": 25, ...}
                                  -> image/png (the n images side by side), or JSON with base64 PNGs and the
                                     resolved settings (``"format": "json"`` or ``Accept: application/json``)
    POST /generate-image/stream   the same request -> server-sent events: ``start``, ``progress`` (the current
                                  x0 estimate every few steps, for the diffusion families), ``done`` or ``error``,
                                  and a ``: keep-alive`` comment while a long generation has nothing to send
    GET  /models                  each model's family, dataset, parameters, options and their limits
    GET  /health                  liveness and the queue (HEAD too)
    GET  /                        the page: a prompt, families side by side, the denoising live
    GET  /docs                    Swagger UI on the OpenAPI document (the request schema carries the limits; every
                                  body is a model of ``schemas``), its assets served from here: it works offline

Generation runs in worker threads, never on the event loop; at most ``limits.workers`` run and
``limits.queue`` wait, and one more request is answered 503 with ``Retry-After`` at once. Each request seeds
its own ``torch.Generator``, draws ``n`` images of its prompt in one batch exactly as ``genlab sample`` does
(the same request gives the same pixels as ``genlab sample ... layout=tiles``), and stops with 504 after
``limits.timeout_s``; a client that leaves stops its generation at the next step (both routes).

A prompt longer than a model's tokenizer reads (``max_prompt_tokens``) is cut there, and the answer says so:
``ignored_words`` in the JSON and the stream's events, ``X-Genlab-Ignored-Words`` beside the PNG.

Each image is scored against the prompt by the model's CLIP scorer (``ServedModel.scorer``): ``clip_scores`` in the
JSON and the stream's ``done`` event, ``X-Genlab-Clip-Scores`` beside the PNG (null, or empty, where the model's
dataset has no scorer). The score reads the quantised pixels the PNG holds, after the drawing is timed.

The request's sampling fields are built from the ``SampleOptions`` dataclasses of genlab's families and of the
served models (their types, bounds, choices and help; :func:`lab_utils.commands.serve.models.option_schema`), so a
family's new option is offered, checked and documented here without an edit.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations, and the request
model is built per app, with that app's limits and models.)
"""


import asyncio
import base64
import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.json_schema import models_json_schema

from lab_utils.core.data import words
from lab_utils.core.lab import SampleOptions
from lab_utils.core.plotting import png_bytes, tiles
from lab_utils.core.registry import BUILTIN_LABS, lab_class

from .connections import BodyTimeout
from .models import REQUEST_FIELDS, Limits, ServedModel, ServeConfig, option_schema
from .schemas import (BODY_TIMEOUT, BUSY, HOST_REFUSED, REFUSED, STREAM_EVENTS,
                      GenerateResult, Health, ModelList, StreamError, StreamProgress, StreamStart, error)

STATIC = Path(__file__).parent / "static"
MAX_SEED = 2**53 - 1  # the largest integer every JSON client reads exactly (a JavaScript number's)


class ServeError(Exception):
    """A request the server refuses or could not finish: an HTTP status and one line naming the field."""

    def __init__(self, status: int, detail: str, field: str | None = None, limit: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.field, self.limit, self.headers = status, detail, field, limit, headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        if self.limit is not None:
            out["limit"] = self.limit
        return out


class GenerationTimeout(Exception):
    pass


class Cancelled(Exception):
    pass


# ------------------------------------------------------------------------------------ the request
class _RequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _readable_prompt(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty: describe an image, e.g. \"a large red circle at the top left\"")
        if not (prompt.isascii() and prompt.isprintable()):
            raise ValueError("prompt must be printable ASCII text (the models read English words; "
                             "GET /models lists each model's vocabulary)")
        return prompt


def request_model(limits: Limits, models: Iterable[ServedModel] = ()) -> type[BaseModel]:
    """The body of ``POST /generate-image``, with this server's limits (so the OpenAPI page shows them) and a field
    for each sampling option of genlab's families and of the served ``models``: its type, help and bounds from their
    ``SampleOptions`` fields (the widest over the families that share a name). So a request may name any option a
    family takes, and the model it asks for refuses one it does not take by name (``sampling_options``). An option
    the server cannot bound, or one name with two types, is a ValueError: the server does not start."""
    families = {lab_class(target).SampleOptions: target for target in BUILTIN_LABS}
    families.update({model.lab.SampleOptions: f"model {model.name!r}" for model in models})
    merged: dict[str, dict[str, Any]] = {}
    for options, owner in families.items():
        for name, spec in option_schema(options, limits).items():
            seen = merged.setdefault(name, spec)
            if seen["type"] != spec["type"]:
                raise ValueError(f"the sampling option {name!r} is a {spec['type']} for {owner} but a "
                                 f"{seen['type']} for another family: serve them from two servers")
            if spec["type"] == "string":
                seen["choices"] = sorted(set(seen["choices"]) | set(spec["choices"]))  # each model's: per request
            elif seen is not spec:
                seen.update(min=min(seen["min"], spec["min"]), max=max(seen["max"], spec["max"]))
    options = {}
    for name, spec in merged.items():
        if spec["type"] == "string":
            options[name] = (Optional[Literal[tuple(spec["choices"])]],
                             Field(None, description=f"{spec['help']} (GET /models lists each model's choices)"))
        else:
            options[name] = (Optional[int if spec["type"] == "integer" else float],
                             Field(None, ge=spec["min"], le=spec["max"], description=spec["help"]))
    return create_model(
        "GenerateRequest",
        __base__=_RequestBase,
        prompt=(str, Field(..., max_length=limits.prompt_chars, description="what to draw, in the dataset's words",
                           examples=["a large red circle at the top left"])),
        model=(str, Field(..., max_length=200, description="a model's name from GET /models")),
        n=(int, Field(1, ge=1, le=limits.n, description="images of the prompt")),
        seed=(int, Field(0, ge=0, le=MAX_SEED, description="the same seed gives the same images")),
        **options,
        format=(Optional[Literal["png", "json"]], Field(None, description="png (default) or json; or the Accept header")),
    )


def validation_error(err: RequestValidationError, names: Iterable[str]) -> ServeError:
    """FastAPI's list of errors -> one line naming the first field and its limit (``names``: the request's fields)."""
    errors = err.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    if kind == "json_invalid" or (kind in ("model_attributes_type", "dict_type", "missing") and not loc):
        return ServeError(422, "the request body must be a JSON object, e.g. {\"prompt\": \"a red circle\", "
                               "\"model\": \"ddpm\"}")
    if kind == "missing":
        return ServeError(422, f"{field} is required", field)
    if kind == "extra_forbidden":
        return ServeError(422, f"unknown field {field!r}; the fields are {', '.join(names)}", field)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    limit = next((ctx[key] for key in ("le", "ge", "max_length", "min_length", "expected") if key in ctx), None)
    detail = message if field and message.startswith(f"{field} ") else f"{field}: {message}"
    return ServeError(422, detail, field, limit if isinstance(limit, (int, float, str)) else None)


# ------------------------------------------------------------------------------------ the queue
class Gate:
    """At most ``capacity`` requests admitted (running or waiting); the next one is refused at once."""

    def __init__(self, workers: int, queue: int):
        self.workers, self.capacity = workers, workers + queue
        self.admitted = 0
        self.running = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"running": self.running, "waiting": self.admitted - self.running, "capacity": self.capacity}


# ------------------------------------------------------------------------------------ generation
@dataclass
class Generation:
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    seconds: float
    options: dict[str, Any]  # every sampling option as used (the request's, then the model's defaults)
    clip_scores: Optional[list[float]] = None  # (n,) cos(image, prompt) in the CLIP scorer's space (None: no scorer)


def b64_png(images: torch.Tensor) -> str:
    return base64.b64encode(png_bytes(tiles(images, ncols=min(8, len(images))))).decode("ascii")


def sampling_options(model: ServedModel, body: BaseModel, limits: Limits) -> SampleOptions:
    """The request's sampling options for this model, parsed by its lab (``Lab.sample_options``, the one parser)
    onto its defaults: an option it does not take, or a value out of its field's bounds, is refused naming it."""
    given = {name: value for name, value in body if name not in REQUEST_FIELDS and value is not None}
    takes = option_schema(model.lab.SampleOptions, limits)
    for name, value in given.items():
        if name not in takes:
            raise ServeError(422, f"{name}: model {model.name!r} ({model.family}) takes no option {name}; it takes "
                                  f"{', '.join(takes) if takes else 'no sampling options'}", name)
        spec = takes[name]
        if spec["type"] == "string" and value not in spec["choices"]:
            names = " or ".join(repr(choice) for choice in spec["choices"])
            raise ServeError(422, f"{name}: model {model.name!r} ({model.family}) takes {name} {names}, got "
                                  f"{value!r}", name)
        if spec["type"] != "string" and not spec["min"] <= value <= spec["max"]:
            raise ServeError(422, f"{name}: model {model.name!r} ({model.family}) takes {name} in "
                                  f"[{spec['min']}, {spec['max']}], got {value}", name,
                             spec["min"] if value < spec["min"] else spec["max"])
    try:
        return model.lab.sample_options(given)
    except ValueError as err:
        raise ServeError(422, f"model {model.name!r}: {err}") from None


def run_generation(model: ServedModel, prompt: str, n: int, seed: int, options: SampleOptions, limits: Limits,
                   emit: Callable[[str, dict[str, Any]], None] | None = None,
                   cancelled: threading.Event | None = None) -> Generation:
    """The images of one request (in a worker thread): the same call and generator as ``genlab sample``."""
    lab = model.lab
    device = lab.device
    with model.lock, torch.no_grad():
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()  # its client left while it waited in the queue
        started = time.perf_counter()
        deadline = time.monotonic() + limits.timeout_s

        def on_step(step: int, steps: int, estimate: torch.Tensor) -> None:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled()
            if time.monotonic() > deadline:
                raise GenerationTimeout()
            if emit is not None and step < steps:
                emit("progress", StreamProgress(
                    step=step, steps=steps, seconds=time.perf_counter() - started, image=b64_png(estimate),
                    images=[b64_png(estimate[i:i + 1]) for i in range(len(estimate))]).model_dump())

        generator = torch.Generator(device=device).manual_seed(seed)
        try:
            images = lab.sample_with_progress([prompt] * n, generator, on_step=on_step, every=limits.preview_every,
                                              options=options)
        except (GenerationTimeout, Cancelled):
            raise
        except ValueError as err:  # an option value the family refuses
            raise ServeError(422, f"model {model.name!r}: {err}") from None
        seconds = time.perf_counter() - started
        images = images.float().cpu()
        scores = None
        if model.scorer is not None:  # the PNG's pixels (quantised) against the prompt as typed
            scores = [round(float(score), 4) for score in model.scorer.cosines(images, [prompt] * n)]
        return Generation(images=images, seconds=seconds, options=asdict(options), clip_scores=scores)


@dataclass
class Checked:
    """A request the server will draw: its model, its options parsed by the model's lab, and what of its prompt the
    model will not read as written (words it does not know; words past its ``max_prompt_tokens``)."""

    model: ServedModel
    options: SampleOptions
    unknown_words: list[str]
    ignored_words: list[str]


def ignored_words(model: ServedModel, prompt: str) -> list[str]:
    """The words of ``prompt`` its model's tokenizer cuts off: it reads ``[CLS] w_1 ... w_n``, at most
    ``max_prompt_tokens`` tokens, so the words after the first ``max_prompt_tokens - 1``."""
    limit = model.max_prompt_tokens
    return [] if limit is None else words(prompt)[limit - 1:]


async def until_disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is read, so the next message is ``http.disconnect``: uvicorn sends
    it when the socket closes (the test client when the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _expected(future: asyncio.Future) -> None:
    """Collects a generation's result no one waits for (a client gone): its ``Cancelled`` is no error to log."""
    if not future.cancelled():
        future.exception()


RESULT_HEADERS = {  # beside the PNG (and the JSON, which says the same in its fields)
    "X-Genlab-Seconds": "time spent drawing, without the queue",
    "X-Genlab-Options": "every sampling option as used, as a JSON object",
    "X-Genlab-Unknown-Words": "words of the prompt the model does not know (read as [UNK]), comma-separated",
    "X-Genlab-Ignored-Words": "words of the prompt past the model's `max_prompt_tokens`, which it did not read, "
                              "comma-separated (empty: it read the whole prompt)",
    "X-Genlab-Clip-Scores": "each image's CLIP score against the prompt (the cosine of their embeddings in the lab's "
                            "CLIP model of the dataset), comma-separated, in the images' order (empty: no scorer)",
}


def _documented(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document plus what it cannot infer: the models of the stream's events (``x-events`` on its
    ``text/event-stream``: the JSON of each event's ``data``, by event name)."""
    _, definitions = models_json_schema([(model, "serialization") for model in STREAM_EVENTS.values()],
                                        ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    stream = document["paths"]["/generate-image/stream"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    stream["x-events"] = {name: {"$ref": f"#/components/schemas/{model.__name__}"}
                          for name, model in STREAM_EVENTS.items()}
    return document


# ------------------------------------------------------------------------------------ the app
def create_app(config: ServeConfig, models: dict[str, ServedModel]) -> FastAPI:
    limits, connections = config.limits, config.connections
    Body = request_model(limits, models.values())  # a sampling option it cannot bound stops the server here
    gate = Gate(limits.workers, limits.queue)
    executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="genlab-generate")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    # FastAPIOffline: FastAPI with /docs on Swagger UI's files from the fastapi-offline package, served here: no
    # CDN, so the page works on a machine without a network. No /redoc: ReDoc's page still fetches its logo online.
    app = FastAPIOffline(title="genlab", version="1", lifespan=lifespan, redoc_url=None,
                         swagger_ui_parameters={"validatorUrl": None},  # Swagger UI calls no validator either
                         description="Text-to-image with every family of the lab: a GAN, a VAE, a pixel DDPM, a "
                                     "latent DDPM and a rectified flow, trained on the same data. Models are chosen "
                                     "by name (GET /models). Every error is a JSON object with a one-line `detail`.")
    app.add_middleware(BodyTimeout, seconds=connections.body_timeout_s)
    app.state.models, app.state.gate, app.state.config = models, gate, config

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _documented(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        refused = validation_error(err, Body.model_fields)
        return JSONResponse(refused.body(), status_code=refused.status)

    def check(body: BaseModel) -> Checked:
        model = models.get(body.model)
        if model is None:
            raise ServeError(422, f"model: no model {body.model!r}; this server has {', '.join(models)} "
                                  "(models are chosen by name: GET /models)", "model")
        options = sampling_options(model, body, limits)
        known = set(model.lab.data_info.vocab)
        unknown = sorted({word for word in words(body.prompt) if word not in known})
        return Checked(model, options, unknown, ignored_words(model, body.prompt))

    def admit() -> None:
        if not gate.enter():
            raise ServeError(503, f"the server is busy ({gate.capacity} requests running or waiting); "
                                  f"try again in {limits.retry_after_s} s",
                             headers={"Retry-After": str(limits.retry_after_s)})

    def job(model, body, options, emit=None, cancelled=None) -> Generation:
        with gate._lock:
            gate.running += 1
        try:
            return run_generation(model, body.prompt, body.n, body.seed, options, limits, emit, cancelled)
        finally:
            with gate._lock:
                gate.running -= 1
            gate.leave()

    def result(checked: Checked, body: BaseModel, done: Generation) -> GenerateResult:
        return GenerateResult(model=checked.model.name, family=checked.model.family, prompt=body.prompt, n=body.n,
                              seed=body.seed, options=done.options, seconds=round(done.seconds, 4),
                              unknown_words=checked.unknown_words, ignored_words=checked.ignored_words,
                              clip_scores=done.clip_scores, image=b64_png(done.images),
                              images=[b64_png(done.images[i:i + 1]) for i in range(len(done.images))])

    too_long = f"the generation took longer than {limits.timeout_s:g} s"
    retry_after = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    refusals = {400: HOST_REFUSED, 408: BODY_TIMEOUT, 422: REFUSED, 503: {**BUSY, "headers": retry_after}}

    @app.post("/generate-image", responses={
        200: {"model": GenerateResult,
              "description": "the n images side by side (PNG; the default), or JSON (`\"format\": \"json\"` or "
                             "`Accept: application/json`)",
              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "headers": {name: {"description": text, "schema": {"type": "string"}}
                          for name, text in RESULT_HEADERS.items()}},
        **refusals, 504: error(f"{too_long} (`limits.timeout_s`); ask for fewer images or steps")})
    async def generate_image(body: Body, request: Request) -> Response:  # type: ignore[valid-type] (Body: this limits)
        """Draw ``n`` images of ``prompt`` with ``model``: the write-ups' endpoint (a prompt in, an image out). A client
        that disconnects stops its generation at the next step."""
        checked = check(body)
        admit()
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        work = loop.run_in_executor(executor, job, checked.model, body, checked.options, None, cancelled)
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left (or the server stops): no one will read the images
                cancelled.set()
                work.add_done_callback(_expected)
        if not work.done():
            return Response(status_code=499)  # nginx's "client closed request"; no one receives it
        try:
            done = work.result()
        except GenerationTimeout:
            raise ServeError(504, f"{too_long}; ask for fewer images or steps") from None
        headers = {"X-Genlab-Seconds": f"{done.seconds:.4f}", "X-Genlab-Options": json.dumps(done.options),
                   "X-Genlab-Unknown-Words": ",".join(checked.unknown_words),
                   "X-Genlab-Ignored-Words": ",".join(checked.ignored_words),
                   "X-Genlab-Clip-Scores": ",".join(f"{score:.4f}" for score in done.clip_scores or [])}  # RESULT_HEADERS
        accept = request.headers.get("accept", "")
        wants_json = body.format == "json" or (body.format is None and "application/json" in accept
                                               and "image/png" not in accept)
        if wants_json:
            return JSONResponse(result(checked, body, done).model_dump(), headers=headers)
        return Response(png_bytes(tiles(done.images, ncols=min(8, len(done.images)))), media_type="image/png",
                        headers=headers)

    @app.post("/generate-image/stream", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "server-sent events, each `event: <name>` and `data: <JSON>`: start, progress (the "
                             "x0 estimates, diffusion families), then done or error; their JSON is the model "
                             "`x-events` names (StreamStart, StreamProgress, GenerateResult, StreamError). A "
                             f"`: keep-alive` comment comes every `connections.sse_keep_alive_s` "
                             f"({connections.sse_keep_alive_s:g} s) with nothing else to send."},
        **refusals})
    async def generate_stream(body: Body, request: Request) -> StreamingResponse:  # type: ignore[valid-type]
        """The same request as ``/generate-image``, answered as server-sent events while it draws."""
        checked = check(body)
        admit()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(name: str, data: dict[str, Any]) -> None:  # from the worker thread
            loop.call_soon_threadsafe(events.put_nowait, (name, data))

        def failed(status: int, detail: str, **more: Any) -> None:
            emit("error", StreamError(status=status, detail=detail, **more).model_dump(exclude_none=True))

        def work() -> None:
            try:
                done = job(checked.model, body, checked.options, emit, cancelled)
                emit("done", result(checked, body, done).model_dump())
            except GenerationTimeout:
                failed(504, too_long)
            except Cancelled:
                failed(499, "cancelled")
            except ServeError as err:
                failed(err.status, **err.body())
            except Exception as err:  # noqa: BLE001 (a bug must end the stream, not leave the page waiting)
                failed(500, f"generation failed: {type(err).__name__}: {err}")

        # Submitted now, not when the stream is first read: the job leaves the queue even if no one reads it.
        loop.run_in_executor(executor, work)

        async def stream():
            yield sse("start", StreamStart(model=checked.model.name, family=checked.model.family, prompt=body.prompt,
                                           n=body.n, seed=body.seed, options=asdict(checked.options),
                                           unknown_words=checked.unknown_words,
                                           ignored_words=checked.ignored_words).model_dump())
            try:
                while True:
                    try:
                        name, data = await asyncio.wait_for(events.get(), connections.sse_keep_alive_s)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # a comment: proxies and the client see the stream alive
                        continue
                    yield sse(name, data)
                    if name in ("done", "error"):
                        break
            finally:
                cancelled.set()  # if the client left early, the worker stops at its next step

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/models", response_model=ModelList, response_model_exclude_unset=True, responses={400: HOST_REFUSED})
    async def list_models() -> dict[str, Any]:
        """Every model this server holds: family, dataset, parameters, sampling options and their limits."""
        return {"models": [model.describe(limits) for model in models.values()],
                "limits": {"prompt_chars": limits.prompt_chars, "n": limits.n, "steps": limits.steps,
                           "timeout_s": limits.timeout_s}}

    @app.get("/health", response_model=Health, responses={400: HOST_REFUSED})
    async def health() -> Health:
        """Liveness and the queue."""
        return Health(status="ok", models=list(models), **gate.state())

    @app.head("/health", response_class=Response, responses={200: {"description": "GET /health's headers, no body"},
                                                            400: {"description": HOST_REFUSED["description"]}})
    async def health_head() -> Response:
        """Liveness, for a monitor that asks with HEAD: the status and headers of ``GET /health``."""
        return JSONResponse((await health()).model_dump())  # the server sends no body for a HEAD

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
