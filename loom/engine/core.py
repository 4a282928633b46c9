"""The engine: one step = schedule → execute (the runner runs the model and samples) → update (the scheduler
advances the requests) → report new tokens.

`EngineCore` is driven by a loop that calls `step()` while there is work: `loom.LLM` in-process, or the engine
process behind the router. It owns the scheduler (the only writer of request state), the KV manager and the runner
(the only writer of its per-request batch state).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch

from loom.config import EngineConfig, ModelConfig
from loom.distributed.parallel_state import get_tp_group
from loom.engine.kv.kv_manager import KVCacheManager
from loom.protocol.multimodal import ImageInput
from loom.protocol.outputs import RequestOutput
from loom.engine.request import Request
from loom.engine.scheduler import Scheduler
from loom.engine.speculation import HeadProposer, NgramProposer, Speculator, StepCost
from loom.grammar.guide import GrammarGuide
from loom.sampling_params import SamplingParams, check_max_new_tokens, check_token_budget, resolve_max_new_tokens
from loom.tokenizer import eos_token_ids, load_tokenizer
from loom.protocol.plan import StepResult
from loom.worker.runner import GuidedMasks, ModelRunner
from loom.worker.sampler import Watermark

logger = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def rope_override(config: EngineConfig) -> tuple[str, float] | None:
    """TGI's launcher rule: --rope-factor alone means linear scaling; --rope-scaling needs a factor."""
    if config.rope_scaling is None and config.rope_factor is None:
        return None
    if config.rope_factor is None:
        raise ValueError(f"--rope-scaling {config.rope_scaling} needs --rope-factor")
    return (config.rope_scaling or "linear", float(config.rope_factor))


# Drafts per step with a draft model when --speculate is not given (vLLM's examples and llama.cpp's default range)
DEFAULT_DRAFT_TOKENS = 4


def check_same_vocabulary(target, draft, draft_path) -> None:
    """A draft model must speak the target's tokens: the same token → id map."""
    if target.get_vocab() != draft.get_vocab():
        raise ValueError(f"the draft model {draft_path} has a different tokenizer vocabulary from the target's "
                         f"({len(draft)} vs {len(target)} tokens): drafts would be other tokens")


# A CPU engine computes a few hundred tokens per second at most: past this many cached tokens, more KV memory only
# lengthens start-up (the cache is zeroed) without admitting useful work.
DEFAULT_MAX_KV_TOKENS_CPU = 131_072


def kv_cache_tokens(model: ModelConfig, config: EngineConfig, max_total_tokens: int, device: str,
                    tp_size: int = 1) -> int:
    """The KV budget: `max_batch_total_tokens` when given, else a share of available memory, never more than a
    full batch of full-length sequences could use (nor DEFAULT_MAX_KV_TOKENS_CPU on CPU).

    With tensor parallelism every rank caches its key/value heads for every token; when the ranks outnumber the
    heads, heads are copied, so the ranks together hold tp_size / num_kv_heads copies of one rank's cache. The
    memory share is for all of them (ranks assumed on this host: on several hosts the cache is smaller than it
    could be, never larger)."""
    if config.max_batch_total_tokens is not None:
        return config.max_batch_total_tokens
    copies = max(1.0, tp_size / model.num_kv_heads)
    kv_dtype = kv_cache_dtype(config)
    per_token = model.kv_bytes_per_token(kv_dtype)
    by_memory = int(available_memory_bytes() * config.kv_memory_fraction / copies) // per_token
    tokens = min(by_memory, config.max_batch_size * max_total_tokens)
    if torch.device(device).type == "cpu":
        # the cap is in bytes of a 16-bit cache: an fp8 cache holds twice the tokens in it
        tokens = min(tokens, DEFAULT_MAX_KV_TOKENS_CPU * model.kv_bytes_per_token(torch.bfloat16) // per_token)
    return max(tokens, config.block_size)


KV_CACHE_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(config: EngineConfig) -> torch.dtype | None:
    """TGI's --kv-cache-dtype: None keeps the model's dtype."""
    if config.kv_cache_dtype is None:
        return None
    dtype = KV_CACHE_DTYPES.get(config.kv_cache_dtype)
    if dtype is None:
        raise ValueError(f"kv_cache_dtype {config.kv_cache_dtype!r}: TGI's --kv-cache-dtype takes "
                         f"{' or '.join(KV_CACHE_DTYPES)}")
    return dtype


class EngineCore:
    def __init__(
        self, model_path: str | Path, dtype: str | torch.dtype = "auto", config: EngineConfig | None = None,
        device: str = "cpu", quantize: str | None = None,
    ):
        self.config = config = config or EngineConfig()
        if config.speculate < 0:
            raise ValueError(f"speculate must be >= 0, got {config.speculate}")
        if not 0.0 < config.watermark_gamma < 1.0:
            raise ValueError(f"watermark gamma must be in (0, 1), got {config.watermark_gamma}")
        self.model_config = ModelConfig.from_dir(model_path, dtype, quantize, rope_override(config),
                                                 config.trust_remote_code)
        heads = self.model_config.speculator
        if heads is not None:  # TGI: speculate defaults to the speculator's head count, and may not exceed it
            if config.speculate > heads.num_heads:
                raise ValueError(f"Speculate is set to `{config.speculate}` but this {heads.kind} speculator only "
                                 f"has `{heads.num_heads}` heads, please make them match")
            self.config = config = replace(config, speculate=config.speculate or heads.num_heads)
        draft = None
        if config.draft_model is not None:
            if heads is not None:
                raise ValueError("a draft model and speculator heads cannot be used together")
            draft = ModelConfig.from_dir(config.draft_model, self.model_config.dtype)
            self.config = config = replace(config, speculate=config.speculate or DEFAULT_DRAFT_TOKENS)
        model_path = self.model_config.path  # a GGUF file's is the directory built from it
        self.tokenizer = load_tokenizer(model_path)
        if draft is not None:
            check_same_vocabulary(self.tokenizer, load_tokenizer(draft.path), draft.path)
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)
        limit = min(config.max_total_tokens or self.model_config.max_model_len, self.model_config.max_model_len)
        kv_tokens = kv_cache_tokens(self.model_config, config, limit, device, get_tp_group().size)
        num_blocks = max(kv_tokens // config.block_size, 1)
        self.max_total_tokens = min(limit, num_blocks * config.block_size)
        self.runner = ModelRunner(self.model_config, num_blocks, config.block_size, device,
                                  num_speculative_heads=config.speculate if heads is not None else 0,
                                  draft_model=draft, num_draft_tokens=config.speculate,
                                  watermark=Watermark(config.watermark_gamma, config.watermark_delta),
                                  kv_cache_dtype=kv_cache_dtype(config),
                                  lora_adapters=[(name, path) for name, path in config.lora_adapters])
        if config.max_batch_prefill_tokens is None:
            self.config = config = replace(config, max_batch_prefill_tokens=self._default_prefill_budget(device))
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.speculator = self._speculator(device) if config.speculate > 0 else None
        self.scheduler = Scheduler(config, self.kv, self.speculator)
        self.scheduler.whole_images = bool(getattr(self.runner.model, "bidirectional_images", False))
        self.scheduler.whole_prompts = bool(getattr(self.runner.model, "bidirectional_prompt", False))
        self.last_forward_seconds = 0.0  # the latest step's forward pass (the engine server reports it)
        self.grammar = GrammarGuide(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        logger.info(
            "engine ready: %s (%s), KV cache %d blocks × %d tokens (%s), max total tokens %d",
            self.model_config.architecture, self.model_config.dtype, num_blocks, config.block_size,
            config.kv_cache_dtype or "model dtype",
            self.max_total_tokens,
        )

    def _default_prefill_budget(self, device: str) -> int:
        """TGI infers `max_batch_prefill_tokens` as the tokens its GPU computes in about a second (peak FLOPs over
        the model's FLOPs per token). On a CPU the same rule, from a measured rate: a step of that size keeps the
        matmuls at their efficient size, while a 4096-token step would hold every running decode and every
        waiting prompt's first token for several seconds (measured on the bench model, 2 Zen 4 cores, c=16: a
        budget of 512 halved TTFT p50 against 4096 at the same throughput). Rounded down to a multiple of 256,
        within 256..4096, so that small differences between runs do not change it."""
        if torch.device(device).type != "cpu":
            return 4096
        tokens_per_second = self.runner.linear_tokens_per_second()
        if tokens_per_second is None:
            return 4096
        budget = min(4096, max(256, int(tokens_per_second) // 256 * 256))
        logger.info("max_batch_prefill_tokens: %d (this machine computes ~%.0f tokens/s through the model's linear "
                    "layers; about one second per step, as TGI infers it)", budget, tokens_per_second)
        return budget

    def _speculator(self, device: str) -> Speculator:
        """n-gram speculation, with a cost model from this machine's linear layers timed at a few row counts
        (about as long as a forward of each; the rest of a step's time is learnt from the steps that run)."""
        speculate = self.config.speculate
        heads = self.model_config.speculator
        proposer = HeadProposer() if heads is not None or self.config.draft_model else NgramProposer()
        cost = None
        if torch.device(device).type == "cpu":
            rows = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256} | {min(512, self.config.max_batch_size * (speculate + 1))})
            seconds = self.runner.linear_seconds(rows)
            if seconds:
                cost = StepCost(seconds)
                logger.info("speculation: up to %d draft tokens per request from %s; linear layers take %s ms at "
                            "%s rows", speculate, f"{heads.kind} heads" if heads else
                            f"draft model {self.config.draft_model}" if self.config.draft_model else "n-gram lookup",
                            ", ".join(f"{seconds[r] * 1e3:.1f}" for r in rows), ", ".join(map(str, rows)))
        return Speculator(speculate, cost, proposer)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt_logprobs: bool = False,
        images: list[ImageInput] | None = None,
    ) -> Request:
        """Validate and queue a request. Raises ValueError (nothing queued) for input the engine cannot serve.
        `images`: the prompt's images, preprocessed and placed (`loom.multimodal.prompts`)."""
        params.validate()
        params = params.with_seed()
        if params.adapter_id is not None and params.adapter_id not in self.runner.adapters:
            # TGI: an adapter id the server did not load runs on the base model
            logger.warning("request %s: LoRA adapter %r is not loaded (--lora-adapters); running the base model",
                           request_id, params.adapter_id)
            params = replace(params, adapter_id=None)
        if not prompt_token_ids:
            raise ValueError("`inputs` cannot be empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        max_new = resolve_max_new_tokens(params.max_new_tokens, len(prompt_token_ids), self.max_total_tokens)
        check_token_budget(len(prompt_token_ids), max_new, self.max_total_tokens)
        check_max_new_tokens(max_new)  # a prompt that fills the context leaves no room
        self.runner.check_images(prompt_token_ids, images or [])
        request = Request(
            request_id, list(prompt_token_ids), params, max_new, self.eos_token_ids,
            prompt_logprobs=[None] if prompt_logprobs else None,
            grammar=self.grammar.matcher(params.grammar) if params.grammar is not None else None,
            images=list(images or ()),
        )
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled.seqs:
            return []
        plan = self.scheduler.make_plan(scheduled)
        guided = [s for s in scheduled.seqs if s.samples and s.request.grammar is not None]
        masks = None
        if guided:  # the masks depend only on the tokens so far (and the drafts): computed while the model runs
            future = self.grammar.masks_async([s.request.grammar for s in guided], [s.draft_ids for s in guided])
            masks = GuidedMasks([s.request.request_id for s in guided], future)
        result = self.runner.execute(plan, masks)
        self.last_forward_seconds = result.forward_seconds
        if self.speculator is not None:
            self.speculator.observe_step(plan.num_tokens, result.forward_seconds)
        requests = {s.request.request_id: s.request for s in scheduled.seqs}
        tokens_before = {rid: r.num_tokens for rid, r in requests.items()}
        finished = self.scheduler.update(scheduled, result)
        failed = [RequestOutput(r.request_id, finished=True, num_prompt_tokens=r.num_prompt_tokens, error=r.error)
                  for r in finished if r.error is not None]
        return self._outputs(requests, tokens_before, result) + failed

    @staticmethod
    def _outputs(requests: dict[str, Request], tokens_before: dict[str, int],
                 result: StepResult) -> list[RequestOutput]:
        outputs = []
        for i, rid in enumerate(result.request_ids):
            r = requests[rid]
            if r.error is not None:
                continue  # failed after sampling: reported as a failure
            # the scheduler drops the tokens after a stop among several accepted ones: report those it kept
            kept = r.num_tokens - tokens_before[rid]
            first = tokens_before[rid] == r.num_prompt_tokens
            outputs.append(RequestOutput(
                rid, result.token_ids[i][:kept], result.logprobs[i][:kept],
                result.top_tokens[i][:kept] if r.params.top_n_tokens else [],
                r.is_finished, r.finish_reason,
                r.num_prompt_tokens, r.num_cached_tokens, r.params.seed,
                r.prompt_logprobs if first and r.prompt_logprobs is not None else None,
            ))
        return outputs

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        held = self.kv.num_tables()
        running = len(self.scheduler.running)
        assert held == running, f"{held} block tables for {running} running requests"
