"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous range of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.parallel_state import get_tp_group
from loom.layers.linear import CheckpointTensor, PackableLinear, copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.local_vocab = -(-vocab_size // self.tp.size)  # ceil: the last rank's rows past vocab_size stay zero
        self.vocab_start = self.tp.rank * self.local_vocab
        self.weight = nn.Parameter(torch.empty(self.local_vocab, hidden), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        rows = max(0, min(self.local_vocab, weight.shape[0] - self.vocab_start))
        if rows < self.local_vocab:
            param.data.zero_()
        copy_checked(param.data[:rows], weight.narrow(0, self.vocab_start, rows), "vocab shard")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, PackableLinear):
    """Projects hidden states to vocabulary logits; each rank computes its vocabulary slice, gathered on rank 0
    (which alone samples). Packed like the linear layers; the plain weight stays for a tied embedding."""

    keeps_plain_weight = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) → (N, vocab) on rank 0; None on the other ranks."""
        logits = self.matmul(hidden)  # (N, vocab / tp)
        logits = self.tp.gather_last_dim(logits)
        return None if logits is None else logits[..., : self.vocab_size]
