"""Executes a StepPlan: keeps each request's state, builds the flattened batch and attention metadata, runs the
model, samples, and returns one `StepResult`.

Owns the model weights, the KV cache tensors of this rank, and the per-request state a step needs (block table,
positions computed, token history, seeded generator): the engine sends a request in full once (`NewSeq`) and as a
diff afterwards (`RunningSeq`). Knows nothing about stopping or finishing: the engine's scheduler decides those
and says which requests to drop.

With tensor parallelism the runner is where the ranks meet: rank 0's runner sends each model load and each plan to
the other ranks (`worker/tp_worker.py` runs their loop: `follow`) before running its own shard, so the engine above
it is the same whatever the number of ranks. Only rank 0 samples.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loom.config import ModelConfig
from loom.distributed.comm import RankFailure, broadcast_message
from loom.distributed.parallel_state import get_tp_group, kv_head_range
from loom.layers.forward_context import AttentionMetadata, ForwardContext, PrefillSpan, forward_context
from loom.layers.kernels.build import prebuild
from loom.layers.linear import PackableLinear, pack_linear_weights
from loom.layers.lora import LoraRows
from loom.models.loader import import_model_code, load_model
from loom.protocol import shard
from loom.protocol.multimodal import ImageInput
from loom.protocol.outputs import failure_message
from loom.protocol.plan import PromptScores, StepPlan, StepResult
from loom.sampling_params import SamplingParams
from loom.worker.image_embeds import ImageRows, SeqImages, check_placement
from loom.worker.sampler import Sampler, SamplerOutput, SamplingRow, Watermark

logger = logging.getLogger(__name__)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor for the KV cache. Zeroed, not empty: padded decode rows read slot 0 under a mask, and
    0 × garbage could be NaN. On a CPU the memory is an anonymous mapping, which the OS fills with zeros page by
    page on first touch: the default cache of several GB costs nothing at start-up (torch.zeros wrote all of it:
    8 s of a 14 s start on the bench model) and only the pages in use become resident."""
    if device.type != "cpu" or math.prod(shape) == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


@dataclass(slots=True)
class _SeqState:
    """What the runner holds of one request between steps."""

    token_ids: list[int]  # known tokens; on rank 0 the tokens it samples are appended
    num_prompt_tokens: int
    num_computed: int  # positions whose K/V are in this rank's cache
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # seeded once: the same draws whatever the batch, across preemptions
    all_logits: bool  # score the prompt's positions (prompt logprobs)
    draft_ids: list[int]  # the drafts the last step verified (a rank that does not sample learns from the next
    # plan's `start` how many were accepted)
    images: SeqImages | None = None  # a vision-language model's prompt images and their encoder cache
    # M-RoPE (Qwen2-VL) with images: the prompt's (3, L) positions, and the offset of positions after the prompt
    mrope: tuple[torch.Tensor, int] | None = None


@dataclass(slots=True)
class _StepSeq:
    """One sequence of this step, in batch order."""

    request_id: str
    state: _SeqState
    start: int
    token_ids: list[int]  # this step's tokens, drafts last
    sample: bool  # the step reaches the last known position: its logits pick the next token
    all_logits: bool  # every position's logits are kept (prompt scores)
    num_draft: int = 0  # speculation: the last tokens are drafts, every position's logits verify one

    @property
    def is_decode(self) -> bool:
        """One known token after cached ones (with its drafts): each position attends like a decode."""
        return len(self.token_ids) - self.num_draft == 1 and self.start > 0

    @property
    def num_logit_rows(self) -> int:
        if self.all_logits or self.num_draft:
            return len(self.token_ids)
        return 1 if self.sample else 0


@dataclass(slots=True)
class GuidedMasks:
    """Grammar masks of this step's constrained requests (rows in `request_ids` order), computed by the engine
    while the model runs."""

    request_ids: list[str]
    masks: Future


class ModelRunner:
    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int, device: str = "cpu",
                 num_speculative_heads: int = 0, draft_model: ModelConfig | None = None, num_draft_tokens: int = 0,
                 watermark: Watermark | None = None, kv_cache_dtype: torch.dtype | None = None,
                 lora_adapters: list[tuple[str, str]] | None = None):
        self.model_config = model_config
        self.device = torch.device(device)
        self.block_size = block_size
        self.tp = get_tp_group()
        if self.tp.size > 1 and self.tp.is_driver:
            dtype = str(model_config.dtype).removeprefix("torch.")
            kv_dtype = str(kv_cache_dtype).removeprefix("torch.") if kv_cache_dtype is not None else None
            self._send(shard.LoadModel(str(model_config.path), dtype, model_config.architecture, num_blocks,
                                       block_size, model_config.quantize, model_config.rope_override, kv_dtype))
        # CPU kernels compile (first start on a machine) or load from the cache while the weights load
        # The model's code is imported here, before the kernel thread starts importing too: two threads importing
        # modules of one fresh (never byte-compiled) package raced once in CI (`No module named loom.layers.norm`,
        # the main thread's lookup missing a file while the other thread created the package's __pycache__).
        import_model_code(model_config)
        kernels = threading.Thread(target=prebuild, name="loom-kernel-build", daemon=True)
        if self.device.type == "cpu":
            kernels.start()
        self.model = load_model(model_config, self.device)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.rank_weight_bytes = self._gather_weight_bytes()  # also the point where every rank has its shard
        if self.tp.size > 1 and self.tp.is_driver:
            logger.info("tensor parallel over %d ranks; weights per rank: %s MB", self.tp.size,
                        ", ".join(f"{b / 1e6:.1f}" for b in self.rank_weight_bytes))
        if kernels.is_alive():
            kernels.join()
        self.adapters: dict[str, int] = {}  # LoRA adapter name → index in the layers' deltas
        if lora_adapters:
            self._attach_adapters(lora_adapters)
        packed = pack_linear_weights(self.model)  # after the byte count: packing releases the plain weights
        if packed:
            logger.info("%d linear layers use packed bf16 weights", packed)
        kv_heads = kv_head_range(model_config.num_kv_heads, self.tp)[1]
        shape = (2, num_blocks * block_size, kv_heads, model_config.head_dim)
        self.kv_cache_dtype = kv_cache_dtype or model_config.dtype
        self.kv_caches = [zeroed(shape, self.kv_cache_dtype, self.device) for _ in range(model_config.num_layers)]
        self._block_offsets = torch.arange(block_size, device=self.device)
        self.seqs: dict[str, _SeqState] = {}  # the requests this runner holds; written by `_apply` only
        self.sampler = Sampler(watermark)
        self.heads = None  # speculator heads (rank 0): drafts from the final hidden state of each sampled position
        if num_speculative_heads and self.tp.is_driver:
            from loom.models.speculator_heads import load_speculator_heads

            spec = model_config.speculator
            assert spec is not None
            self.heads = load_speculator_heads(spec, num_speculative_heads, model_config.dtype, self.device)
            if self.tp.size > 1 and getattr(self.heads, "shared_lm_head", False):
                raise ValueError("Medusa heads that share the base model's LM head do not run with tensor "
                                 "parallelism yet")
        self._last_hidden: torch.Tensor | None = None  # the hidden rows of the last logits (heads' input)
        self._propose_drafts = False  # this step's plan asks the heads / draft model for the next drafts
        self.draft = None  # the draft model (rank 0): next to the target, on the same block tables
        self.num_draft_tokens = num_draft_tokens
        if draft_model is not None:
            if self.tp.size > 1:
                raise ValueError("a draft model does not run with tensor parallelism yet")
            from loom.worker.draft_model import DraftModel

            self.draft = DraftModel(draft_model, num_blocks * block_size, block_size, self.device)

    def _attach_adapters(self, adapters: list[tuple[str, str]]) -> None:
        from loom.layers.lora import attach_adapter, read_adapter

        if self.tp.size > 1:
            raise ValueError("LoRA adapters do not run with tensor parallelism yet")
        for name, path in adapters:
            if name in self.adapters:
                raise ValueError(f"LoRA adapter id {name!r} is given twice")
            adapter = read_adapter(name, path)
            layers = attach_adapter(self.model, adapter, len(self.adapters))
            self.adapters[name] = len(self.adapters)
            logger.info("LoRA adapter %s (%s): rank %d on %d layers", name, path, adapter.rank, layers)

    def _lora_rows(self, ordered: list[_StepSeq]) -> LoraRows | None:
        """The rows of each adapter in this step's flattened batch (`ordered`: the seqs in row order)."""
        if not self.adapters:
            return None
        rows: dict[int, list[int]] = {}
        row = 0
        for s in ordered:
            index = self.adapters.get(s.state.params.adapter_id) if s.state.params.adapter_id else None
            if index is not None:
                rows.setdefault(index, []).extend(range(row, row + len(s.token_ids)))
            row += len(s.token_ids)
        return LoraRows({i: torch.tensor(r, dtype=torch.long, device=self.device) for i, r in rows.items()})

    @torch.inference_mode()
    def linear_tokens_per_second(self, rows: int = 256) -> float | None:
        """Tokens per second this rank's linear layers (all but the LM head) compute at `rows` tokens per step.
        About 0.1 s on a CPU; it sizes the default prefill budget. None for a model without such layers (the
        transformers fallback)."""
        seconds = self.linear_seconds([rows], lm_head=False).get(rows)
        return rows / seconds if seconds else None

    @torch.inference_mode()
    def linear_seconds(self, rows: list[int], lm_head: bool = True) -> dict[int, float]:
        """Seconds this rank's linear layers take for a step of each number of `rows`: each distinct weight shape
        timed (best of two) on random input, weighted by how many layers have it; the LM head as one more layer
        when `lm_head`. Empty for a model without such layers (the transformers fallback)."""
        shapes: dict[tuple[int, int], tuple[PackableLinear, int]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, PackableLinear) and (lm_head or not name.endswith("lm_head")):
                key = module.features
                layer, count = shapes.get(key, (module, 0))
                shapes[key] = (layer, count + 1)
        if not shapes:
            return {}
        out = {}
        for n in rows:
            seconds = 0.0
            for (in_features, _), (layer, count) in shapes.items():
                x = torch.randn(n, in_features, device=self.device).to(self.model_config.dtype)
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    layer.matmul(x)
                    best = min(best, time.perf_counter() - start)
                seconds += best * count
            out[n] = seconds
        return out

    def _send(self, msg: shard.Message) -> None:
        broadcast_message(self.tp, *shard.encode(msg))

    def _gather_weight_bytes(self) -> list[int]:
        """Every rank's parameter bytes, in rank order (logged at start-up; tests check the shards' sizes)."""
        if self.tp.size == 1:
            return [self.weight_bytes]
        mine = torch.tensor([self.weight_bytes], dtype=torch.int64)
        parts = [torch.empty_like(mine) for _ in range(self.tp.size)]
        try:
            dist.all_gather(parts, mine, group=self.tp.control)
        except RuntimeError as err:
            raise RankFailure(f"a tensor-parallel rank failed to load its shard: {err}") from err
        return [int(p) for p in parts]

    @torch.inference_mode()
    def execute(self, plan: StepPlan, guided: GuidedMasks | None = None) -> StepResult:
        """Run one step (on rank 0: for every rank), sample, and report. Raises on a step that cannot run; the
        engine then fails the step's requests."""
        seqs, logits, forward_seconds = self._run(plan)
        return self._sample(seqs, logits, guided, forward_seconds)

    @torch.inference_mode()
    def forward_logits(self, plan: StepPlan) -> torch.Tensor:
        """One step without sampling (on rank 0: for every rank): the float32 logits rows, every scored position
        of requests with `all_logits` and the last position of other requests that reach their end. For parity
        checks."""
        return self._run(plan)[1]

    def _run(self, plan: StepPlan) -> tuple[list[_StepSeq], torch.Tensor, float]:
        if self.tp.size > 1:
            self._send(plan)
        try:
            seqs = self._apply(plan)
            started = time.perf_counter()
            logits = self._forward(seqs)
            forward_seconds = time.perf_counter() - started
        except Exception as err:
            if self.tp.size > 1:
                # The other ranks may be waiting in a collective this rank never reached: the group is out of step.
                raise RankFailure(f"tensor-parallel step failed on rank 0: {err}") from err
            raise
        assert logits is not None
        return seqs, logits, forward_seconds

    @torch.inference_mode()
    def follow(self, plan: StepPlan) -> None:
        """A rank other than 0: this rank's part of the step (its logits go to rank 0)."""
        self._forward(self._apply(plan))

    def _apply(self, plan: StepPlan) -> list[_StepSeq]:
        """Update the held states from the plan; the step's sequences in plan order. Positions count as computed
        from here: a step that then fails fails its requests, which the engine drops."""
        for request_id in plan.finished:
            self.seqs.pop(request_id, None)
        self._propose_drafts = plan.propose_drafts
        seqs = []
        for new in plan.new:
            held = self.seqs.get(new.request_id)
            generator = held.generator if held is not None else None  # a preempted request keeps its draws
            if generator is None and new.params.is_sampling and self.tp.is_driver:
                generator = torch.Generator().manual_seed(new.params.seed)  # type: ignore[arg-type]
            state = _SeqState(list(new.token_ids), new.num_prompt_tokens, new.start, list(new.block_ids), new.params,
                              generator, new.all_logits, [])
            if new.images:
                state.images = SeqImages.of(new.images, new.token_ids, self.model.image_token_id)
                if hasattr(self.model, "mrope_positions"):
                    state.mrope = self.model.mrope_positions(new.num_prompt_tokens, new.images, state.images.positions)
            self.seqs[new.request_id] = state
            seqs.append(self._step_seq(new.request_id, state, new.token_ids[new.start : new.start + new.num_new]))
        for diff in plan.running:
            state = self.seqs[diff.request_id]
            state.block_ids.extend(diff.new_block_ids)
            accepted = diff.start - state.num_computed  # drafts of the last step that rank 0 accepted
            if accepted < 0 or accepted > len(state.draft_ids):
                raise AssertionError(f"plan starts {diff.request_id!r} at {diff.start}, the runner has "
                                     f"{state.num_computed} positions and {len(state.draft_ids)} drafts")
            known = diff.start + diff.num_new - diff.num_draft
            if known > len(state.token_ids):  # a rank that does not sample: learns the tokens from the plan
                state.token_ids.extend(state.draft_ids[:accepted])
                state.token_ids.extend(diff.token_ids[len(state.token_ids) - diff.start : diff.num_new - diff.num_draft])
            state.num_computed = diff.start
            seqs.append(self._step_seq(diff.request_id, state, diff.token_ids, diff.num_draft))
        return seqs

    @staticmethod
    def _step_seq(request_id: str, state: _SeqState, token_ids: list[int], num_draft: int = 0) -> _StepSeq:
        start = state.num_computed
        end = start + len(token_ids) - num_draft  # drafts' positions count once accepted (the next plan's start)
        state.num_computed = end
        state.draft_ids = token_ids[len(token_ids) - num_draft :] if num_draft else []
        all_logits = state.all_logits and start < state.num_prompt_tokens - 1
        return _StepSeq(request_id, state, start, token_ids, end == len(state.token_ids), all_logits, num_draft)

    def _forward(self, seqs: list[_StepSeq]) -> torch.Tensor | None:
        """This rank's forward pass; float32 logits on rank 0 (None on the others) in `seqs` order: every position
        of `all_logits` seqs, the last position of other sampling seqs, nothing for the rest."""
        if not seqs:  # a plan that only drops requests
            return torch.empty(0, self.model_config.vocab_size)
        decodes = [s for s in seqs if self._is_decode(s)]
        prefills = [s for s in seqs if not self._is_decode(s)]
        ordered = decodes + prefills
        ids = torch.tensor([t for s in ordered for t in s.token_ids], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(s.start, s.start + len(s.token_ids)) for s in ordered]).to(self.device)
        meta = self._attention_metadata(decodes, prefills)
        first_row, row = {}, 0
        for s in ordered:
            first_row[s.request_id] = row
            row += len(s.token_ids)
        image_rows = self._image_rows(ordered, first_row)
        model_positions = self._mrope_positions(ordered) if any(s.state.mrope for s in ordered) else positions
        with forward_context(ForwardContext(meta, self.kv_caches, self._lora_rows(ordered))):
            if image_rows is None:
                hidden = self.model(ids, model_positions)
            else:
                hidden = self.model(ids, model_positions, image_rows)
        if self.draft is not None:
            self.draft.mirror(ids, positions, meta)
        rows: list[int] = []
        for s in seqs:
            start, n = first_row[s.request_id], len(s.token_ids)
            if s.all_logits or s.num_draft:
                rows.extend(range(start, start + n))
            elif s.sample:
                rows.append(start + n - 1)
        if not rows:
            return torch.empty(0, self.model_config.vocab_size)
        selected = hidden[rows]
        if self.heads is not None:
            self._last_hidden = selected
        logits = self.model.compute_logits(selected)  # gathered to rank 0
        return None if logits is None else logits.float()

    def _is_decode(self, s: _StepSeq) -> bool:
        """Attends like a decode. Not the last prompt position computed alone (after prefix-cache hits) of a model
        whose prompt attends both ways (PaliGemma): it attends to the whole prompt, past a sliding window too."""
        if not s.is_decode:
            return False
        return not (getattr(self.model, "bidirectional_prompt", False) and s.start < s.state.num_prompt_tokens)

    def _mrope_positions(self, seqs: list[_StepSeq]) -> torch.Tensor:
        """(3, T) M-RoPE positions of the step's rows: a prompt with images from its table, every other position
        (text-only prompts, generated tokens) its index plus the request's delta, the same on the three axes."""
        parts = []
        for s in seqs:
            end = s.start + len(s.token_ids)
            if s.state.mrope is None:
                parts.append(torch.arange(s.start, end).expand(3, -1))
                continue
            table, delta = s.state.mrope
            prompt_end = min(end, table.shape[1])
            if s.start < prompt_end:
                parts.append(table[:, s.start : prompt_end])
            if end > max(s.start, prompt_end):
                parts.append((torch.arange(max(s.start, prompt_end), end) + delta).expand(3, -1))
        return torch.cat(parts, dim=1).to(self.device)

    def check_images(self, token_ids: list[int], images: list[ImageInput]) -> None:
        """Refuse (ValueError) images this model cannot take or that are misplaced in the prompt."""
        image_token_id = getattr(self.model, "image_token_id", None)
        if image_token_id is None and not images:
            return
        if image_token_id is None:
            raise ValueError(f"{self.model_config.architecture} is not a vision-language model: image modality is "
                             "not supported")
        check_placement(token_ids, images, image_token_id)

    def _image_rows(self, seqs: list[_StepSeq], first_row: dict[str, int]) -> ImageRows | None:
        """The rows of this step's image positions and their embeddings: the vision tower runs, in one call for
        the whole step, on the images first reached by this step. (A prompt chunk of one token counts as a decode
        row, and may be an image's last position: every sequence is looked at.)"""
        with_images = [s for s in seqs if s.state.images is not None and s.start < s.state.num_prompt_tokens]
        if not with_images:
            return None
        todo = [(s, i) for s in with_images for i in s.state.images.to_encode(s.start, s.start + len(s.token_ids))]
        if todo:
            embeds = self.model.encode_images([s.state.images.images[i] for s, i in todo])
            for (s, i), e in zip(todo, embeds):
                s.state.images.cache[i] = e
        parts = [p for s in with_images
                 for p in s.state.images.rows(s.start, s.start + len(s.token_ids), first_row[s.request_id])]
        if not parts:
            return None
        return ImageRows(torch.cat([r for r, _ in parts]).to(self.device), torch.cat([e for _, e in parts]))

    def _sample(self, seqs: list[_StepSeq], logits: torch.Tensor, guided: GuidedMasks | None,
                forward_seconds: float) -> StepResult:
        """Prompt scores and next tokens from the logits `_forward` returned.

        A request with drafts has one logits row per position: row j chooses the token after draft j (after the
        last known token for j = 0) exactly as a step without drafts would, penalties over the tokens up to that
        position, its grammar mask after those drafts, and a sampling row's draw from the request's generator,
        in order, only while the drafts before it were accepted. The tokens chosen are kept up to the first that
        differs from the draft at its position: the output, and the generator's state after it, are those of one
        step per token. (This is rejection sampling for a draft that proposes one token with certainty: a draft
        is accepted with the probability the target model gives it; after a rejection the token comes from the
        target distribution without the draft.)"""
        scores: dict[str, PromptScores] = {}
        sampler_rows: list[int] = []  # logits rows the sampler gets
        rows: list[SamplingRow] = []
        sampling: list[tuple[_StepSeq, int]] = []  # (seq, its first sampler row)
        row = 0
        for s in seqs:
            n = s.num_logit_rows
            if s.all_logits:
                scores[s.request_id] = self._prompt_scores(s, logits[row : row + n])
            if s.sample:
                sampling.append((s, len(rows)))
                history, params = s.state.token_ids, s.state.params
                if s.num_draft:
                    drafts = s.token_ids[len(s.token_ids) - s.num_draft :]
                    # the tokens up to row j's position, only for the stages that read them (a copy per row)
                    reads_history = params.uses_penalties or params.watermark
                    for j in range(s.num_draft + 1):
                        sampler_rows.append(row + j)
                        rows.append(SamplingRow(params, s.state.generator,
                                                history + drafts[:j] if j and reads_history else history,
                                                drafts[j] if j < s.num_draft else None))
                else:
                    sampler_rows.append(row + n - 1)
                    rows.append(SamplingRow(s.state.params, s.state.generator, history))
            row += n
        result = StepResult([], [], [], [], scores, forward_seconds)
        if not sampling:
            return result
        groups = [(s.request_id, i, 1 + s.num_draft) for s, i in sampling]  # each request's sampler rows
        allowed = None
        if guided is not None and guided.request_ids:
            batch = guided.masks.result()
            for index, why in batch.errors.items():
                result.failed[guided.request_ids[index]] = why
            first = {rid: (i, n) for rid, i, n in groups}
            allowed = ([r for rid in guided.request_ids for r in range(first[rid][0], sum(first[rid]))],
                       batch.allowed)
        sample_logits = logits if len(sampler_rows) == logits.shape[0] else logits[sampler_rows]
        out, failed = self._choose_tokens(sample_logits, rows, allowed,
                                          [g for g in groups if g[0] not in result.failed])
        result.failed.update(failed)
        last_rows = []  # each request's row of its last new token (the speculator heads start there)
        sampling = [(s, i) for s, i in sampling if s.request_id not in result.failed]
        for s, i in sampling:
            end = i + 1
            while end < i + 1 + s.num_draft and out.token_ids[end - 1] == rows[end - 1].draft_id:
                end += 1  # the token chosen at row end-1 is the draft: the next row's choice stands
            tokens = out.token_ids[i:end]
            s.state.token_ids.extend(tokens)
            result.request_ids.append(s.request_id)
            result.token_ids.append(tokens)
            result.logprobs.append(out.logprobs[i:end])
            result.top_tokens.append(out.top_tokens[i:end])
            last_rows.append(sampler_rows[end - 1])
        if not self._propose_drafts:
            self._last_hidden = None
        elif self.heads is not None and self._last_hidden is not None:
            result.draft_ids = self._head_drafts(sampling, last_rows, result.token_ids)
        elif self.draft is not None:
            # each request's newest token sits right after its known tokens and the drafts it accepted
            starts = [s.start + len(s.token_ids) - s.num_draft + len(t) - 1 for (s, _), t in zip(sampling,
                                                                                                result.token_ids)]
            drafts = self.draft.propose([s.state.block_ids for s, _ in sampling], starts,
                                        [t[-1] for t in result.token_ids], self.num_draft_tokens)
            result.draft_ids = {s.request_id: d for (s, _), d in zip(sampling, drafts)}
        return result

    def _choose_tokens(self, logits: torch.Tensor, rows: list[SamplingRow],
                       allowed: tuple[list[int], torch.Tensor] | None,
                       groups: list[tuple[str, int, int]]) -> tuple[SamplerOutput, dict[str, str]]:
        """The sampler over the step's rows, and the requests that failed in it (request id → why). `groups`:
        (request id, first row, rows) of the requests to sample; rows of other requests (a failed grammar) are
        left out. Should the batch raise, each request's rows run again alone, from the logits and generator
        states from before, so that only a request whose own rows raise fails and the others' tokens are those
        the batch would have given."""
        if sum(n for _, _, n in groups) < len(rows):  # leave out the failed requests' rows
            return self._sample_alone(logits, rows, allowed, groups)
        if len(groups) == 1:
            try:
                return self.sampler(logits, rows, allowed), {}
            except Exception as err:
                logger.exception("sampling failed for request %s", groups[0][0])
                return SamplerOutput([0] * len(rows), [0.0] * len(rows), [[] for _ in rows]), \
                    {groups[0][0]: failure_message(err)}
        # the sampler works in place: a copy to start again from (greedy rows only read the logits)
        pristine = logits.clone() if self.sampler.edits_logits(rows, allowed) else logits
        generators = {id(r.generator): r.generator for r in rows if r.generator is not None}
        states = [(g, g.get_state()) for g in generators.values()]
        try:
            return self.sampler(logits, rows, allowed), {}
        except Exception:
            logger.exception("sampling a batch of %d requests failed: each one alone", len(groups))
        for g, state in states:
            g.set_state(state)
        return self._sample_alone(pristine, rows, allowed, groups)

    def _sample_alone(self, logits: torch.Tensor, rows: list[SamplingRow],
                      allowed: tuple[list[int], torch.Tensor] | None,
                      groups: list[tuple[str, int, int]]) -> tuple[SamplerOutput, dict[str, str]]:
        out = SamplerOutput([0] * len(rows), [0.0] * len(rows), [[] for _ in rows])
        failed = {}
        for rid, first, n in groups:
            mine = None
            if allowed is not None:
                picked = [(j, r - first) for j, r in enumerate(allowed[0]) if first <= r < first + n]
                if picked:
                    mine = ([r for _, r in picked], allowed[1][[j for j, _ in picked]])
            try:
                part = self.sampler(logits[first : first + n], rows[first : first + n], mine)
            except Exception as err:
                logger.exception("sampling failed for request %s", rid)
                failed[rid] = failure_message(err)
                continue
            out.token_ids[first : first + n] = part.token_ids
            out.logprobs[first : first + n] = part.logprobs
            out.top_tokens[first : first + n] = part.top_tokens
        return out, failed

    def _head_drafts(self, sampling: list[tuple[_StepSeq, int]], last_rows: list[int],
                     tokens: list[list[int]]) -> dict[str, list[int]]:
        """The speculator heads on the final hidden state of each request's last new token's position (the row
        whose logits chose it) and that token: the next step's drafts."""
        assert self.heads is not None and self._last_hidden is not None
        hidden = self._last_hidden[last_rows]
        chosen = torch.tensor([t[-1] for t in tokens], device=hidden.device)
        drafts = self.heads(hidden, chosen, self.model.compute_logits).tolist()
        self._last_hidden = None
        return {s.request_id: d for (s, _), d in zip(sampling, drafts)}

    @staticmethod
    def _prompt_scores(s: _StepSeq, logits: torch.Tensor) -> PromptScores:
        """Row i (position start + i) scores the prompt token at position start + i + 1."""
        end = min(s.start + logits.shape[0], s.state.num_prompt_tokens - 1)
        if end <= s.start:
            return PromptScores(s.start + 1, [])
        targets = torch.tensor(s.state.token_ids[s.start + 1 : end + 1]).unsqueeze(1)
        picked = torch.log_softmax(logits[: end - s.start], dim=-1).gather(1, targets).squeeze(1)
        return PromptScores(s.start + 1, picked.tolist())

    def _slots(self, block_ids: list[int], num_positions: int) -> torch.Tensor:
        blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return (blocks.unsqueeze(1) * self.block_size + self._block_offsets).flatten()[:num_positions]

    def _attention_metadata(self, decodes: list[_StepSeq], prefills: list[_StepSeq]) -> AttentionMetadata:
        slot_parts: list[torch.Tensor] = []
        tables = lens = None
        num_decode_rows = 0
        if decodes:
            # A decode with drafts is one row per position, each attending like a decode to the positions up to
            # its own (their K/V are all written before attention runs): the same kernel, the same numbers, as
            # computing those positions one step at a time.
            max_blocks = max(len(s.state.block_ids) for s in decodes)
            table_rows, len_rows = [], []
            for s in decodes:
                table = s.state.block_ids + [0] * (max_blocks - len(s.state.block_ids))
                for j in range(len(s.token_ids)):
                    table_rows.append(table)
                    len_rows.append(s.start + 1 + j)
            num_decode_rows = len(len_rows)
            tables = torch.tensor(table_rows, dtype=torch.int32)
            lens = torch.tensor(len_rows, dtype=torch.int32)
            last = lens.long() - 1  # position of each row's new token
            new_slots = tables.long().gather(1, (last // self.block_size).unsqueeze(1)).squeeze(1)
            slot_parts.append(new_slots * self.block_size + last % self.block_size)
            tables, lens = tables.to(self.device), lens.to(self.device)
        spans, row = [], num_decode_rows
        both_ways = getattr(self.model, "bidirectional_images", False)
        whole_prompt = getattr(self.model, "bidirectional_prompt", False)
        for s in prefills:
            ctx_len = s.start + len(s.token_ids)
            slots = self._slots(s.state.block_ids, ctx_len)
            span = PrefillSpan(row, len(s.token_ids), ctx_len, slots)
            prompt_len = s.state.num_prompt_tokens
            if whole_prompt and s.start < prompt_len:
                if ctx_len < prompt_len:  # the scheduler computes such a prompt in one step
                    raise AssertionError(f"{s.request_id}: a step ends at {ctx_len}, inside its prompt of "
                                         f"{prompt_len} tokens that attend to each other both ways")
                span.bidirectional = [(0, prompt_len)]
                span.window_bounds_bidirectional = False
            elif both_ways and s.state.images is not None:
                span.bidirectional = s.state.images.token_ranges(s.start, ctx_len)
            spans.append(span)
            slot_parts.append(slots[s.start :].cpu())
            row += len(s.token_ids)
        slot_mapping = torch.cat(slot_parts).to(self.device)
        return AttentionMetadata(slot_mapping, num_decode_rows, tables, lens, spans, self.block_size)
