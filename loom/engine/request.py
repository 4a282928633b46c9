"""A request's state inside the engine. The scheduler is its only writer once it is added."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from loom.protocol.multimodal import ImageInput
from loom.protocol.outputs import FinishReason
from loom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated; positions of the sequence
    num_computed_tokens: int = 0  # positions whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt positions served by the prefix cache at (latest) admission
    num_preemptions: int = 0
    # Prompt logprobs (TGI's decoder_input_details): None when not asked; else filled as prefill chunks run,
    # position 0 has none. Such requests skip the prefix cache, whose hits would leave positions unscored.
    prompt_logprobs: list[float | None] | None = None
    grammar: Any = None  # the llguidance matcher of a constrained request (loom.grammar.guide), else None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None  # why it failed while running (finished as aborted; the client gets a 424)
    images: list[ImageInput] = field(default_factory=list)  # the prompt's images, in prompt order
    # per KV block of the prompt, the content hashes of the images in it (prefix-cache keys); set by the scheduler
    block_extras: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
