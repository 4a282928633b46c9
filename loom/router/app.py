"""The router's FastAPI application: cross-cutting HTTP behaviour (API key, CORS, body limits, draining) and the
route modules, over the shared `RouterState` (router/state.py)."""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response

from loom import __version__, tracing
from loom.router import chat_routes, openai_routes, tgi_routes, vertex_routes
from loom.router.config import RouterConfig
from loom.router.engine_client import EngineClient
from loom.router.errors import InferError, UnavailableError, infer_error_handler
from loom.router.state import BodyError, build_state

logger = logging.getLogger(__name__)

# Routes that need the API key when one is set (TGI's "base routes"); health, info, metrics and docs stay open.
PROTECTED_PATHS = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/vertex", "/invocations",
     "/tokenize"}
)


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

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if config.api_key and request.url.path in PROTECTED_PATHS and request.method == "POST":
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
    app.include_router(vertex_routes.router)
    return app
