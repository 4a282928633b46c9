"""The router's FastAPI application: shared state, cross-cutting HTTP behaviour, and the route modules."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from transformers import PreTrainedTokenizerBase

from loom import __version__, tracing
from loom.router.chat import ChatTemplate
from loom.router.config import RouterConfig
from loom.router.engine_client import EngineClient
from loom.router.errors import InferError, OverloadedError, UnavailableError, infer_error_handler
from loom.router.generation import Generator
from loom.router.metrics import Metrics
from loom.router.validation import Limits
from loom.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# Routes that need the API key when one is set (TGI's "base routes"); health, info, metrics and docs stay open.
PROTECTED_PATHS = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/invocations", "/tokenize"}
)


class BodyError(Exception):
    """A request body TGI's JSON extractor would reject: plain-text body, status 400/413/415/422."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RouterState:
    config: RouterConfig
    engine: EngineClient
    tokenizer: PreTrainedTokenizerBase
    limits: Limits
    generator: Generator
    metrics: Metrics
    permits: asyncio.Semaphore
    chat_template: ChatTemplate
    draining: bool = False

    @contextmanager
    def permit(self, count: int = 1) -> Iterator[None]:
        """TGI's non-blocking try-acquire of `max_concurrent_requests`: no free permit → 429 at once."""
        if self.permits._value < count:
            self.metrics.request_failure.labels("overloaded").inc()
            raise OverloadedError()
        for _ in range(count):
            self.permits._value -= 1
        try:
            yield
        finally:
            for _ in range(count):
                self.permits.release()

    @property
    def in_flight(self) -> int:
        """Requests holding a concurrency permit (generating or streaming)."""
        return self.config.max_concurrent_requests - self.permits._value  # noqa: SLF001

    @property
    def system_fingerprint(self) -> str:
        return f"{__version__}-native"


async def parse_body(request: Request, model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower().endswith("json"):
        raise BodyError(415, "Expected request with `Content-Type: application/json`")
    raw = await request.body()
    if len(raw) > request.app.state.loom.config.payload_limit:  # bodies sent without a Content-Length
        raise BodyError(413, "Failed to buffer the request body: length limit exceeded")
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise BodyError(400, f"Failed to parse the request body as JSON: {err}") from err
    try:
        return model.model_validate(data)
    except PydanticValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BodyError(
            422, f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"
        ) from err


def build_state(config: RouterConfig, engine: EngineClient) -> RouterState:
    assert engine.ready is not None, "connect the engine client before building the router"
    tokenizer = load_tokenizer(config.model_dir)
    max_total = min(config.max_total_tokens or engine.ready.max_total_tokens, engine.ready.max_total_tokens)
    max_input = config.max_input_tokens or max_total - 1
    limits = Limits(
        config.max_best_of, config.max_stop_sequences, config.max_top_n_tokens, max_input, max_total,
        config.disable_grammar_support,
    )
    metrics = Metrics(max_input, max_total, engine.ready.max_batch_total_tokens)
    engine.on_step = metrics.observe_step
    return RouterState(
        config, engine, tokenizer, limits, Generator(engine, tokenizer, config.enable_prefill_logprobs), metrics,
        asyncio.Semaphore(config.max_concurrent_requests),
        ChatTemplate.load(tokenizer, config.model_dir, config.tokenizer_config_path),
    )


def create_app(config: RouterConfig, engine_endpoint: str, connect_timeout: float | None = None) -> FastAPI:
    """The app connects to the engine at start-up (waiting for its EngineReady) and closes the connection at exit."""
    from loom.router import chat_routes, openai_routes, tgi_routes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = EngineClient(engine_endpoint)
        await engine.connect(connect_timeout)
        app.state.loom = build_state(config, engine)
        logger.info("router connected to the engine at %s", engine_endpoint)
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(
        title="Loom", version=__version__, lifespan=lifespan, openapi_url="/api-doc/openapi.json", docs_url="/docs",
        description="Text generation inference compatible with Hugging Face TGI",
    )
    app.add_exception_handler(InferError, infer_error_handler)

    @app.exception_handler(BodyError)
    async def _body_error(_: Request, exc: BodyError) -> Response:
        return PlainTextResponse(exc.message, status_code=exc.status)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if config.api_key and request.url.path in PROTECTED_PATHS and request.method == "POST":
            if request.headers.get("authorization", "").lower() != f"bearer {config.api_key}".lower():
                return Response(status_code=401)
        state = getattr(request.app.state, "loom", None)
        if state is not None and state.draining and request.url.path in PROTECTED_PATHS and request.method == "POST":
            return UnavailableError("Server is shutting down").response()
        if tracing.enabled() and request.url.path in PROTECTED_PATHS:
            carrier = {k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))}
            tracing.request_carrier.set({**carrier, "_path": request.url.path})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.payload_limit:
            return PlainTextResponse("Failed to buffer the request body: length limit exceeded", status_code=413)
        return await call_next(request)

    origins = list(config.cors_allow_origin) or ["*"]
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["content-type"])
    app.include_router(tgi_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(chat_routes.router)
    return app
