"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous range of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.parallel_state import get_tp_group
from loom.layers.linear import CheckpointTensor, PackableLinear, copy_checked
from loom.quantization.cpu_weight import kernel_applies, pack_quantized
from loom.quantization.qtensor import QuantizedTensor


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
        src = weight.narrow(0, self.vocab_start, rows)
        if isinstance(src, QuantizedTensor) and rows == self.local_vocab:
            # Lookups need the plain rows; an LM head on this weight (tied, or its own) can use the quantized
            # ones: kept on the parameter until the head is finalized.
            param.quantized_source = src
        copy_checked(param.data[:rows], src, "vocab shard")

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

    def finalize_quantized(self) -> str | None:
        """A head whose weight was read quantized multiplies with the quantized kernel where it applies (the plain
        weight stays: a tied embedding looks rows up in it)."""
        qt = self.weight.__dict__.pop("quantized_source", None)
        if qt is None or not kernel_applies(qt, self.weight.dtype, self.weight.device):
            return None
        self._packed = pack_quantized(qt)
        return qt.source

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) → (N, vocab) on rank 0; None on the other ranks."""
        logits = self.matmul(hidden)  # (N, vocab / tp)
        logits = self.tp.gather_last_dim(logits)
        return None if logits is None else logits[..., : self.vocab_size]
