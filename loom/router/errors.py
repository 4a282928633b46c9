"""TGI's error kinds: status code, `error_type`, and the message prefix clients see.

Body: {"error": "<message>", "error_type": "<type>"} (router/src/infer/mod.rs::InferError in TGI).
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import JSONResponse

# An absolute POSIX path of two or more components; not the path part of a URL (`://x/y`, `host/a/b`), a JSON
# pointer (`#/a/b`) or a relative path.
_ABS_PATH = re.compile(r"(?<![\w.:/#<>~-])/(?:[\w.+@-]+/)+[\w.+@-]*")
_TRACE_LINE = re.compile(r'^\s*(?:Traceback \(most recent call last\)|File "|Exception raised from |frame #\d)')


def scrub(message: str, first_line: bool = False) -> str:
    """An exception's text made fit for a client: stack-trace lines dropped (or everything after the first line),
    absolute file system paths replaced by `<path>`. For messages the server did not write itself (tokenizer,
    template, grammar compiler, engine)."""
    lines = message.strip().splitlines()
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        lines = lines[-1:]  # a formatted traceback: its last line is the exception
    lines = [line for line in lines if not _TRACE_LINE.match(line)]
    return _ABS_PATH.sub("<path>", "\n".join(lines[:1] if first_line else lines))


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
