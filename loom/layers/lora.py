"""LoRA adapters (TGI's `--lora-adapters` and the per-request `adapter_id`): several PEFT adapters loaded next to
the base weights, each request running with at most one of them, requests with different adapters (or none) in one
batch.

A PEFT adapter (`adapter_config.json`: r, lora_alpha, use_rslora, target_modules; `adapter_model.safetensors`:
`base_model.model.<module>.lora_A.weight` (r × in) and `lora_B.weight` (out × r)) adds `scale · B A x` to the
output of each target projection, `scale = lora_alpha / r` (`/ sqrt(r)` with rsLoRA). Loom fuses some projections
(q, k, v → qkv_proj; gate, up → gate_up_proj): an adapter's matrices for one of them add to that part's columns of
the fused output. The base matmul runs once for the whole batch; each adapter then adds its low-rank product on
its own rows (`LoraRows`, set per step by the runner in the forward context).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from loom.layers.forward_context import current_forward_context


@dataclass(slots=True)
class LoraDelta:
    """One adapter's update of one (part of a) linear layer: columns [offset, offset + B.shape[0]) of its output."""

    offset: int
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out_part, r)
    scale: float


@dataclass(slots=True)
class LoraRows:
    """Which rows of this step's flattened batch run with which adapter (index into the runner's adapters)."""

    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # adapter index → row indices (int64)


def apply_lora(deltas: dict[int, list[LoraDelta]] | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (T, out) with every active adapter's update added on its rows; y unchanged without adapters."""
    if not deltas:
        return y
    ctx = current_forward_context()
    if ctx is None or ctx.lora is None or not ctx.lora.rows:
        return y
    for index, rows in ctx.lora.rows.items():
        parts = deltas.get(index)
        if not parts:
            continue
        xs = x.index_select(0, rows)
        for d in parts:
            update = (xs @ d.a.t()) @ d.b.t() * d.scale  # (rows, out_part): r is small, two thin matmuls
            cols = slice(d.offset, d.offset + d.b.shape[0])
            y[rows, cols] += update.to(y.dtype)
    return y


# HF module name part → (Loom module name part, which part of the fused layer)
_FUSED = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
          ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}


@dataclass(frozen=True)
class LoraAdapter:
    name: str  # the adapter_id requests use
    path: Path
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # HF module name → (A, B)


def read_adapter(name: str, path: str | Path) -> LoraAdapter:
    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no adapter_config.json in {path}")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    files = [p for p in (path / "adapter_model.safetensors",) if p.is_file()]
    if not files:
        raise ValueError(f"LoRA adapter {name!r}: no adapter_model.safetensors in {path}")
    tensors = load_file(str(files[0]))
    weights: dict[str, list[torch.Tensor | None]] = {}
    for key, value in tensors.items():
        module = key.removeprefix("base_model.model.")
        for which, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if module.endswith(which):
                weights.setdefault(module.removesuffix(which), [None, None])[slot] = value
                break
        else:
            raise ValueError(f"LoRA adapter {name!r}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
    pairs = {}
    for module, (a, b) in weights.items():
        if a is None or b is None:
            raise ValueError(f"LoRA adapter {name!r}: {module} lacks lora_A or lora_B")
        pairs[module] = (a, b)
    return LoraAdapter(name, path, rank, scale, pairs)


def attach_adapter(model: nn.Module, adapter: LoraAdapter, index: int) -> int:
    """Hang the adapter's deltas on the model's linear layers as adapter `index`; returns how many layers."""
    from loom.layers.linear import ColumnParallelLinear, PackableLinear, QKVParallelLinear

    modules = dict(model.named_modules())
    for hf_name, (a, b) in adapter.weights.items():
        target, part = hf_name, None
        for hf_part, (ours, which) in _FUSED.items():
            if hf_name.endswith(hf_part):
                target, part = hf_name[: -len(hf_part)] + ours, which
                break
        layer = modules.get(target)
        if not isinstance(layer, PackableLinear):
            raise ValueError(f"LoRA adapter {adapter.name!r} targets {hf_name}, which is no linear layer of this "
                             "model (LoRA serves Llama-style projections: q/k/v/o_proj, gate/up/down_proj)")
        offset = 0
        if part is not None:
            assert isinstance(layer, ColumnParallelLinear)
            shard = QKVParallelLinear.SHARDS[part] if isinstance(part, str) else part
            offset = layer._shard_offset(shard)
        dtype, device = layer.weight.dtype, layer.weight.device
        in_features, out_features = layer.features
        if a.shape[1] != in_features or b.shape[0] + offset > out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {adapter.name!r}: {hf_name} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}, the layer is {in_features} → {out_features}")
        if layer.lora is None:
            layer.lora = {}
        layer.lora.setdefault(index, []).append(
            LoraDelta(offset, a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), adapter.scale))
    return len(adapter.weights)
