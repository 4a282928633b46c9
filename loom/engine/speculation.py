"""Speculative decoding, the engine's part: propose draft tokens for running decodes, and decide each step how many
of them are worth verifying.

Drafts come from n-gram prompt lookup (`NgramIndex`): the tokens that followed the latest earlier occurrence of the
request's last n tokens (n from `max_n` down to 1) in its prompt + output. The runner verifies them in the same
forward as the decode (each draft is one more query position of the request) and accepts the prefix its own
choices agree with (worker/runner.py), so outputs are exactly those without speculation.

Verifying is not free: every draft is one more row through every matmul, the LM head and attention. `StepCost`
models a step's forward time as a function of its rows (the runner's linear layers timed at start-up at a few row
counts, plus the rest of the step measured on the steps the engine runs), and `Speculator.plan` adds drafts only
while the expected tokens per second of the step grow: a draft at depth j of a request adds the probability that
all of its first j drafts are accepted (from that request's acceptance so far, starting from the engine-wide rate
of proposals of the same n-gram order), and costs the step time its row adds. At batch 1 on a CPU a step is bound
by reading the weights once, so drafts are nearly free and most are kept; at a large batch the matmuls are bound
by arithmetic and only drafts likely to be accepted stay.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger(__name__)

NGRAM_MAX = 4  # longest n-gram looked up (longer matches are rarer and barely more precise)
PRIOR_WEIGHT = 4.0  # positions of the engine-wide rate blended into a request's own acceptance estimate
_ORDER_WINDOW = 2000  # draft positions of history the engine-wide rate of an n-gram order reflects (roughly)
_FIXED_EMA = 0.1  # weight of the latest step in the running estimate of the step time beyond the linear layers


class NgramIndex:
    """For one request: each n-gram (n = 1..max_n) of its tokens → the position right after its latest occurrence
    that has a follower. Updated incrementally: each new token adds one entry per n."""

    __slots__ = ("max_n", "_follow", "_indexed")

    def __init__(self, max_n: int = NGRAM_MAX):
        self.max_n = max_n
        self._follow: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # tokens[:_indexed] are in the index (as followers)

    def _catch_up(self, tokens: Sequence[int]) -> None:
        follow, max_n = self._follow, self.max_n
        for p in range(max(self._indexed, 1), len(tokens)):
            for n in range(1, min(max_n, p) + 1):
                follow[tuple(tokens[p - n : p])] = p
        self._indexed = len(tokens)

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to `k` tokens that followed the longest n-gram matching the end of `tokens` the latest time it
        occurred before, and that n (0 with no match)."""
        self._catch_up(tokens)
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            p = self._follow.get(tuple(tokens[-n:]))
            if p is not None:
                return list(tokens[p : p + k]), n
        return [], 0


class Proposer(Protocol):
    """Where drafts come from: up to `k` tokens likely to follow `tokens`, and a label of how they were found
    (acceptance is tracked per label: for n-gram lookup, the n of the match)."""

    def propose(self, request_id: str, tokens: Sequence[int], k: int) -> tuple[list[int], int]: ...

    def drop(self, request_id: str) -> None: ...

    # proposers fed by the model (speculator heads) also have `receive(request_id, drafts)`


class NgramProposer:
    """Prompt lookup over each request's own tokens, one `NgramIndex` per request."""

    def __init__(self, max_n: int = NGRAM_MAX):
        self.max_n = max_n
        self._indexes: dict[str, NgramIndex] = {}

    def propose(self, request_id: str, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        index = self._indexes.get(request_id)
        if index is None:
            index = self._indexes[request_id] = NgramIndex(self.max_n)
        return index.propose(tokens, k)

    def drop(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)


class HeadProposer:
    """Drafts computed by the model's speculator heads (Medusa, MLP speculator) in the runner at the request's
    last step, handed over by the scheduler (`receive`)."""

    def __init__(self) -> None:
        self._drafts: dict[str, list[int]] = {}

    def receive(self, request_id: str, drafts: list[int]) -> None:
        self._drafts[request_id] = drafts

    def propose(self, request_id: str, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        drafts = self._drafts.pop(request_id, None)
        return (drafts[:k], 0) if drafts else ([], 0)

    def drop(self, request_id: str) -> None:
        self._drafts.pop(request_id, None)


class StepCost:
    """Forward time of a step as a function of its rows: `linear(rows)` measured once (piecewise linear between
    the measured row counts, extrapolated past the last one) plus `fixed`, the rest of the step (attention, norms,
    Python), tracked on real steps."""

    def __init__(self, linear_seconds: dict[int, float]):
        points = sorted(linear_seconds.items())
        if not points:
            raise ValueError("StepCost needs at least one measured row count")
        self._rows = [r for r, _ in points]
        self._seconds = [s for _, s in points]
        self.fixed = 0.0
        self._observed = False

    def linear(self, rows: float) -> float:
        r, s = self._rows, self._seconds
        if len(r) == 1:
            return s[0] * rows / r[0]
        i = bisect.bisect_left(r, rows)
        i = min(max(i, 1), len(r) - 1)  # the segment around `rows` (the first or last one outside the range)
        r0, r1, s0, s1 = r[i - 1], r[i], s[i - 1], s[i]
        return max(0.0, s0 + (s1 - s0) * (rows - r0) / (r1 - r0))

    def __call__(self, rows: float) -> float:
        return self.fixed + self.linear(rows)

    def observe(self, rows: int, forward_seconds: float) -> None:
        rest = max(0.0, forward_seconds - self.linear(rows))
        self.fixed = rest if not self._observed else (1 - _FIXED_EMA) * self.fixed + _FIXED_EMA * rest
        self._observed = True


@dataclass(slots=True)
class _Acceptance:
    """A request's draft positions verified and accepted so far."""

    tried: int = 0
    accepted: int = 0


@dataclass(slots=True)
class DraftCandidate:
    """Drafts proposed for one decode of this step, and the estimated probability that each is accepted given
    that the ones before it are."""

    request_id: str
    draft_ids: list[int]
    order: int  # the n of the n-gram that matched
    accept_rate: float


@dataclass(slots=True)
class SpeculationStats:
    num_draft_tokens: int = 0  # draft positions verified
    num_accepted_tokens: int = 0  # of those, accepted
    num_proposed_tokens: int = 0  # proposed (before the cost model kept some)


@dataclass
class Speculator:
    num_speculative: int  # the most drafts per request and step (--speculate)
    cost: StepCost | None = None  # None: keep every proposal (no cost model: tests, or a device without one)
    proposer: Proposer = field(default_factory=NgramProposer)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _acceptance: dict[str, _Acceptance] = field(default_factory=dict)
    _order_rate: dict[int, list[float]] = field(default_factory=dict)  # n → [accepted, tried] engine-wide

    @property
    def drafts_from_model(self) -> bool:
        """The proposer is fed by the runner's speculator heads or draft model (`receive`), which cost model time."""
        return hasattr(self.proposer, "receive")

    def receive(self, request_id: str, drafts: list[int]) -> None:
        """Drafts the runner's heads / draft model made for a request's next step."""
        self.proposer.receive(request_id, drafts)  # type: ignore[attr-defined]

    def propose(self, request_id: str, tokens: Sequence[int], limit: int) -> DraftCandidate | None:
        """The drafts for a decode of `request_id` whose known tokens are `tokens`, at most `limit`."""
        k = min(self.num_speculative, limit)
        if k <= 0:
            return None
        drafts, order = self.proposer.propose(request_id, tokens, k)
        if not drafts:
            return None
        self.stats.num_proposed_tokens += len(drafts)
        return DraftCandidate(request_id, drafts, order, self._rate(request_id, order))

    def _rate(self, request_id: str, order: int) -> float:
        accepted, tried = self._order_rate.get(order, (1.0, 2.0))  # unseen order: one accepted of two
        prior = accepted / tried
        own = self._acceptance.get(request_id)
        if own is None:
            return prior
        return (own.accepted + PRIOR_WEIGHT * prior) / (own.tried + PRIOR_WEIGHT)

    def plan(self, candidates: list[DraftCandidate], rows: int, expected_tokens: float, max_rows: int) -> None:
        """Trim each candidate's drafts (in place) to those worth verifying in a step of `rows` rows that yields
        `expected_tokens` tokens without drafts, `max_rows` at most. Greedy on the most likely drafts first: a
        draft stays while it raises the step's expected tokens per second."""
        if self.cost is None:
            for c in candidates:
                del c.draft_ids[max(0, max_rows - rows):]
                rows += len(c.draft_ids)
            return
        options = []  # (probability that this draft and all before it are accepted, candidate index, depth)
        for i, c in enumerate(candidates):
            p = 1.0
            for depth in range(1, len(c.draft_ids) + 1):
                p *= c.accept_rate
                options.append((p, i, depth))
        options.sort(key=lambda o: -o[0])
        keep = [0] * len(candidates)
        seconds = self.cost(rows)
        for p, i, depth in options:
            if rows >= max_rows:
                break
            if depth != keep[i] + 1:  # a draft is only useful after the ones before it (sorted: they came first)
                continue
            longer = self.cost(rows + 1)
            if (expected_tokens + p) * seconds <= expected_tokens * longer:
                break  # options are sorted by p: no later one gains more
            keep[i], rows, expected_tokens, seconds = depth, rows + 1, expected_tokens + p, longer
        for c, n in zip(candidates, keep):
            del c.draft_ids[n:]

    def worth_proposing(self, request_ids: list[str], rows: int, expected_tokens: float, max_rows: int) -> bool:
        """Whether the cost model would keep any full-length drafts for these requests in a step like this one:
        a proposer that costs model time (speculator heads, a draft model) runs only then."""
        if not request_ids:
            return False
        candidates = [DraftCandidate(rid, [0] * self.num_speculative, 0, self._rate(rid, 0)) for rid in request_ids]
        self.plan(candidates, rows, expected_tokens, max_rows)
        return any(c.draft_ids for c in candidates)

    def record(self, request_id: str, order: int, num_draft: int, num_accepted: int) -> None:
        """A verification's outcome: `num_accepted` of `num_draft` drafts. The positions tried are the accepted
        ones and the first rejected one (those after it were never compared)."""
        tried = num_accepted + (1 if num_accepted < num_draft else 0)
        own = self._acceptance.get(request_id)
        if own is None:
            own = self._acceptance[request_id] = _Acceptance()
        own.tried += tried
        own.accepted += num_accepted
        rate = self._order_rate.setdefault(order, [1.0, 2.0])
        rate[0] += num_accepted
        rate[1] += tried
        if rate[1] > _ORDER_WINDOW:  # forget slowly: the workload changes
            rate[0] /= 2
            rate[1] /= 2
        self.stats.num_draft_tokens += num_draft
        self.stats.num_accepted_tokens += num_accepted

    def observe_step(self, rows: int, forward_seconds: float) -> None:
        if self.cost is not None and rows > 0:
            self.cost.observe(rows, forward_seconds)

    def drop(self, request_id: str) -> None:
        self.proposer.drop(request_id)
        self._acceptance.pop(request_id, None)
