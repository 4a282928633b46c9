"""Speculator heads in TGI's checkpoint formats: Medusa and IBM's MLP speculator.

A speculator checkpoint is a directory whose config.json names its base model (`base_model_name_or_path`):

- Medusa (config has `medusa_num_heads`, `medusa_num_layers`): `medusa_lm_head.safetensors` with, for head i,
  residual blocks `{i}.{j}.linear.{weight,bias}` (x + SiLU(W x + b)) and an output projection `{i}.{L}.weight`
  (TGI's MedusaHeadV1). Without the output projection and with one block per head, the base model's LM head is
  applied to the block's output (TGI's MedusaHeadV2). Head i, given the final hidden state at position p,
  predicts the token at p + 2 + i.
- MLP speculator (`model_type: mlp_speculator`, `n_predict`, `inner_dim`, optional `tie_weights`):
  `model.safetensors` with `emb.{i}`, `proj.{i}`, `head.{i}`, `ln.{i}` (optionally under `speculator.`; tied:
  emb.0, proj.0, proj.1, head.0, ln.0). Head i embeds the token before its position, mixes it into a running state
  started from the final hidden state, and predicts one token: the heads run in sequence, each fed the previous
  head's prediction.

The runner applies the heads to the final hidden state of each request's last accepted position (the input of
the LM head) and its chosen token; their argmax tokens are the next step's drafts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from loom.config import SpeculatorSpec


class MedusaHeads(nn.Module):
    def __init__(self, spec: SpeculatorSpec, tensors: dict[str, torch.Tensor], num_heads: int):
        super().__init__()
        layers = int(spec.config.get("medusa_num_layers", 1))
        self.num_heads = num_heads
        self.shared_lm_head = f"0.{layers}.weight" not in tensors  # TGI's MedusaHeadV2
        if self.shared_lm_head and layers != 1:
            raise ValueError(f"{spec.path}: Medusa heads without their own output layer need medusa_num_layers = 1")
        self.blocks = nn.ModuleList()
        self.out = nn.ModuleList()
        for i in range(num_heads):
            blocks = nn.ModuleList()
            for j in range(layers):
                w, b = tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"]
                linear = nn.Linear(w.shape[1], w.shape[0])
                linear.weight.data, linear.bias.data = w, b
                blocks.append(linear)
            self.blocks.append(blocks)
            if not self.shared_lm_head:
                w = tensors[f"{i}.{layers}.weight"]
                out = nn.Linear(w.shape[1], w.shape[0], bias=False)
                out.weight.data = w
                self.out.append(out)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor,
                lm_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden (R, H), the token chosen at each row (unused: Medusa heads read the hidden state only) →
        (R, num_heads) draft ids."""
        drafts = []
        for i in range(self.num_heads):
            x = hidden
            for linear in self.blocks[i]:
                x = x + F.silu(linear(x))
            logits = lm_head(x) if self.shared_lm_head else self.out[i](x)
            drafts.append(logits.argmax(dim=-1))
        return torch.stack(drafts, dim=1)


class MLPSpeculator(nn.Module):
    def __init__(self, spec: SpeculatorSpec, tensors: dict[str, torch.Tensor], num_heads: int):
        super().__init__()
        cfg = spec.config
        tensors = {k.removeprefix("speculator."): v for k, v in tensors.items()}
        self.num_heads = num_heads
        tied = bool(cfg.get("tie_weights", False))
        self.emb = [tensors[f"emb.{0 if tied else i}.weight"] for i in range(num_heads)]
        self.proj = [tensors[f"proj.{min(i, 1) if tied else i}.weight"] for i in range(num_heads)]
        self.head = [tensors[f"head.{0 if tied else i}.weight"] for i in range(num_heads)]
        self.ln = [(tensors[f"ln.{0 if tied else i}.weight"], tensors[f"ln.{0 if tied else i}.bias"])
                   for i in range(num_heads)]
        # TGI's mixing weights: the base state keeps half of its magnitude by the last head, in expectation
        self.state_weight = 0.5 ** (0.5 / num_heads)
        self.emb_scale = math.sqrt(1 - self.state_weight**2) * math.sqrt(int(cfg["inner_dim"]) / 2)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor,
                lm_head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden (R, H) and the token chosen at each row (R,) → (R, num_heads) draft ids."""
        state, ind, drafts = hidden, tokens, []
        for i in range(self.num_heads):
            z = F.embedding(ind, self.emb[i]) * self.emb_scale
            state = F.linear(state, self.proj[i]) * self.state_weight + z
            weight, bias = self.ln[i]
            state = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6) * weight + bias
            state = F.gelu(state)
            ind = F.linear(state, self.head[i]).argmax(dim=-1)
            drafts.append(ind)
        return torch.stack(drafts, dim=1)


def load_speculator_heads(spec: SpeculatorSpec, num_heads: int, dtype: torch.dtype,
                          device: torch.device) -> nn.Module:
    """The heads of `spec`, the first `num_heads` of them, in `dtype` on `device`."""
    if not 1 <= num_heads <= spec.num_heads:
        raise ValueError(f"--speculate {num_heads}: this {spec.kind} speculator has {spec.num_heads} heads")
    files = [spec.path / "medusa_lm_head.safetensors"] if spec.kind == "medusa" else sorted(
        spec.path.glob("*.safetensors"))
    tensors = {}
    for file in files:
        tensors.update({k: v.to(device=device, dtype=dtype) for k, v in load_file(str(file)).items()})
    heads = MedusaHeads(spec, tensors, num_heads) if spec.kind == "medusa" else MLPSpeculator(spec, tensors, num_heads)
    return heads.eval()
