"""Rotary position embeddings (neox-style rotate-half, as transformers' Llama) with HF's rope scaling types.

LongRoPE (Phi-3 / Phi-3.5 / Phi-4-mini) picks its factors per position: see `_longrope_tables` for why this
differs from transformers once a sequence grows past `original_max_position_embeddings`.
"""

from __future__ import annotations

import json
import math
import weakref
from typing import Any

import torch
from torch import nn

from loom.layers.kernels import fused_cpu


def rope_parameters(hf_config: dict[str, Any]) -> dict[str, Any]:
    """transformers ≥ 5 writes `rope_parameters`; older checkpoints have `rope_theta` + `rope_scaling`."""
    params = dict(hf_config.get("rope_parameters") or {})
    if not params:
        params = dict(hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf_config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "longrope":
        _resolve_longrope(hf_config, params)
    if params["rope_type"] == "dynamic":  # transformers: the config's max_position_embeddings is the pretraining length
        params.setdefault("original_max_position_embeddings", hf_config.get("max_position_embeddings") or 2048)
    return params


def _resolve_longrope(hf_config: dict[str, Any], params: dict[str, Any]) -> None:
    """Fill in what transformers derives for LongRoPE: the pretraining length and the context-extension factor."""
    # NOTE: like transformers' `standardize_rope_params`, a top-level `original_max_position_embeddings` (Phi-3
    # writes one) takes priority over the one inside the rope parameters.
    if hf_config.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = hf_config["original_max_position_embeddings"]
    params.setdefault("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
    missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings") if params.get(k) is None]
    if missing:
        raise ValueError(f"longrope rope scaling needs {', '.join(missing)} in the model config")
    if params.get("factor") is None:
        # transformers: the ratio of the extended to the pretraining context sets the default attention factor
        max_pos = hf_config.get("max_position_embeddings") or params["original_max_position_embeddings"]
        params["factor"] = float(max_pos) / float(params["original_max_position_embeddings"])


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope_attention_factor(p: dict[str, Any]) -> float:
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    factor, old_len = float(p["factor"]), float(p["original_max_position_embeddings"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))


def _longrope_tables(base: float, rotary_dim: int, max_positions: int, p: dict[str, Any]) -> torch.Tensor:
    """(max_positions, rotary_dim/2) rotation angles: short factors below the pretraining length, long from there.

    NOTE: transformers picks one factor set for *all* positions from the current length of the sequence
    (`max(position_ids) + 1 > original_max_position_embeddings` → long), and Phi-3's `generate` drops its KV cache
    and recomputes every position with the long factors when a sequence first crosses that length. A paged,
    prefix-shared, chunk-prefilled cache cannot do that: a cached block must mean the same thing in every sequence
    that reuses it and under every chunking. So, like TGI, the factors are a function of the position alone:

        positions [0 ........ original_max) | [original_max ........ max_positions)
                   short_factor               long_factor

    Sequences of up to `original_max_position_embeddings` tokens (prompt + generated) match transformers exactly.
    A longer sequence matches transformers' cached forward fed its first `original_max` tokens and then the rest;
    transformers' single forward over it (or `generate`, which recomputes at the crossing) would use the long
    factors at every position instead. Matching that would need the engine to recompute a sequence's KV when it
    crosses the length and to keep such blocks out of the prefix cache of shorter sequences.
    """
    old_len = int(p["original_max_position_embeddings"])
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    parts = []
    for name, lo, hi in (("short_factor", 0, min(old_len, max_positions)), ("long_factor", old_len, max_positions)):
        if hi <= lo:
            continue
        factors = torch.tensor(p[name], dtype=torch.float32)
        if factors.numel() != rotary_dim // 2:
            raise ValueError(f"longrope {name} has {factors.numel()} entries; the rotary dimension needs {rotary_dim // 2}")
        inv_freq = 1.0 / (factors * base**shape)  # written as transformers writes it, for identical rounding
        parts.append(torch.outer(torch.arange(lo, hi, dtype=torch.float32), inv_freq))
    return torch.cat(parts)


def _dynamic_ntk_tables(base: float, rotary_dim: int, max_positions: int, p: dict[str, Any]) -> torch.Tensor:
    """(max_positions, rotary_dim/2) angles of dynamic NTK scaling: positions up to the pretraining length rotate
    as without scaling; past it, position q uses transformers' base for a sequence of q + 1 tokens,
    `base * (factor * (q + 1) / max_pos - (factor - 1)) ** (dim / (dim - 2))`. That is what transformers computes
    when it generates token by token (it recomputes the frequencies as the sequence grows); its single forward
    over a longer prompt uses the prompt's length for every position instead, which a paged, prefix-shared cache
    cannot (a cached block must mean the same thing in every sequence that reuses it)."""
    old_len = int(p["original_max_position_embeddings"])
    factor = float(p["factor"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    short = torch.outer(torch.arange(min(old_len, max_positions), dtype=torch.float32), inv_freq)
    if max_positions <= old_len:
        return short
    positions = torch.arange(old_len, max_positions, dtype=torch.float32)
    bases = base * ((factor * (positions + 1) / old_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    long = positions.unsqueeze(1) * (1.0 / (bases.unsqueeze(1) ** exponents))
    return torch.cat([short, long])


def _inv_freq(base: float, rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if params["rope_type"] == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif params["rope_type"] == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    return inv_freq


SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to the first `rotary_dim` features of each head.

    cos/sin are tabulated once in float32 for every position up to `max_positions` and cast to the activation
    dtype when applied, matching transformers' numerics.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, params: dict[str, Any]):
        super().__init__()
        rope_type = params["rope_type"]
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"Unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        base = float(params["rope_theta"])
        scale = 1.0  # transformers' `attention_scaling`, applied to cos and sin
        if rope_type == "longrope":
            freqs = _longrope_tables(base, rotary_dim, max_positions, params)  # (P, rotary_dim/2)
            scale = _longrope_attention_factor(params)
        elif rope_type == "dynamic":
            freqs = _dynamic_ntk_tables(base, rotary_dim, max_positions, params)
        else:
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), _inv_freq(base, rotary_dim, params))
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, rotary_dim)
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    _shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @classmethod
    def shared(cls, head_dim: int, rotary_dim: int, max_positions: int, params: dict[str, Any]) -> RotaryEmbedding:
        """One table per distinct configuration, shared by every layer that uses it (a 131k-position table is
        ~134 MB; one per layer would multiply that by the layer count)."""
        key = (head_dim, rotary_dim, max_positions, json.dumps(params, sort_keys=True, default=str),
               torch.get_default_device().type if hasattr(torch, "get_default_device") else "cpu")
        module = cls._shared.get(key)
        if module is None:
            module = cls(head_dim, rotary_dim, max_positions, params)
            cls._shared[key] = module
        return module

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (T, Hq, D), k: (T, Hkv, D), positions: (T,) → rotated q, k."""
        fused_q = fused_cpu.rotary(q, self.cos, self.sin, positions, self.rotary_dim)  # one pass each on CPU
        if fused_q is not None:
            fused_k = fused_cpu.rotary(k, self.cos, self.sin, positions, self.rotary_dim)
            if fused_k is not None:
                return fused_q, fused_k
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)  # (T, 1, rotary_dim)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return _apply(q, cos, sin, self.rotary_dim), _apply(k, cos, sin, self.rotary_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, keep), dim=-1)


class MRotaryEmbedding(RotaryEmbedding):
    """Qwen2-VL's multimodal rope (M-RoPE): a position is three numbers (temporal, height, width), and the
    rotary frequencies are split into `mrope_section` parts that turn with one of them each. Text positions have
    the three equal, which is plain rope: (T,) positions take the parent's path; (3, T) positions this one."""

    def __init__(self, head_dim: int, rotary_dim: int, max_positions: int, params: dict[str, Any]):
        super().__init__(head_dim, rotary_dim, max_positions, params)
        self.mrope_section = [int(s) for s in params["mrope_section"]]
        if sum(self.mrope_section) * 2 != rotary_dim:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover the rotary dimension {rotary_dim}")

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cos = self._sections(self.cos[positions]).to(q.dtype).unsqueeze(1)  # (T, 1, rotary_dim)
        sin = self._sections(self.sin[positions]).to(q.dtype).unsqueeze(1)
        return _apply(q, cos, sin, self.rotary_dim), _apply(k, cos, sin, self.rotary_dim)

    def _sections(self, table: torch.Tensor) -> torch.Tensor:
        """(3, T, rotary_dim) per-axis tables → (T, rotary_dim): frequency section i from axis i % 3 (both halves
        of the table hold the same frequencies)."""
        half = table[..., : self.rotary_dim // 2].split(self.mrope_section, dim=-1)
        picked = torch.cat([part[i % 3] for i, part in enumerate(half)], dim=-1)
        return torch.cat((picked, picked), dim=-1)
