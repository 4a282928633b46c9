"""Google Vertex AI's prediction route as TGI serves it (router/src/vertex.rs): `POST /vertex` with
`{"instances": [...]}` → `{"predictions": ["text", ...]}`.

Each instance is a generate request (`inputs`, of whose `parameters` only `max_new_tokens` and `seed` count: it
always samples) or a chat request (templated as /v1/chat/completions templates it, its text returned as is, tool
calls unparsed). The instances run concurrently, each a request of its own (permit, metrics); if any fails, the
whole request is a 500 `Incomplete generation`, whatever the failure, as in TGI. Template and tool errors of a chat
instance come before any generation, with their own status.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from loom.router.chat_routes import chat_to_generate
from loom.router.errors import CustomError
from loom.router.handlers import body_schema, generate_text, state_of, until_disconnected
from loom.router.openai_schemas import ChatRequest
from loom.router.response_schemas import ErrorResponse, VertexResponse, json_doc
from loom.router.schemas import GenerateParameters
from loom.router.state import RouterState, parse_body

router = APIRouter()


class GenerateVertexInstance(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: GenerateParameters | None = None


class VertexRequest(BaseModel):
    """TGI's untagged `VertexInstance`: a generate instance if it deserializes as one, else a chat request."""

    model_config = ConfigDict(extra="ignore")

    instances: list[Annotated[GenerateVertexInstance | ChatRequest, Field(union_mode="left_to_right")]]


def _vertex_error(status: int, message: str) -> CustomError:
    return CustomError(status, message, message)  # TGI repeats the message as the error type here


async def _prompt_and_params(state: RouterState, instance: GenerateVertexInstance | ChatRequest
                             ) -> tuple[str, GenerateParameters, bool]:
    """(prompt, parameters, add_special_tokens) of one instance."""
    if isinstance(instance, GenerateVertexInstance):
        given = instance.parameters or GenerateParameters()
        params = GenerateParameters(do_sample=True, max_new_tokens=given.max_new_tokens, seed=given.seed,
                                    details=True, decoder_input_details=True)
        return instance.inputs, params, True
    plan = await chat_to_generate(state, state.chat_template, instance)  # template / tool errors: their own status
    return plan.prompt, plan.params, False


async def _predict(state: RouterState, jobs: list[tuple[str, GenerateParameters, bool]]) -> list[str]:
    outcomes = await asyncio.gather(
        *(generate_text(state, prompt, params, add_special_tokens=special) for prompt, params, special in jobs),
        return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, BaseException):  # each failure is already counted by its request's lifecycle
            raise _vertex_error(500, "Incomplete generation") from outcome
    return [result.generated_text for result in outcomes]


@router.post("/vertex", openapi_extra=body_schema(VertexRequest), tags=["Text Generation Inference"], responses={
    200: json_doc(VertexResponse, "One generated text per instance"),
    422: json_doc(ErrorResponse, "No instances, or a chat instance's template or tool error"),
    500: json_doc(ErrorResponse, "An instance failed (any failure, validation included, as in TGI)")})
async def vertex(request: Request) -> Response:
    state = state_of(request)
    body = await parse_body(request, VertexRequest)
    state.metrics.request_count.inc()  # TGI counts the route, and each instance's generation again
    if not body.instances:
        raise _vertex_error(422, "Input validation error")
    jobs = [await _prompt_and_params(state, instance) for instance in body.instances]
    predictions = await until_disconnected(request, state, _predict(state, jobs))
    return JSONResponse({"predictions": predictions})
