"""RMSNorm computed in float32, as transformers does, so parity holds in every dtype."""

from __future__ import annotations

import torch
from torch import nn

from loom.layers.linear import ReplicatedLinear


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.weight.weight_loader = ReplicatedLinear._load_full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
