"""The router's FastAPI application: cross-cutting HTTP behaviour (API key, CORS, body limits, draining) and the
route modules, over the shared `RouterState` (router/state.py)."""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom import __version__, tracing
from loom.router import chat_routes, openai_routes, tgi_routes, vertex_routes
from loom.router.config import RouterConfig
from loom.router.engine_client import EngineClient
from loom.router.errors import InferError, UnavailableError, infer_error_handler
from loom.router.state import PAYLOAD_TOO_LARGE, BodyError, build_state

logger = logging.getLogger(__name__)

# Routes that need the API key when one is set (TGI's "base routes"); health, info, metrics and docs stay open.
PROTECTED_PATHS = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/vertex", "/invocations",
     "/tokenize"}
)


def _protected(path: str, method: str) -> bool:
    """TGI layers the API key over its base routes whole: every method of those paths (a GET /generate without
    the key is a 401, not a 405 that confirms the route), except the health check that shares "/"."""
    return path in PROTECTED_PATHS and not (path == "/" and method in ("GET", "HEAD"))


class BodyLimit:
    """TGI's `--payload-limit` (axum's DefaultBodyLimit): a body longer than the limit is a 413 when a route reads
    it, whether its Content-Length says so up front or a chunked upload crosses the limit on the way; nothing past
    the limit is read, let alone buffered. (Pure ASGI: it wraps the `receive` every reader of the body goes through;
    the BodyError it raises there becomes the plain-text 413 through the app's handler.)"""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                raise BodyError(413, PAYLOAD_TOO_LARGE)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyError(413, PAYLOAD_TOO_LARGE)
            return message

        await self.app(scope, limited, send)


def create_app(config: RouterConfig, engine_endpoint: str, connect_timeout: float | None = None) -> FastAPI:
    """The app connects to the engine at start-up (waiting for its EngineReady) and closes the connection at exit."""

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

    # Added first, so innermost: the body is read inside the route, where its BodyError becomes the 413.
    app.add_middleware(BodyLimit, limit=config.payload_limit)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if config.api_key and _protected(request.url.path, request.method):
            # TGI compares the whole header case-insensitively; in constant time here, so that response timing
            # tells nothing about how much of a guessed key was right
            given = request.headers.get("authorization", "").lower().encode()
            if not hmac.compare_digest(given, f"bearer {config.api_key}".lower().encode()):
                return Response(status_code=401)
        state = getattr(request.app.state, "loom", None)
        if state is not None and state.draining and request.url.path in PROTECTED_PATHS and request.method == "POST":
            return UnavailableError("Server is shutting down").response()
        if tracing.enabled() and request.url.path in PROTECTED_PATHS:
            carrier = {k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))}
            tracing.request_carrier.set({**carrier, "_path": request.url.path})
        return await call_next(request)

    origins = list(config.cors_allow_origin) or ["*"]
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["content-type"])
    app.include_router(tgi_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(chat_routes.router)
    app.include_router(vertex_routes.router)
    return app
