"""The scheduler→runner contract: one plain `StepPlan` per engine step.

It holds ids and block tables only (no engine objects), so rank 0 can hand the same plan to other
tensor-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SeqPlan:
    """Compute positions [start, start + len(token_ids)) of one sequence.

        positions: [0 ....... start | start ........ start + len(token_ids))
                    K/V cached        computed this step (K/V written to the cache)
    """

    request_id: str
    token_ids: list[int]
    start: int
    block_ids: list[int]  # block table covering every position up to start + len(token_ids)
    sample: bool  # the last position's logits are returned for sampling
    all_logits: bool = False  # return logits of every position computed (prompt logprobs, parity tests)


@dataclass(slots=True)
class StepPlan:
    seqs: list[SeqPlan]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)
