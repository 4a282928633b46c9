"""`loom.LLM`: offline batch generation in-process, driving the same engine step loop as the server."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Self, Union

import torch
from tqdm.auto import tqdm

from loom.config import EngineConfig, ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.models.registry import check_tensor_parallel
from loom.engine.core import EngineCore
from loom.multimodal import ImagePrompt, ImagePromptBuilder, is_vision_language
from loom.sampling_params import SamplingParams
from loom.tokenizer import TextStream, finish_reason

# text, token ids, or (vision-language models) text pieces and images in prompt order: PIL images or image paths
# (pathlib.Path; a str is text)
Prompt = Union[str, Sequence[int], Sequence[Any]]


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids (EOS included when it ended the sequence)
    text: str = ""  # generated text without special tokens; a matched stop sequence is kept
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_sequence"
    logprobs: list[float] | None = None  # per generated token, when `details` was asked
    top_tokens: list[list[tuple[int, float]]] | None = None  # per generated token, when `top_n_tokens` > 0
    seed: int | None = None  # the seed used when sampling
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None  # the request failed while generating (no finish reason); the others went on


class LLM:
    """Load a model once, then `generate` batches of prompts through continuous batching.

    >>> llm = LLM("path/to/model")
    >>> llm.generate(["Hello"], SamplingParams(max_new_tokens=8))[0].text

    `tensor_parallel_size=N` shards the model over this process (rank 0: scheduling, sampling) and N-1 spawned
    processes (multiprocessing "spawn": a script that creates the LLM needs an `if __name__ == "__main__":` guard).
    They stop on `close()`, at the end of a `with` block, or when the LLM is garbage-collected or Python exits.
    """

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 tensor_parallel_size: int = 1, quantize: str | None = None, **engine_args):
        self._ranks = None
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if tensor_parallel_size > 1 or get_tp_group().size > 1:
            self._start_ranks(model, dtype, device, tensor_parallel_size)
        try:
            self.engine = EngineCore(model, dtype, EngineConfig(**engine_args), _rank0_device(device), quantize)
        except BaseException:
            self.close()
            raise
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self._images: ImagePromptBuilder | None = None  # made on the first prompt with images

    def _start_ranks(self, model: str | Path, dtype: str | torch.dtype, device: str, size: int) -> None:
        from loom.worker.tp_worker import LocalRanks

        if get_tp_group().size > 1:
            raise RuntimeError("this process already takes part in a tensor-parallel group (another LLM with "
                               "tensor_parallel_size > 1 is open); close it first")
        check_tensor_parallel(ModelConfig.from_dir(model, dtype), size)
        ranks = LocalRanks(size, device)
        self._ranks = weakref.finalize(self, ranks.close)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (if any). The LLM cannot generate afterwards."""
        if self._ranks is not None:
            self._ranks()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[GenerationResult]:
        prompt_list = _as_prompt_list(prompts)
        param_list = _as_param_list(params, len(prompt_list))
        results: dict[str, GenerationResult] = {}
        texts: dict[str, TextStream] = {}
        order = []
        try:
            for prompt, p in zip(prompt_list, param_list):
                rid = f"llm-{next(self._ids)}"
                images = []
                if isinstance(prompt, str):
                    ids = self.tokenizer.encode(prompt)
                elif all(isinstance(t, int) for t in prompt):
                    ids = list(prompt)
                else:
                    built = self._image_prompt(prompt)
                    ids, images = built.token_ids, built.images
                request = self.engine.add_request(rid, ids, p, images=images)
                results[rid] = GenerationResult(
                    prompt if isinstance(prompt, str) else None, ids, seed=request.params.seed,
                    logprobs=[] if p.details else None, top_tokens=[] if p.top_n_tokens else None,
                )
                if p.stop:  # stop sequences are text: matched here, as the router does
                    texts[rid] = TextStream.for_request(self.tokenizer, ids, p.stop)
                order.append(rid)
            self._run(results, texts, use_tqdm if use_tqdm is not None else len(order) >= 32)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        for r in results.values():
            r.text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return [results[rid] for rid in order]

    def _image_prompt(self, pieces: Sequence[Any]) -> ImagePrompt:
        """Text pieces and images (PIL images, or paths to image files) → prompt ids and the engine's images."""
        from PIL import Image

        if self._images is None:
            config = self.engine.model_config
            if not is_vision_language(config.hf_config):
                raise ValueError(f"{config.architecture} is not a vision-language model: it takes no images")
            self._images = ImagePromptBuilder(config.path, config.hf_config)
        loaded = []
        for piece in pieces:
            if isinstance(piece, PathLike):
                with Image.open(piece) as image:
                    piece = image.convert("RGB")
            elif not isinstance(piece, (str, Image.Image)):
                raise TypeError(f"a prompt piece is text, a PIL image or an image path, not {type(piece).__name__}")
            loaded.append(piece)
        return self._images.build(loaded)

    def _run(self, results: dict[str, GenerationResult],
             texts: dict[str, TextStream], show_progress: bool) -> None:
        bar = tqdm(total=len(results), desc="generating", unit="req", disable=not show_progress)
        with bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    r = results.get(out.request_id)
                    if r is None or r.finish_reason is not None:
                        continue
                    if out.error is not None:  # this request failed in the step; the others go on
                        r.error = out.error
                        bar.update(1)
                        continue
                    for i, token in enumerate(out.new_token_ids):
                        r.token_ids.append(token)
                        if r.logprobs is not None:
                            r.logprobs.append(out.new_logprobs[i])
                        if r.top_tokens is not None:
                            r.top_tokens.append(out.new_top_tokens[i])
                        last = out.finished and i == len(out.new_token_ids) - 1
                        text = texts.get(out.request_id)
                        stopped = text.push(token)[1] if text is not None else None
                        reason = finish_reason(out.finish_reason if last else None, stopped)
                        if reason is not None and not last:
                            self.engine.abort_request(out.request_id)  # a stop sequence: the engine runs on
                        if reason is not None:
                            r.finish_reason = reason.value
                            r.num_cached_tokens = out.num_cached_tokens
                            bar.update(1)
                            break


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """A batch of prompts; a lone prompt (text, token ids, or pieces with an image among them) as a batch of one."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    if any(not isinstance(p, (str, list, tuple)) for p in prompts):
        return [prompts]  # one prompt of text pieces and images
    return prompts


def _as_param_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params


def _rank0_device(device: str) -> str:
    from loom.worker.tp_worker import rank_device

    return rank_device(device, 0) if get_tp_group().size > 1 else device
