"""Mixture-of-experts feed-forward: a router picks `top_k` experts per token; only those experts run.

Expert weights are stacked as (num_experts, ...) parameters. Tensor parallelism splits every expert's intermediate
dimension: `gate_up_proj` column-wise (rank r holds [gate_r; up_r] of each expert), `down_proj` row-wise, so each
rank produces a partial sum of every token's output and one all-reduce completes it (none with one rank).

Checkpoints store experts either one tensor per expert (`experts.{e}.gate_proj.weight`, Mixtral's w1/w3/w2) — what
transformers' `save_pretrained` writes — or fused 3-D (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)); `expert_param_target` maps both onto the stacked parameters.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.parallel_state import divide, get_tp_group
from loom.layers.activation import get_activation
from loom.layers.linear import CheckpointTensor, ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, copy_checked

# Per-expert checkpoint projections → (stacked parameter, part): part 0 = gate, 1 = up, None = down.
_EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0),
                 "up_proj": ("gate_up_proj", 1), "w3": ("gate_up_proj", 1),
                 "down_proj": ("down_proj", None), "w2": ("down_proj", None)}
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def expert_param_target(name: str) -> tuple[str, object] | None:
    """Map a checkpoint expert tensor name to (our parameter name, shard id); None if `name` is not an expert.

    Shard ids: (expert, part) for gate/up, expert for down, None for an already-fused 3-D tensor.
    """
    m = _PER_EXPERT.search(name)
    if m:
        expert, (param, part) = int(m.group(1)), _EXPERT_PARTS[m.group(2)]
        target = name[: m.start()] + f".experts.{param}"
        return target, (expert if part is None else (expert, part))
    m = _FUSED.search(name)
    if m:
        return name, None
    return None


class FusedExperts(nn.Module):
    """`num_experts` gated MLPs (act(x Wgᵀ) * x Wuᵀ) Wdᵀ, stacked; each rank holds a slice of every expert."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, activation: str = "silu"):
        super().__init__()
        self.tp = get_tp_group()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.local_inter = divide(intermediate, self.tp.size, "expert intermediate size")
        self.act = get_activation(activation)
        # (E, 2·I/tp, H): rows [gate_r; up_r] of each expert
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.local_inter, hidden), requires_grad=False)
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.gate_up_proj.num_shards = 2 * num_experts
        # (E, H, I/tp)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, self.local_inter), requires_grad=False)
        self.down_proj.weight_loader = self._load_down
        self.down_proj.num_shards = num_experts

    def _load_gate_up(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        local, start = self.local_inter, self.tp.rank * self.local_inter
        if shard_id is None:  # fused (E, 2I, H): gate rows [0, I), up rows [I, 2I)
            for part in (0, 1):
                src = weight.narrow(1, part * self.intermediate + start, local)
                copy_checked(param.data.narrow(1, part * local, local), src, "fused expert gate_up_proj")
            return
        expert, part = shard_id  # type: ignore[misc]
        src = weight.narrow(0, start, local)  # (I/tp, H) of this expert's gate or up
        copy_checked(param.data[expert].narrow(0, part * local, local), src, f"expert {expert} gate/up")

    def _load_down(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        local, start = self.local_inter, self.tp.rank * self.local_inter
        if shard_id is None:  # fused (E, H, I)
            copy_checked(param.data, weight.narrow(2, start, local), "fused expert down_proj")
            return
        expert = int(shard_id)  # type: ignore[call-overload]
        copy_checked(param.data[expert], weight.narrow(1, start, local), f"expert {expert} down")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x: (T, H); topk_ids, topk_weights: (T, k) → (T, H) = Σ_k weight · expert(x), complete on every rank.

        The T·k (token, expert) assignments are grouped by expert with a stable sort; each expert that received
        tokens runs once on its rows. As in transformers' default (grouped_mm) path, each weighted output is kept
        in the product's dtype and a token's k outputs are summed together before the cast back to x's dtype.
        """
        T, k = topk_ids.shape
        flat = topk_ids.reshape(-1)  # (T·k,): assignment a belongs to token a // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        weights = topk_weights.reshape(-1)
        weighted = x.new_empty(T * k, x.shape[1], dtype=torch.promote_types(x.dtype, weights.dtype))
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start : start + n]  # assignments routed to this expert
            h = x.index_select(0, rows // k)  # (n, H)
            gate, up = F.linear(h, self.gate_up_proj[expert]).chunk(2, dim=-1)
            h = F.linear(self.act(gate) * up, self.down_proj[expert])  # (n, H), partial over the TP ranks
            weighted.index_copy_(0, rows, h * weights.index_select(0, rows).unsqueeze(-1))
            start += n
        out = weighted.view(T, k, x.shape[1]).sum(dim=1).to(x.dtype)  # (T, H)
        return self.tp.all_reduce(out)


class GatedMLP(nn.Module):
    """A dense gated MLP (dense layers of MoE models and Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, intermediate: int, activation: str = "silu"):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate])
        self.down_proj = RowParallelLinear(intermediate, hidden)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + routed `experts`, optionally a `shared_expert` scaled by sigmoid(`shared_expert_gate`).

    Routing follows transformers: softmax over all experts in float32, top-k, renormalise the selected weights
    only when `renormalize`. `weights_in_dtype` casts the routing weights back to the activation dtype before they
    scale the expert outputs (Qwen-MoE); Mixtral keeps them in float32.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, renormalize: bool,
                 activation: str = "silu", weights_in_dtype: bool = True, shared_intermediate: int = 0):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of experts "
                             f"({num_experts})")
        self.top_k, self.renormalize, self.weights_in_dtype = top_k, renormalize, weights_in_dtype
        self.gate = ReplicatedLinear(hidden, num_experts)
        self.experts = FusedExperts(num_experts, hidden, intermediate, activation)
        self.shared_expert = GatedMLP(hidden, shared_intermediate, activation) if shared_intermediate else None
        self.shared_expert_gate = ReplicatedLinear(hidden, 1) if shared_intermediate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H) → top-k expert ids (T, k) and their weights (T, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (T, E)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_dtype:
            weights = weights.to(x.dtype)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
