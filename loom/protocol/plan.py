"""The engine→runner contract: one `StepPlan` per engine step, and the runner's `StepResult` back.

The runner keeps a persistent state per request (its block table, how many positions are computed, its token
history and sampling state), so a plan carries a request in full only when the runner does not hold it yet or
its KV was dropped (first admission, re-admission after preemption: `NewSeq`); a request that ran last step comes
as a diff (`RunningSeq`: how many positions to compute, the blocks added to its table). A decode step for a
running request is therefore a few bytes whatever its context length, and so is rank 0's broadcast of the plan to
the other tensor-parallel ranks. Plain ids only (no engine objects): the plan is msgpack-encoded for those ranks, as arrays (no field names).

    positions of one sequence: [0 ....... start | start ........ start + num_new)
                                K/V cached        computed this step (K/V written to the cache)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from loom.protocol.multimodal import ImageInput
from loom.sampling_params import SamplingParams


class NewSeq(msgspec.Struct, array_like=True):
    """A request the runner holds no KV state for: everything it needs, once."""

    request_id: str
    token_ids: list[int]  # every known token: the prompt, and after a preemption the tokens generated so far
    num_prompt_tokens: int
    start: int  # positions already in the cache (prefix-cache hits)
    num_new: int  # positions computed this step
    block_ids: list[int]  # the whole block table
    params: SamplingParams  # used by the runner that samples (rank 0); others only hold it
    all_logits: bool = False  # score every prompt position (prompt logprobs: TGI's decoder_input_details)
    images: list[ImageInput] = []  # the prompt's images (a vision-language model's runner encodes them)


class RunningSeq(msgspec.Struct, array_like=True):
    """A request the runner holds: the tokens of its next positions (a decode: the token sampled last step; a later
    prompt chunk: the chunk), and the blocks appended to its table since the last plan. Every rank computes the
    positions; only rank 0 samples, so the tokens travel in the plan.

    With speculation, a decode also carries `num_draft` proposed tokens after its last token: the step computes
    their positions too (one forward verifies them) and rank 0 accepts the prefix its own choices agree with.
    `start` is where this step's positions begin: after a verification it tells every rank how many of the last
    step's drafts were accepted (the K/V of rejected ones is overwritten when those positions are computed again).
    """

    request_id: str
    start: int  # positions whose K/V are valid in the cache before this step
    token_ids: list[int]  # this step's tokens: the known ones, then the drafts
    new_block_ids: list[int] = []
    num_draft: int = 0

    @property
    def num_new(self) -> int:
        return len(self.token_ids)


class StepPlan(msgspec.Struct, array_like=True):
    new: list[NewSeq]
    running: list[RunningSeq]
    finished: list[str]  # requests whose state the runner drops (finished, aborted) before this step
    block_size: int
    propose_drafts: bool = False  # rank 0's speculator heads or draft model propose the next step's drafts

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.new) + sum(s.num_new for s in self.running)


@dataclass(slots=True)
class PromptScores:
    """Log-probabilities of prompt tokens scored this step: `logprobs[i]` is the prompt token at position
    `first + i` given the positions before it."""

    first: int
    logprobs: list[float]


@dataclass(slots=True)
class StepResult:
    """What one step produced, for the requests that sampled (those whose step reached their last known position):
    parallel lists in the order of `request_ids`, one entry per new token of the request (one, or with speculation
    the accepted drafts and the token chosen after them)."""

    request_ids: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    top_tokens: list[list[list[tuple[int, float]]]]
    prompt_scores: dict[str, PromptScores]  # requests with prompt logprobs asked whose prompt ran this step
    forward_seconds: float  # the model's forward pass (and the logits), not scheduling or sampling
    # speculator heads (Medusa, MLP speculator): each sampling request's proposed tokens after its new ones
    draft_ids: dict[str, list[int]] = field(default_factory=dict)
    # requests whose own part of the step raised (their grammar, their sampling): request id → why. They are not
    # in `request_ids`; the engine fails them and the rest of the batch goes on.
    failed: dict[str, str] = field(default_factory=dict)
