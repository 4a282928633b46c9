"""Closed-loop (fixed concurrency) and open-loop (Poisson arrivals) load, and the statistics of one run."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm

from loom.bench.client import BenchPrompt, RequestRecord, send


@dataclass
class LoadSpec:
    url: str
    api: str  # "openai" | "chat" | "tgi"
    model: str
    output_tokens: int
    ignore_eos: bool = True
    concurrency: int | None = None  # closed loop
    request_rate: float | None = None  # open loop, requests per second (Poisson)
    api_key: str | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency else f"rate={self.request_rate}/s"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class RunResult:
    spec: LoadSpec
    records: list[RequestRecord]
    duration: float

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]

    def summary(self) -> dict:
        ok = self.ok
        out_tokens = sum(r.output_tokens for r in ok)
        server_prompt = [r.server_prompt_tokens for r in ok if r.server_prompt_tokens is not None]
        metrics = {
            "ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [r.tpot for r in ok if r.tpot is not None],
            "itl": [x for r in ok for x in r.itls],
            "e2e": [r.e2e for r in ok if r.e2e is not None],
        }
        s = {
            "url": self.spec.url, "load": self.spec.label, "requests": len(self.records), "completed": len(ok),
            "failed": len(self.records) - len(ok), "duration_s": self.duration,
            "request_throughput": len(ok) / self.duration if self.duration else 0.0,
            "output_throughput": out_tokens / self.duration if self.duration else 0.0,
            "output_tokens": out_tokens,
            # the server's own prompt-token count (text, template and image tokens), when the API reports it
            "mean_server_prompt_tokens": statistics.fmean(server_prompt) if server_prompt else None,
            "errors": sorted({r.error for r in self.records if r.error})[:5],
        }
        for name, values in metrics.items():
            for q in (0.5, 0.9, 0.99):
                s[f"{name}_p{int(q * 100)}"] = percentile(values, q)
            s[f"{name}_mean"] = statistics.fmean(values) if values else None
        return s


async def run_load(spec: LoadSpec, prompts: list[str | BenchPrompt], show_progress: bool = True) -> RunResult:
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    bar = tqdm(total=len(prompts), desc=f"{spec.url} {spec.label}", unit="req", disable=not show_progress)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as client:

        async def one(prompt: str | BenchPrompt) -> RequestRecord:
            rec = await send(client, spec.url, spec.api, prompt, spec.output_tokens, spec.model, spec.ignore_eos,
                             headers)
            bar.update(1)
            return rec

        start = time.perf_counter()
        if spec.concurrency:
            records = await _closed_loop(one, prompts, spec.concurrency)
        else:
            records = await _open_loop(one, prompts, spec.request_rate or 1.0, spec.seed)
        duration = time.perf_counter() - start
    bar.close()
    return RunResult(spec, records, duration)


async def _closed_loop(one, prompts: list, concurrency: int) -> list[RequestRecord]:
    """`concurrency` clients, each sending its next request as soon as the previous one ends."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    records: list[RequestRecord] = []

    async def worker() -> None:
        while not queue.empty():
            records.append(await one(queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _open_loop(one, prompts: list, rate: float, seed: int) -> list[RequestRecord]:
    """Requests arrive as a Poisson process of `rate` per second, whatever the server's pace."""
    rng = random.Random(seed)
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(one(p)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))
