"""Live inference on Ray Serve: an HTTP API whose replicas follow a registry alias.

    HTTP ─▶ ModelServer replicas (FastAPI ingress, @serve.batch) ─▶ ONNX Runtime / PyTorch
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
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

import lifelong
from lifelong.config import JobConfig
from lifelong.errors import ConfigError, LifelongError

logger = logging.getLogger("ray.serve")

SMOKE_TEXTS = ["a smoke test before this version serves", "ok"]
# A replica holding for longer than this without a commit (its follower died mid-swap)
# resumes with the version it had.
HOLD_TIMEOUT_S = 10.0
SERVER = "ModelServer"
FOLLOWER = "AliasFollower"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --- settings ----------------------------------------------------------------------------------
def resolve_token(config: JobConfig) -> str | None:
    """The bearer token from serve.auth (env var or file), read where `lifelong serve` runs."""
    import os

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


def serve_settings(config: JobConfig) -> dict:
    """What replicas need, as plain data. The token travels only as its SHA-256."""
    s = config.serve
    token = resolve_token(config)
    return {
        "root": config.storage.root,
        "model": config.served_model,
        "alias": s.alias,
        "app_name": config.serve_app_name,
        "backend": s.backend,
        "threads": s.threads_per_replica,
        "device": "cuda" if s.gpus_per_replica > 0 else "cpu",
        "max_batch_size": s.max_batch_size,
        "batch_wait_timeout_s": s.batch_wait_timeout_s,
        "max_texts": s.max_texts_per_request,
        "max_text_chars": s.max_text_chars,
        "max_new_tokens": s.max_new_tokens,
        "poll_interval_s": s.poll_interval_s,
        "allow_label_change": s.allow_label_change,
        "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
    }


# --- loading a version -------------------------------------------------------------------------
@dataclass
class Loaded:
    version: int
    task: str
    card: dict
    model: object  # inference.Classifier or inference.Generator
    loaded_at: str = field(default_factory=_now)

    @property
    def labels(self) -> list[str] | None:
        return getattr(self.model, "labels", None)


def load_version(settings: dict, version: int) -> Loaded:
    """Load one version with the configured backend and smoke-test it; raises LifelongError."""
    from lifelong.inference import Classifier, Generator
    from lifelong.registry import Registry
    from lifelong.storage import Storage

    registry = Registry(Storage(settings["root"]))
    name = settings["model"]
    card = registry.card(name, version)
    model_dir = registry.local_dir(name, version)
    task = card.get("task", "sequence-classification")
    if task == "sequence-classification":
        model = Classifier(model_dir, settings["backend"], card, threads=settings["threads"], device=settings.get("device", "cpu"))
        out = model.predict(SMOKE_TEXTS)
        probs = np.asarray([list(p["probabilities"].values()) for p in out])
        if (
            probs.shape != (len(SMOKE_TEXTS), len(model.labels))
            or not np.all(np.isfinite(probs))
            or not np.allclose(probs.sum(1), 1, atol=1e-3)
        ):
            raise LifelongError(f"{name}:{version} failed its smoke test: probabilities {probs.tolist()}")
    else:
        model = Generator(model_dir, card, threads=settings["threads"], device=settings.get("device", "cpu"))
        out = model.generate(SMOKE_TEXTS[0], max_new_tokens=2)
        if not isinstance(out["text"], str):
            raise LifelongError(f"{name}:{version} failed its smoke test: generate returned {out!r}")
    return Loaded(version=version, task=task, card=card, model=model)


def check_compatible(current: Loaded, new: Loaded, allow_label_change: bool) -> None:
    if new.task != current.task:
        raise LifelongError(f"version {new.version} is a {new.task} model; this deployment serves {current.task}")
    if current.labels is not None and new.labels != current.labels and not allow_label_change:
        raise LifelongError(
            f"version {new.version} has labels {new.labels}, the serving version has {current.labels} "
            "(set serve.allow_label_change=true to accept a new label set)"
        )


# --- the HTTP API ------------------------------------------------------------------------------
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, description="Texts to classify (at most serve.max_texts_per_request).")


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    truncated: bool = Field(description="True when the text was cut to the model's maximum length.")


class PredictResponse(BaseModel):
    model: str
    version: int
    max_length: int
    predictions: list[Prediction]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="At most serve.max_new_tokens.")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0: greedy decoding.")
    seed: int = 0


class GenerateResponse(BaseModel):
    model: str
    version: int
    text: str
    tokens: int
    truncated: bool = Field(description="True when the prompt was cut to fit the model's positions.")


api = FastAPI(
    title="lifelong inference",
    version=lifelong.__version__,
    description="Predictions from the registry version an alias points at; versions swap live.",
)
bearer = HTTPBearer(auto_error=False)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return JSONResponse(
            status_code=400,
            content={"error": f"the request body is not valid JSON: {detail.get('ctx', {}).get('error', detail['msg'])}", "field": "body"},
        )
    problems = [{"field": _field(e["loc"]), "message": e["msg"]} for e in errors]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse(status_code=422, content={"error": text, "errors": problems})


def _reject(status: int, field_name: str, message: str):
    return HTTPException(status_code=status, detail={"error": f"{field_name}: {message}", "field": field_name})


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    content = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
    return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)


@serve.deployment(name=SERVER)
@serve.ingress(api)
class ModelServer:
    def __init__(self, settings: dict, follower=None):
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

        from lifelong.registry import Registry
        from lifelong.storage import Storage

        version = Registry(Storage(settings["root"])).alias_version(settings["model"], settings["alias"])
        self.versions[version] = load_version(settings, version)
        self.serving = version
        self.task = self.versions[version].task
        self.predict_batch.set_max_batch_size(settings["max_batch_size"])
        self.predict_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self._synced = threading.Event()
        threading.Thread(target=self._first_sync, daemon=True).start()
        logger.info("replica %s serves %s:%s", self.replica, settings["model"], version)

    # -- the first sync: a replica that starts mid-life serves what the others serve ------------
    def _first_sync(self) -> None:
        active = None
        for _ in range(20):
            if self.follower is None:
                break
            try:
                active = self.follower.state.remote().result(timeout_s=2)["active"]
                break
            except Exception:  # the follower may still be starting
                time.sleep(0.5)
        if active is not None and active not in self.versions:
            try:
                with self._load_lock:
                    self.versions[active] = load_version(self.settings, active)
            except LifelongError as e:
                logger.error("replica %s cannot load the active version %s: %s", self.replica, active, e)
                active = None
        if active is not None:
            self.serving = active
        self._synced.set()

    # -- the swap protocol (called by the follower on every replica) -----------------------------
    async def prepare(self, version: int) -> dict:
        """Load and smoke-test `version` next to the serving one; never changes what serves."""
        try:
            if version not in self.versions:
                loaded = await asyncio.to_thread(self._load, version)
                check_compatible(self.versions[self.serving], loaded, self.settings["allow_label_change"])
                self.versions[version] = loaded
            return {"replica": self.replica, "ok": True}
        except Exception as e:  # any failure refuses the version; the replica stays healthy
            return {"replica": self.replica, "ok": False, "error": f"{type(e).__name__}: {e}"}

    def _load(self, version: int) -> Loaded:
        with self._load_lock:
            return load_version(self.settings, version)

    async def hold(self) -> dict:
        """Stop starting batches and wait for the running ones to finish."""
        self.open.clear()
        if self._hold_timer:
            self._hold_timer.cancel()
        self._hold_timer = asyncio.get_running_loop().call_later(HOLD_TIMEOUT_S, self._release_after_timeout)
        await self.drained.wait()
        return {"replica": self.replica, "holding": True}

    def _release_after_timeout(self) -> None:
        logger.warning("replica %s held for %.0f s without a commit: resuming with version %s", self.replica, HOLD_TIMEOUT_S, self.serving)
        self.open.set()

    async def commit(self, version: int) -> dict:
        if version not in self.versions:  # a replica that started during the swap
            self.versions[version] = await asyncio.to_thread(self._load, version)
        previous, self.serving = self.serving, version
        # Keep the previous version loaded: a rollback right after is then instant.
        for v in [v for v in self.versions if v not in (version, previous)]:
            del self.versions[v]
        self.last_swap_error = None
        return self._resume(previous)

    async def release(self) -> dict:
        """Abort a swap: resume with the version that was serving."""
        return self._resume(self.serving)

    def _resume(self, previous: int) -> dict:
        if self._hold_timer:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.open.set()
        if previous != self.serving:
            logger.info("replica %s swapped %s:%s → %s", self.replica, self.settings["model"], previous, self.serving)
        return {"replica": self.replica, "serving": self.serving}

    async def refuse(self, version: int, error: str) -> None:
        if version != self.serving:
            self.versions.pop(version, None)
        self.last_swap_error = {"version": version, "error": error, "at": _now()}
        logger.error("replica %s refused %s:%s: %s", self.replica, self.settings["model"], version, error)

    async def status(self) -> dict:
        return {"replica": self.replica, "serving": self.serving, "loaded": sorted(self.versions)}

    # -- requests ---------------------------------------------------------------------------------
    async def _run(self, fn, *args):
        """Run `fn(loaded, *args)` on the serving version, counted so that hold() can drain."""
        if not self._synced.is_set():  # a new replica learns what the others serve first
            await asyncio.to_thread(self._synced.wait, 15)
        # Re-check after every wake-up: a hold may have closed the gate again before this
        # task ran, and nothing may start between the check and the count.
        while not self.open.is_set():
            await self.open.wait()
        self.running += 1
        self.drained.clear()
        try:
            loaded = self.versions[self.serving]
            return loaded, await asyncio.to_thread(fn, loaded, *args)
        finally:
            self.running -= 1
            if self.running == 0:
                self.drained.set()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, requests: list[list[str]]) -> list[tuple[Loaded, list[dict]]]:
        flat = [text for texts in requests for text in texts]
        loaded, predictions = await self._run(lambda m, texts: m.model.predict(texts), flat)
        out, start = [], 0
        for texts in requests:
            out.append((loaded, predictions[start : start + len(texts)]))
            start += len(texts)
        return out

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        expected = self.settings["token_sha256"]
        if expected is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                {"error": "authorization: a bearer token is required", "field": "authorization"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = hashlib.sha256(credentials.credentials.encode()).hexdigest()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, {"error": "authorization: the bearer token is wrong", "field": "authorization"}, headers={"WWW-Authenticate": "Bearer"}
            )

    @api.post("/v1/predict", response_model=PredictResponse)
    async def predict(
        self, body: PredictRequest, response: Response, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> PredictResponse:
        """Label and probabilities per text, from the version serving now."""
        self._authorize(credentials)
        if self.task != "sequence-classification":
            raise _reject(400, "texts", f"this deployment serves a {self.task} model: use POST /v1/generate")
        if len(body.texts) > self.settings["max_texts"]:
            raise _reject(
                413, "texts", f"{len(body.texts)} texts; at most {self.settings['max_texts']} per request (serve.max_texts_per_request)"
            )
        for i, text in enumerate(body.texts):
            if not text.strip():
                raise _reject(422, f"texts[{i}]", "empty text")
            if len(text) > self.settings["max_text_chars"]:
                raise _reject(
                    413, f"texts[{i}]", f"{len(text)} characters; at most {self.settings['max_text_chars']} (serve.max_text_chars)"
                )
        loaded, predictions = await self.predict_batch(body.texts)
        response.headers["X-Lifelong-Replica"] = self.replica
        return PredictResponse(
            model=self.settings["model"],
            version=loaded.version,
            max_length=loaded.model.max_length,
            predictions=[Prediction(**p) for p in predictions],
        )

    @api.post("/v1/generate", response_model=GenerateResponse)
    async def generate(
        self, body: GenerateRequest, response: Response, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> GenerateResponse:
        """A continuation of the prompt (causal-LM versions, PyTorch backend)."""
        self._authorize(credentials)
        if self.task != "causal-lm":
            raise _reject(400, "prompt", f"this deployment serves a {self.task} model: use POST /v1/predict")
        if len(body.prompt) > self.settings["max_text_chars"]:
            raise _reject(413, "prompt", f"{len(body.prompt)} characters; at most {self.settings['max_text_chars']} (serve.max_text_chars)")
        limit = self.settings["max_new_tokens"]
        if body.max_new_tokens is not None and body.max_new_tokens > limit:
            raise _reject(422, "max_new_tokens", f"{body.max_new_tokens} is above the limit of {limit} (serve.max_new_tokens)")
        new_tokens = body.max_new_tokens or limit
        loaded, out = await self._run(lambda m: m.model.generate(body.prompt, new_tokens, body.temperature, body.seed))
        response.headers["X-Lifelong-Replica"] = self.replica
        return GenerateResponse(model=self.settings["model"], version=loaded.version, **out)

    @api.get("/v1/model")
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """The version this replica serves, its metrics, when it was loaded, and the last refused swap."""
        self._authorize(credentials)
        loaded = self.versions[self.serving]
        follower = {}
        if self.follower is not None:
            try:
                follower = await self.follower.state.remote()
            except Exception as e:  # the follower restarting must not break this endpoint
                follower = {"error": f"follower unavailable: {e}"}
        return {
            "model": self.settings["model"],
            "alias": self.settings["alias"],
            "version": loaded.version,
            "task": loaded.task,
            "backend": self.settings["backend"] if loaded.task == "sequence-classification" else "torch",
            "labels": loaded.labels,
            "max_length": loaded.model.max_length,
            "metrics": loaded.card.get("metrics", {}),
            "exports": loaded.card.get("exports", {}),
            "loaded_at": loaded.loaded_at,
            "replica": self.replica,
            "last_swap_error": follower.get("last_swap_error") or self.last_swap_error,
            "swaps": follower.get("swaps", []),
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.settings["model"], "version": self.serving}


# --- the follower ------------------------------------------------------------------------------
@serve.deployment(name=FOLLOWER, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class AliasFollower:
    """Watches the alias and drives prepare → hold → commit across every ModelServer replica."""

    def __init__(self, settings: dict):
        from lifelong.registry import Registry
        from lifelong.storage import Storage

        self.settings = settings
        self.registry = Registry(Storage(settings["root"]))
        self.active: int | None = None
        self.refused: dict[int, str] = {}
        self.last_swap_error: dict | None = None
        self.swaps: list[dict] = []
        threading.Thread(target=self._follow, daemon=True).start()

    async def state(self) -> dict:
        return {"active": self.active, "last_swap_error": self.last_swap_error, "swaps": self.swaps[-20:], "refused": self.refused}

    def _follow(self) -> None:
        servers = serve.get_deployment_handle(SERVER, self.settings["app_name"])
        name, alias = self.settings["model"], self.settings["alias"]
        last_problem, seen_target = None, None
        while True:
            try:
                if self.active is None:
                    # (Re)started: adopt what the replicas serve.
                    serving = [s["serving"] for s in servers.broadcast("status").results(timeout_s=30)]
                    if serving:
                        self.active = max(set(serving), key=serving.count)
                pointer = self.registry.alias_pointer(name, alias)
                target = int(pointer["version"])
                if target != seen_target:
                    # The alias moved: a version refused earlier gets a fresh try if it comes back.
                    self.refused.clear()
                    seen_target = target
                if self.active is not None and target != self.active and target not in self.refused:
                    self._swap(servers, target, pointer)
            except Exception as e:  # keep following: the registry or a replica may be briefly unavailable
                problem = f"{type(e).__name__}: {e}"
                if problem != last_problem and self.active is not None:  # not while the app is still starting
                    logger.warning("follower of %s@%s: %s", name, alias, problem)
                last_problem = problem
            else:
                last_problem = None
            time.sleep(self.settings["poll_interval_s"])

    def _swap(self, servers, version: int, pointer: dict) -> None:
        name = self.settings["model"]
        started = time.monotonic()
        logger.info("follower: %s@%s moved to %s; preparing every replica", name, self.settings["alias"], version)
        prepared = servers.broadcast("prepare", version).results(timeout_s=600, return_exceptions=True)
        failures = [r if isinstance(r, Exception) else r.get("error") for r in prepared if isinstance(r, Exception) or not r.get("ok")]
        if failures or not prepared:
            error = f"{name}:{version} refused, {self.active} keeps serving: " + ("; ".join(map(str, failures)) or "no replica answered")
            self.refused[version] = error
            self.last_swap_error = {"version": version, "error": error, "at": _now()}
            logger.error("follower: %s", error)
            servers.broadcast("refuse", version, error).results(timeout_s=30, return_exceptions=True)
            return
        holds = servers.broadcast("hold").results(timeout_s=HOLD_TIMEOUT_S / 2, return_exceptions=True)
        if any(isinstance(h, Exception) for h in holds):
            logger.warning("follower: a replica did not hold; releasing and retrying %s later", version)
            servers.broadcast("release").results(timeout_s=30, return_exceptions=True)
            return
        servers.broadcast("commit", version).results(timeout_s=600, return_exceptions=True)
        previous, self.active = self.active, version
        self.last_swap_error = None
        self.swaps.append(
            {
                "from": previous,
                "to": version,
                "kind": pointer.get("kind"),
                "alias_moved_at": pointer.get("moved_at"),
                "committed_at": _now(),
                "seconds_after_seen": round(time.monotonic() - started, 3),
                "replicas": len(prepared),
            }
        )
        logger.info("follower: every replica now serves %s:%s (was %s)", name, version, previous)


# --- building and running the application ------------------------------------------------------
def build_app(config: JobConfig):
    """The Serve application for `config.serve`: ModelServer replicas + their AliasFollower."""
    s = config.serve
    settings = serve_settings(config)
    options = {
        "max_ongoing_requests": s.max_ongoing_requests or 2 * s.max_batch_size,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        "logging_config": {"enable_access_log": s.access_log},
    }
    if s.autoscaling:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    return ModelServer.options(**options).bind(settings, AliasFollower.bind(settings))


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
    if card.get("task") == "sequence-classification" and config.serve.backend != "torch":
        from lifelong.inference import ONNX_FILES

        if config.serve.backend not in card.get("exports", {}):
            raise LifelongError(
                f"{name}:{version} has no {ONNX_FILES[config.serve.backend]}: run "
                f"'lifelong export {name}:{version}' or set serve.backend=torch"
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
