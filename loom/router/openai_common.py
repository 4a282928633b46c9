"""Pieces shared by the OpenAI-shaped routes (chat and completions): TGI's parameter mapping and JSON fragments."""

from __future__ import annotations

from loom.router.errors import InferError
from loom.router.generation import TokenInfo
from loom.router.streams import compact, sse_data

# TGI's JSON events have no space after "data:", but its terminator is `data: [DONE]`, the exact line
# huggingface_hub's InferenceClient waits for (it fails on `data:[DONE]`).
DONE = b"data: [DONE]\n\n"


def sampling(temperature: float | None) -> tuple[bool, float | None]:
    """TGI: `temperature: 0` means greedy; anything else, absence included, samples."""
    if temperature == 0.0:
        return False, None
    return True, temperature


def adapter(model: str | None) -> str | None:
    return model if model is not None and model != "tgi" else None


def openai_error(err: InferError) -> bytes:
    """TGI reports every error inside an OpenAI stream with status 422, whatever its kind."""
    return sse_data(compact({"error": {"message": err.message, "http_status_code": 422}}))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish(reason: str) -> str:
    return "stop" if reason == "eos_token" else reason


def logprob_entry(token: TokenInfo, top: list[TokenInfo] | None) -> dict:
    tops = [{"token": t.text, "logprob": t.as_dict()["logprob"]} for t in top or []]
    return {"token": token.text, "logprob": token.as_dict()["logprob"], "top_logprobs": tops}


def logprobs(tokens: list[TokenInfo], top_tokens: list[list[TokenInfo]]) -> dict:
    return {"content": [logprob_entry(t, top_tokens[i] if i < len(top_tokens) else None)
                        for i, t in enumerate(tokens)]}
