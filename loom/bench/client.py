"""One streamed request against a TGI (`/generate_stream`) or OpenAI (`/v1/completions`, `/v1/chat/completions`)
endpoint, timed; with images (data URLs) for a vision-language model: chat content parts, or TGI markdown images."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestRecord:
    start: float  # perf_counter when sent
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # seconds to the first token
    e2e: float | None = None  # seconds to the last byte
    output_tokens: int = 0
    server_prompt_tokens: int | None = None  # usage.prompt_tokens (OpenAI) or details.input_length (TGI)
    token_times: list[float] = field(default_factory=list)  # arrival time of each token event (perf_counter)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass(frozen=True)
class BenchPrompt:
    """A prompt's text and the images (data URLs) sent with it."""
    text: str
    images: tuple[str, ...] = ()


def request_body(api: str, prompt: str | BenchPrompt, output_tokens: int, model: str,
                 ignore_eos: bool) -> tuple[str, dict]:
    text, images = (prompt.text, prompt.images) if isinstance(prompt, BenchPrompt) else (prompt, ())
    if api == "tgi":
        params = {"max_new_tokens": output_tokens, "details": True}
        if ignore_eos:
            params["ignore_eos"] = True  # a Loom extension; TGI ignores unknown fields
        # images as TGI's markdown `![](url)`, before the text
        return "/generate_stream", {"inputs": "".join(f"![]({u})" for u in images) + text, "parameters": params}
    body = {"model": model, "max_tokens": output_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # Loom and vLLM honour it
    if api == "chat":  # the prompt is the user's message; the server applies the chat template
        content: str | list[dict] = text
        if images:  # OpenAI content parts: the images, then the text
            content = [*({"type": "image_url", "image_url": {"url": u}} for u in images),
                       {"type": "text", "text": text}]
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": content}]}
    if images:
        raise ValueError("/v1/completions takes no images: use the chat API")
    return "/v1/completions", {**body, "prompt": text}


async def send(client: httpx.AsyncClient, base_url: str, api: str, prompt: str | BenchPrompt, output_tokens: int,
               model: str, ignore_eos: bool, headers: dict[str, str]) -> RequestRecord:
    path, body = request_body(api, prompt, output_tokens, model, ignore_eos)
    rec = RequestRecord(start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = str(event["error"])
                    return rec
                if api != "tgi" and event.get("usage"):
                    if event["usage"].get("prompt_tokens") is not None:
                        rec.server_prompt_tokens = event["usage"]["prompt_tokens"]
                    if not event.get("choices"):  # the closing usage chunk (stream_options.include_usage)
                        usage_tokens = event["usage"].get("completion_tokens")
                        continue
                if api == "tgi" and (event.get("details") or {}).get("input_length") is not None:
                    rec.server_prompt_tokens = event["details"]["input_length"]
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - rec.start
                rec.token_times.append(now)
        rec.e2e = time.perf_counter() - rec.start
        rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.token_times)
        rec.ok = rec.ttft is not None
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    return rec
