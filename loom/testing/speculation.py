"""A draft proposer for tests: drafts from known continuations, some of them deliberately wrong, so that a test
controls how many drafts the runner accepts and exercises every acceptance length."""

from __future__ import annotations

import random
from collections.abc import Sequence


class OracleProposer:
    """Proposes the next tokens of whichever reference sequence (prompt + expected output) `tokens` is a prefix
    of; each draft token is replaced by a random one with probability `wrong_rate` (seeded)."""

    def __init__(self, references: Sequence[Sequence[int]], vocab_size: int, wrong_rate: float = 0.3, seed: int = 0):
        self.references = [list(r) for r in references]
        self.vocab_size = vocab_size
        self.wrong_rate = wrong_rate
        self._rng = random.Random(seed)
        self.num_proposed = 0

    def propose(self, request_id: str, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        n = len(tokens)
        for ref in self.references:
            if len(ref) > n and ref[:n] == list(tokens):
                drafts = [t if self._rng.random() >= self.wrong_rate else self._rng.randrange(self.vocab_size)
                          for t in ref[n : n + k]]
                self.num_proposed += len(drafts)
                return drafts, 1
        return [], 0

    def drop(self, request_id: str) -> None:
        pass
