"""The router's shared state (one per process, built once the engine is connected), request-body parsing, and the
concurrency permits. Its own module so that the app and the route modules import it, not each other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from transformers import PreTrainedTokenizerBase

from loom import __version__
from loom.multimodal import ImagePromptBuilder, is_vision_language
from loom.router import strict_json
from loom.router.chat import ChatTemplate
from loom.router.config import RouterConfig
from loom.router.engine_client import EngineClient
from loom.router.errors import OverloadedError
from loom.router.images import VisionInputs
from loom.router.generation import Generator
from loom.router.metrics import Metrics
from loom.router.validation import Limits
from loom.tokenizer import load_tokenizer

M = TypeVar("M", bound=BaseModel)


@dataclass
class Permits:
    """TGI's `max_concurrent_requests`: a non-blocking try-acquire, no free permit → 429 at once. The router is one
    asyncio thread and nothing here awaits, so a plain counter is exact."""

    limit: int
    in_use: int = 0

    def try_acquire(self, count: int) -> bool:
        if self.in_use + count > self.limit:
            return False
        self.in_use += count
        return True

    def release(self, count: int) -> None:
        assert count <= self.in_use, "released more permits than were held"
        self.in_use -= count


PAYLOAD_TOO_LARGE = "Failed to buffer the request body: length limit exceeded"


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
    permits: Permits
    chat_template: ChatTemplate
    draining: bool = False
    vision: VisionInputs | None = None  # a vision-language model's image inputs

    @contextmanager
    def permit(self, count: int = 1) -> Iterator[None]:
        """TGI's non-blocking try-acquire of `max_concurrent_requests`: no free permit → 429 at once."""
        if not self.permits.try_acquire(count):
            raise OverloadedError()  # counted by the request's lifecycle (router/handlers.py)
        try:
            yield
        finally:
            self.permits.release(count)

    @property
    def in_flight(self) -> int:
        """Requests holding a concurrency permit (generating or streaming)."""
        return self.permits.in_use

    @property
    def system_fingerprint(self) -> str:
        return f"{__version__}-native"


async def parse_body(request: Request, model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower().endswith("json"):
        raise BodyError(415, "Expected request with `Content-Type: application/json`")
    raw = await request.body()  # at most --payload-limit bytes (app.BodyLimit), else a 413
    try:
        data = strict_json.loads(raw)
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
    metrics = Metrics(max_input, max_total, engine.ready.max_batch_total_tokens, engine.ready.speculate)
    engine.on_step = metrics.observe_step
    engine.on_queue_state = metrics.observe_queue_state
    return RouterState(
        config, engine, tokenizer, limits, Generator(engine, tokenizer, config.enable_prefill_logprobs), metrics,
        Permits(config.max_concurrent_requests),
        ChatTemplate.load(tokenizer, config.model_dir, config.tokenizer_config_path), vision=vision_inputs(config),
    )


def vision_inputs(config: RouterConfig) -> VisionInputs | None:
    """TGI: a model whose config has a vision tower takes markdown images in its prompts."""
    cfg_file = Path(config.model_dir) / "config.json"
    hf = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}  # the top-level keys say it
    if not is_vision_language(hf):
        return None
    return VisionInputs(ImagePromptBuilder(config.model_dir, hf), config.max_image_fetch_size)


