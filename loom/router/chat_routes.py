"""/v1/chat/completions as TGI serves it (router/src/server.rs `chat_completions`, router/src/chat.rs): messages
templated into one native generation, `response_format` as its grammar, tools as a tool-call grammar whose output
becomes OpenAI `tool_calls` (see loom.router.tools)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loom.router.state import RouterState, parse_body
from loom.router.chat import ChatTemplate, Tool
from loom.router.errors import InferError, TemplateError, ToolError
from loom.router.generation import GenerationResult, StreamItem
from loom.router.handlers import (
    body_schema,
    generate_text,
    response_headers,
    sse_response,
    state_of,
    stream_text,
    until_disconnected,
)
from loom.router.openai_common import (
    DONE,
    adapter,
    logprob_entry,
    logprobs,
    openai_error,
    openai_finish,
    sampling,
    usage,
)
from loom.router.openai_schemas import ChatRequest
from loom.router.schemas import GenerateParameters
from loom.router.response_schemas import ERRORS, ChatCompletion, json_doc
from loom.router.streams import compact, sse_data
from loom.router.tools import (
    NO_TOOL,
    ToolCallStream,
    next_tool_call_id,
    parse_tool_call,
    selected_tools,
    template_uses_tools,
    tool_call_message,
    tool_grammar,
    with_tool_prompt,
)

router = APIRouter()


@dataclass(frozen=True)
class ChatPlan:
    prompt: str
    params: GenerateParameters
    tools: list[Tool] | None  # set when the output is a tool call


async def chat_to_generate(state: RouterState, template: ChatTemplate, chat: ChatRequest, *,
                           use_tools: bool = True) -> ChatPlan:
    """TGI's `ChatRequest::try_into_generate`: template the messages and fill the native parameters.
    `use_tools=False` is the plain re-run after the model chose `no_tool`."""
    if chat.response_format is not None and chat.tools is not None:
        raise ToolError("Grammar and tools are mutually exclusive")
    tools = selected_tools(chat.tools, chat.tool_choice) if use_tools else None
    messages, template_tools, grammar = chat.messages, None, chat.response_format
    if tools:
        messages, template_tools = with_tool_prompt(
            chat.messages, tools, chat.tool_prompt, template_uses_tools(template.source))
        grammar = tool_grammar(tools)
    try:
        prompt = await asyncio.to_thread(template.apply, messages, template_tools)
    except TemplateError:
        state.metrics.request_failure.labels("template").inc()
        raise
    do_sample, temperature = sampling(chat.temperature)
    params = GenerateParameters(
        adapter_id=adapter(chat.model), temperature=temperature,
        repetition_penalty=None if chat.presence_penalty is None else chat.presence_penalty + 2.0,
        frequency_penalty=chat.frequency_penalty, top_p=chat.top_p, do_sample=do_sample,
        max_new_tokens=chat.max_tokens, stop=chat.stop or [], details=True, decoder_input_details=False,
        seed=chat.seed, top_n_tokens=chat.top_logprobs, grammar=grammar,
    )
    return ChatPlan(prompt, params, tools)


def _envelope(obj: str, model: str, fingerprint: str) -> dict:
    return {"object": obj, "id": "", "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}


def chat_chunk(model: str, fingerprint: str, item: StreamItem, with_logprobs: bool,
               delta: dict | None = None) -> dict:
    if delta is None:
        delta = {"role": "assistant", "content": "" if item.token.special else item.token.text}
    choice = {
        "index": 0, "delta": delta,
        "logprobs": {"content": [logprob_entry(item.token, item.top_tokens)]} if with_logprobs else None,
        "finish_reason": openai_finish(item.result.finish_reason) if item.result is not None else None,
    }
    return {**_envelope("chat.completion.chunk", model, fingerprint), "choices": [choice], "usage": None}


class _NoTool(Exception):
    """The model chose `no_tool`: the stream restarts as plain chat."""


async def _chat_events(state: RouterState, chat: ChatRequest, plan: ChatPlan, model: str) -> AsyncIterator[bytes]:
    fingerprint = state.system_fingerprint
    include_usage = chat.stream_options is not None and chat.stream_options.include_usage

    def usage_chunk(result: GenerationResult) -> bytes:
        return sse_data(compact({**_envelope("chat.completion.chunk", model, fingerprint), "choices": [],
                                 "usage": usage(result.input_length, result.generated_tokens)}))

    try:
        try:
            async for event in _stream_plan(state, chat, plan, model, usage_chunk if include_usage else None):
                yield event
        except _NoTool:
            plain = await chat_to_generate(state, state.chat_template, chat, use_tools=False)
            async for event in _stream_plan(state, chat, plain, model, usage_chunk if include_usage else None):
                yield event
    except InferError as err:
        yield openai_error(err)
    yield DONE


async def _stream_plan(state: RouterState, chat: ChatRequest, plan: ChatPlan, model: str,
                       usage_chunk) -> AsyncIterator[bytes]:
    fingerprint, with_logprobs = state.system_fingerprint, bool(chat.logprobs)
    calls = ToolCallStream(next_tool_call_id(chat.messages)) if plan.tools else None
    async with aclosing(stream_text(state, plan.prompt, plan.params, add_special_tokens=False)) as items:
        async for item in items:
            if calls is None:
                yield sse_data(compact(chat_chunk(model, fingerprint, item, with_logprobs)))
            else:
                deltas = calls.push("" if item.token.special else item.token.text)
                if calls.no_tool:
                    raise _NoTool  # leaving the `async with` aborts this generation in the engine
                if deltas or item.result is not None:
                    delta = {"role": "assistant", "tool_calls": deltas} if deltas else {"role": "assistant"}
                    yield sse_data(compact(chat_chunk(model, fingerprint, item, with_logprobs, delta)))
            if usage_chunk is not None and item.result is not None:
                yield usage_chunk(item.result)


async def _chat_json(request: Request, state: RouterState, chat: ChatRequest, plan: ChatPlan,
                     model: str) -> Response:
    result = await until_disconnected(
        request, state, generate_text(state, plan.prompt, plan.params, add_special_tokens=False))
    message: dict = {"role": "assistant", "content": result.generated_text}
    if plan.tools:
        call = parse_tool_call(result.generated_text)
        if call.name == NO_TOOL:  # re-run as plain chat; usage and headers are the second run's (TGI)
            plan = await chat_to_generate(state, state.chat_template, chat, use_tools=False)
            return await _chat_json(request, state, chat, plan, model)
        message = tool_call_message(call)
    choice = {
        "index": 0, "message": message,
        "logprobs": logprobs(result.tokens, result.top_tokens) if chat.logprobs else None,
        "finish_reason": openai_finish(result.finish_reason),
    }
    body = {**_envelope("chat.completion", model, state.system_fingerprint), "choices": [choice],
            "usage": usage(result.input_length, result.generated_tokens)}
    return JSONResponse(body, headers=response_headers([result], len(plan.prompt)))


async def chat(request: Request, state: RouterState, body: ChatRequest) -> Response:
    state.metrics.request_count.inc()
    plan = await chat_to_generate(state, state.chat_template, body)  # template and tool errors: JSON, with status
    model = body.model if body.model is not None else state.config.model_id
    if body.stream:
        return sse_response(_chat_events(state, body, plan, model), len(plan.prompt))
    return await _chat_json(request, state, body, plan, model)


@router.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest), tags=["OpenAI"], responses={
    200: json_doc(ChatCompletion, "A chat completion (an event stream of ChatCompletionChunk with stream: true)"),
    **ERRORS})
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatRequest)
    return await chat(request, state_of(request), body)
