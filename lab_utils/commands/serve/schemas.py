"""The bodies ``genlab serve`` answers with, as pydantic models: the OpenAPI document (``/openapi.json``, ``/docs``)
is built from them, and the app builds every body through them, so the document says what the server sends.

(The request, ``GenerateRequest``, is built per app in ``app.request_model``: it carries that server's limits.)
Each model forbids extra keys: a field added to a body and not here fails the API tests instead of going undocumented.
"""

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------ errors
class ErrorBody(_Body):
    """Every refusal (4xx) and failure (5xx): one line of what was wrong and how to fix it."""

    detail: str = Field(description="what was wrong and how to fix it, in one line")
    field: Optional[str] = Field(None, description="the request field at fault (absent: the request as a whole)")
    limit: Optional[Union[int, float, str]] = Field(None, description="that field's bound, where it has one")


def error(description: str) -> dict[str, Any]:
    """One entry of a route's ``responses``: an :class:`ErrorBody` with ``description``."""
    return {"model": ErrorBody, "description": description}


HOST_REFUSED = error("the Host header names no host this server answers to (a DNS-rebinding guard; "
                     "the server's `allowed_hosts` adds names)")
BODY_TIMEOUT = error("the request body did not arrive within `connections.body_timeout_s`; the connection is closed")
REFUSED = error("a field out of its limits, or a body that is not a JSON object: `field` names it, `limit` its bound")
BUSY = error("busy: every worker and queue place is taken; retry after the Retry-After header's seconds")


# ------------------------------------------------------------------------------------ GET /health, GET /models
class Health(_Body):
    status: Literal["ok"]
    models: list[str] = Field(description="the names a request may give as `model`")
    running: int = Field(description="generations running now")
    waiting: int = Field(description="requests queued behind them")
    capacity: int = Field(description="running + waiting at most; one more request is answered 503")


class OptionInfo(_Body):
    """A sampling option of a model: a number within [min, max], or one of ``choices``."""

    type: Literal["integer", "number", "string"]
    help: str
    default: Union[int, float, str, None] = Field(description="what the model uses when the request leaves it out")
    min: Optional[Union[int, float]] = Field(None, description="numbers: the smallest value accepted")
    max: Optional[Union[int, float]] = Field(None, description="numbers: the largest value accepted")
    choices: Optional[list[str]] = Field(None, description="strings: the values accepted")


class ImageInfo(_Body):
    channels: int
    size: int = Field(description="height and width in pixels")


class ModelInfo(_Body):
    name: str = Field(description="what a request gives as `model`")
    family: str
    source: Literal["zoo", "runs"]
    dataset: str
    image: ImageInfo
    parameters: int
    step: int = Field(description="training steps behind the weights")
    options: dict[str, OptionInfo] = Field(description="the sampling options a request may set, by name")
    example_prompts: list[str]
    vocabulary: list[str] = Field(description="the words the model knows; others are read as [UNK]")
    live_preview: bool = Field(description="whether the stream sends x0 estimates while it draws")
    max_prompt_tokens: Optional[int] = Field(
        description="the most tokens of a prompt the model reads, [CLS] included (one token per word after it); "
                    "words past them are ignored and listed in `ignored_words`. null: it reads no prompt")
    clip_scorer: Optional[str] = Field(
        description="the CLIP model (labs/clip, trained from scratch on the model's dataset) that scores its images "
                    "against the prompt: a zoo name, or `cached <key>`. null: none, and `clip_scores` is null")
    clip_score_real: Optional[float] = Field(
        description="the mean CLIP score of the dataset's real test images with their own captions under that scorer "
                    "(the ceiling `genlab eval` reports), where known")


class ServerLimits(_Body):
    prompt_chars: int
    n: int
    steps: int
    timeout_s: float


class ModelList(_Body):
    models: list[ModelInfo]
    limits: ServerLimits


# ------------------------------------------------------------------------------------ POST /generate-image(/stream)
OptionValue = Union[int, float, str, bool, None]
IGNORED_WORDS = ("the prompt's words past the model's `max_prompt_tokens`, which it did not read (the prompt was "
                 "cut there); empty: it read the whole prompt")
CLIP_SCORES = ("each image's CLIP score against the prompt, in the images' order: the cosine similarity of the image's "
               "and the prompt's embeddings in the CLIP model of the dataset (`clip_scorer` of GET /models), in [-1, 1] "
               "(Hessel et al.'s CLIPScore is 2.5 max(cos, 0), torchmetrics' 100 max(cos, 0)); null: no scorer")


class GenerateResult(_Body):
    """The JSON form of ``POST /generate-image``, and the stream's ``done`` event."""

    model: str
    family: str
    prompt: str
    n: int
    seed: int
    options: dict[str, OptionValue] = Field(description="every sampling option as used (the request's, then the "
                                                        "model's defaults)")
    seconds: float = Field(description="time spent drawing (without the queue)")
    unknown_words: list[str] = Field(description="words of the prompt the model does not know (read as [UNK])")
    ignored_words: list[str] = Field(description=IGNORED_WORDS)
    clip_scores: Optional[list[float]] = Field(description=CLIP_SCORES)
    image: str = Field(description="base64 PNG: the n images side by side")
    images: list[str] = Field(description="base64 PNG of each image")


class StreamStart(_Body):
    """The stream's first event, before any drawing."""

    model: str
    family: str
    prompt: str
    n: int
    seed: int
    options: dict[str, OptionValue]
    unknown_words: list[str]
    ignored_words: list[str] = Field(description=IGNORED_WORDS)


class StreamProgress(_Body):
    """The current estimate of the final images (the diffusion families' x0), every ``limits.preview_every`` steps."""

    step: int
    steps: int
    seconds: float
    image: str = Field(description="base64 PNG: the n estimates side by side")
    images: list[str]


class StreamError(ErrorBody):
    """The stream's last event when the generation did not finish."""

    status: int = Field(description="the HTTP status it would have had: 422, 499 (cancelled), 500 or 504")


STREAM_EVENTS: dict[str, type[BaseModel]] = {"start": StreamStart, "progress": StreamProgress,
                                             "done": GenerateResult, "error": StreamError}
