"""TGI's error kinds: status code, `error_type`, and the message prefix clients see.

Body: {"error": "<message>", "error_type": "<type>"} (router/src/infer/mod.rs::InferError in TGI).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class InferError(Exception):
    status = 500
    error_type = "generation"
    prefix = ""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.detail = message

    @property
    def message(self) -> str:
        return f"{self.prefix}{self.detail}"

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ValidationError(InferError):
    status, error_type, prefix = 422, "validation", "Input validation error: "


class GenerationError(InferError):
    status, error_type, prefix = 424, "generation", "Request failed during generation: "


class OverloadedError(InferError):
    status, error_type = 429, "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class IncompleteGenerationError(InferError):
    status, error_type = 500, "incomplete_generation"

    def __init__(self) -> None:
        super().__init__("Incomplete generation")


class IncompleteGenerationStreamError(InferError):
    status, error_type = 500, "incomplete_generation_stream"

    def __init__(self) -> None:
        super().__init__("Incomplete generation stream")


class TemplateError(InferError):
    status, error_type, prefix = 422, "template_error", "Template error: "


class ToolError(InferError):
    status, error_type, prefix = 422, "tool_error", "Tool error: "


class UnavailableError(InferError):
    """Draining (SIGTERM received) or the engine is gone."""

    status, error_type = 503, "unavailable"


class CustomError(InferError):
    """Errors whose type and message TGI spells out individually (completions' `suffix not supported`, ...)."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


async def infer_error_handler(_: Request, exc: InferError) -> JSONResponse:
    return exc.response()
