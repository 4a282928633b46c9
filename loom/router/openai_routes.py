"""The OpenAI-compatible API as TGI serves it: /v1/completions, /v1/models, /chat_tokenize, and SageMaker's
/invocations (router/src/server.rs, router/src/sagemaker.rs); /v1/chat/completions lives in chat_routes.

Each request becomes one native `GenerateParameters` per prompt (TGI's fixed values included) and runs through the
same validation, permits, generator and metrics as the native routes; only the JSON shapes differ.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loom.router import tgi_routes
from loom.router.state import BodyError, RouterState, parse_body
from loom.router.chat_routes import chat, chat_to_generate
from loom.router.errors import CustomError, IncompleteGenerationError, InferError
from loom.router.generation import GenerationResult, StreamItem
from loom.router.handlers import (
    body_schema,
    compute_type,
    generate_text,
    response_headers,
    sse_response,
    state_of,
    stream_text,
    tokens_with_offsets,
    until_disconnected,
)
from loom.router.openai_common import DONE, adapter, openai_error, openai_finish, sampling, usage
from loom.router.openai_schemas import ChatRequest, CompletionRequest, SagemakerRequest
from loom.router.schemas import CompatGenerateRequest, GenerateParameters
from loom.router.response_schemas import ERRORS, ChatTokenizeResponse, Completion, ModelList, json_doc
from loom.router.streams import compact, sse_data

logger = logging.getLogger(__name__)
router = APIRouter()


# ---------------------------------------------------------------------------------------------------------------
# /v1/completions


def _completion_params(req: CompletionRequest) -> GenerateParameters:
    do_sample, temperature = sampling(req.temperature)
    return GenerateParameters(
        adapter_id=adapter(req.model), temperature=temperature, repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty, top_p=req.top_p, do_sample=do_sample,
        max_new_tokens=req.max_tokens, stop=req.stop or [], details=True, decoder_input_details=not req.stream,
        seed=req.seed, ignore_eos=req.ignore_eos,
    )


def completion_event(model: str, fingerprint: str, index: int, item: StreamItem) -> dict:
    """A token of prompt `index`: a chunk with `finish_reason: ""`, or the prompt's final event with its raw
    finish reason (`eos_token` is not mapped here) and its own usage."""
    created = int(time.time())
    r = item.result
    choice = {"index": index, "text": item.token.text, "logprobs": None,
              "finish_reason": r.finish_reason if r is not None else ""}
    if r is None:
        return {"object": "text_completion", "id": "", "created": created, "choices": [choice], "model": model,
                "system_fingerprint": fingerprint}
    return {"object": "text_completion", "id": "", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": [choice],
            "usage": usage(r.input_length, r.generated_tokens)}


async def _completion_events(state: RouterState, prompts: list[str],
                             params: GenerateParameters) -> AsyncIterator[bytes]:
    """Every prompt streams from its own task into one queue, so events interleave as tokens arrive; one
    `[DONE]` ends the stream. Closing this generator cancels the tasks, which aborts their requests."""
    model, fingerprint = state.config.model_id, state.system_fingerprint
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: one prompt finished

    async def run(index: int, prompt: str) -> None:
        try:
            async with aclosing(stream_text(state, prompt, params, add_special_tokens=True)) as items:
                async for item in items:
                    queue.put_nowait(sse_data(compact(completion_event(model, fingerprint, index, item))))
        except InferError as err:
            queue.put_nowait(openai_error(err))
        except Exception:  # a bug: report it and keep the other prompts streaming
            logger.exception("completion stream for prompt %d failed", index)
            queue.put_nowait(openai_error(IncompleteGenerationError()))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.ensure_future(run(i, p)) for i, p in enumerate(prompts)]
    try:
        running = len(tasks)
        while running:
            event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield event
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_SUMMED_HEADERS = ("x-compute-characters", "x-total-time", "x-validation-time", "x-queue-time", "x-inference-time",
                   "x-time-per-token", "x-prompt-tokens", "x-generated-tokens")


async def _completions_json(state: RouterState, prompts: list[str], params: GenerateParameters) -> Response:
    """All prompts run concurrently; choices are listed in completion order and the first error fails the whole
    request (the others are aborted), as in TGI."""

    async def one(index: int, prompt: str) -> tuple[int, str, GenerationResult]:
        return index, prompt, await generate_text(state, prompt, params, add_special_tokens=True)

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    done: list[tuple[int, str, GenerationResult]] = []
    try:
        for next_done in asyncio.as_completed(tasks):
            done.append(await next_done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    choices = [
        {"index": i, "text": r.generated_text, "logprobs": None, "finish_reason": openai_finish(r.finish_reason)}
        for i, _, r in done
    ]
    totals = usage(sum(r.input_length for _, _, r in done), sum(r.generated_tokens for _, _, r in done))
    body = {"object": "text_completion", "id": "", "created": int(time.time()), "model": state.config.model_id,
            "system_fingerprint": state.system_fingerprint, "choices": choices, "usage": totals}
    per_prompt = [response_headers([r], len(p)) for _, p, r in done]
    headers = {"x-compute-type": compute_type()}
    headers.update({k: str(sum(int(h[k]) for h in per_prompt)) for k in _SUMMED_HEADERS})
    return JSONResponse(body, headers=headers)


async def _completions(request: Request, state: RouterState, req: CompletionRequest) -> Response:
    state.metrics.request_count.inc()
    if req.suffix is not None:
        state.metrics.request_failure.labels("validation").inc()
        raise CustomError(422, "suffix not supported",
                          "Suffix is not supported and can be achieved by preprocessing the prompt.")
    limit = state.config.max_client_batch_size
    if len(req.prompt) > limit:
        state.metrics.request_failure.labels("validation").inc()
        raise CustomError(422, "batch size exceeded",
                          f"Number of prompts exceeds the maximum allowed batch size of {limit}")
    params = _completion_params(req)
    if req.stream:
        return sse_response(_completion_events(state, req.prompt, params), sum(len(p) for p in req.prompt))
    return await until_disconnected(request, state, _completions_json(state, req.prompt, params))


@router.post("/v1/completions", openapi_extra=body_schema(CompletionRequest), tags=["OpenAI"], responses={
    200: json_doc(Completion, "A completion (an event stream of Completion events with stream: true)"), **ERRORS})
async def completions(request: Request) -> Response:
    return await _completions(request, state_of(request), await parse_body(request, CompletionRequest))


# ---------------------------------------------------------------------------------------------------------------
# /chat_tokenize, /invocations, /v1/models


@router.post("/chat_tokenize", openapi_extra=body_schema(ChatRequest), tags=["Text Generation Inference"],
             responses={200: json_doc(ChatTokenizeResponse, "The templated prompt and its tokens"), **ERRORS})
async def chat_tokenize(request: Request) -> Response:
    state = state_of(request)
    chat = await parse_body(request, ChatRequest)
    state.metrics.request_count.inc()
    plan = await chat_to_generate(state, state.chat_template, chat)
    tokens = await asyncio.to_thread(tokens_with_offsets, state.tokenizer, plan.prompt, add_special_tokens=False)
    return JSONResponse({"tokenize_response": tokens, "templated_text": plan.prompt})


@router.post("/invocations", openapi_extra=body_schema(SagemakerRequest), tags=["Text Generation Inference"],
             responses={200: {"description": "The response of the route the body's shape selects: POST /, "
                                             "/v1/chat/completions or /v1/completions"}, **ERRORS})
async def invocations(request: Request) -> Response:
    """SageMaker: `inputs` → POST / (compat), `messages` → chat, `prompt` → completions."""
    try:
        body = (await parse_body(request, SagemakerRequest)).root
    except BodyError as err:
        if err.status != 422:
            raise
        raise BodyError(422, "Failed to deserialize the JSON body into the target type: "
                             "data did not match any variant of untagged enum SagemakerRequest") from err
    if isinstance(body, CompatGenerateRequest):
        return await tgi_routes.compat_generate(request)  # re-reads the cached body
    if isinstance(body, ChatRequest):
        return await chat(request, state_of(request), body)
    return await _completions(request, state_of(request), body)


@router.get("/v1/models", tags=["OpenAI"], responses={200: json_doc(ModelList, "The served model")})
async def models(request: Request) -> JSONResponse:
    model_id = request.app.state.loom.config.model_id
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": model_id},
    ]})
