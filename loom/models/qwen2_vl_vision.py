"""Vision towers of Qwen2-VL and Qwen2.5-VL: transformers' `Qwen2VisionTransformerPretrainedModel` and
`Qwen2_5_VisionTransformerPretrainedModel`, in plain torch.

Input is what the Qwen2-VL image processor emits: `pixel_values` (sum of patches, C*T*P*P), every patch already
flattened in (C, T, P, P) order and the patches of each image laid out block-major over `spatial_merge_size`²
blocks, and `grid_thw` (n_images, 3) = (frames, patch rows, patch cols) per image. Output is the merged tokens
(sum of t*h*w / merge², out_hidden) in the same image order: image i's rows are its `t*h*w // merge²` tokens.

Attention never crosses an image or a frame (transformers' `cu_seqlens`), so images of different requests can be
run in one call. Qwen2.5-VL additionally attends within windows of `window_size` pixels (in merged-token units:
`window_size // spatial_merge_size // patch_size`) except in `fullatt_block_indexes`; its sequence is permuted
window-major before the blocks and the merged tokens are permuted back after the merger, as transformers does.
Segments are processed as runs of equal length, each run one batched SDPA call (no masks, no cross-segment work).

Parameter names are transformers' own under the checkpoint's `visual.` (or `model.visual.`) prefix; the patch
embedding keeps the Conv3d weight's shape (out, C, T, P, P).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.activation import get_activation


def _get(cfg: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """The first of `names` present in `cfg` (config.json spellings differ: `in_chans` vs `in_channels`,
    `num_heads` vs `num_attention_heads`, ...), else `default` (transformers' config default)."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


# ------------------------------------------------------------------------------------------------- grid helpers
def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(sum t*h*w, 2) long: each patch's (row, col) in its image, in the processor's block-major patch order
    (merge x merge blocks, row-major inside a block), repeated for every frame (transformers'
    `get_vision_position_ids`)."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


def frame_seqlens(grid_thw: torch.Tensor) -> list[int]:
    """Patches per attention segment: one segment per frame of each image (transformers' `cu_seqlens`)."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's window permutation (transformers' `get_vision_window_index`).

    `window` is the window side in merged tokens. Returns the permutation of merged-token indices (global over all
    images) that orders every frame's merged tokens window by window (windows row-major over the frame, tokens
    row-major inside a window; the last row/column of windows may be partial), and each non-empty window's length
    in patches (merged tokens * merge²)."""
    if window <= 0:
        raise ValueError(f"window_size too small: {window} merged tokens per window side")
    unit = merge * merge
    index, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        nh, nw = -(-lh // window), -(-lw // window)
        ids = torch.arange(t * lh * lw).reshape(t, lh, lw)
        padded = F.pad(ids, (0, nw * window - lw, 0, nh * window - lh), value=-1)
        padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        valid = padded >= 0
        index.append(padded[valid] + offset)
        lengths.extend(int(n) * unit for n in valid.sum(dim=1).tolist() if n > 0)
        offset += t * lh * lw
    return torch.cat(index), lengths


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """Bidirectional attention within consecutive segments of `seqlens` tokens; q, k, v (N, heads, head_dim) ->
    (N, heads * head_dim). Each run of equal-length segments is one batched SDPA call."""
    n, heads, head_dim = q.shape
    outs, start, i = [], 0, 0
    while i < len(seqlens):
        length, j = seqlens[i], i
        while j < len(seqlens) and seqlens[j] == length:
            j += 1
        count, end = j - i, start + (j - i) * length
        qs, ks, vs = (x[start:end].reshape(count, length, heads, head_dim).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs)  # scale head_dim**-0.5, as transformers
        outs.append(o.transpose(1, 2).reshape(count * length, heads * head_dim))
        start, i = end, j
    if start != n:
        raise ValueError(f"attention segments cover {start} tokens, the sequence has {n}")
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# -------------------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """Qwen2.5-VL's RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (T, P, P) over one patch each: a matmul with the flattened kernel."""

    def __init__(self, patch: int, temporal: int, channels: int, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Conv3d(channels, dim, (temporal, patch, patch), (temporal, patch, patch), bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.reshape(-1, w[0].numel()).to(w.dtype), w.reshape(self.dim, -1))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"vision hidden size {dim} is not a multiple of num_heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).unbind(1)
        # rotary in float32 (transformers' apply_rotary_pos_emb_vision), cast back to the compute dtype
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(x.dtype)
        return self.proj(_segment_attention(q, k, v, seqlens))


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2_5VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm block: LayerNorm + fc1/fc2 MLP (Qwen2-VL) or RMSNorm + gated MLP (Qwen2.5-VL)."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module, rms: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, 1e-6) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, heads)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """ln_q over each patch, then an MLP over the merge² patches of a block concatenated."""

    def __init__(self, out_dim: int, dim: int, merge: int, rms: bool):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.hidden))


# --------------------------------------------------------------------------------------------------------- towers
class _QwenVisionTowerBase(nn.Module):
    def _init_common(self, cfg: dict[str, Any], dim: int) -> None:
        self.patch_size = int(_get(cfg, ("patch_size", "spatial_patch_size"), 14))
        self.temporal_patch_size = int(_get(cfg, ("temporal_patch_size",), 2))
        self.in_channels = int(_get(cfg, ("in_channels", "in_chans", "num_channels"), 3))
        self.spatial_merge_size = int(_get(cfg, ("spatial_merge_size",), 2))
        self.num_heads = int(_get(cfg, ("num_heads", "num_attention_heads"), 16))
        self.depth = int(_get(cfg, ("depth", "num_hidden_layers"), 32))
        self.dim = dim
        head_dim = dim // self.num_heads
        # Axial 2D rope: head_dim // 4 frequencies, used for rows then columns, the pair then repeated.
        inv_freq = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.patch_embed = PatchEmbed(self.patch_size, self.temporal_patch_size, self.in_channels, dim)

    def output_lengths(self, grid_thw: torch.Tensor) -> list[int]:
        """Merged tokens per image: the row counts of each image's part of `forward`'s output."""
        return (grid_thw.prod(-1) // self.spatial_merge_size**2).tolist()

    def _check(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.to("cpu", torch.long).reshape(-1, 3)
        if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grid_thw.tolist()} has {int(grid_thw.prod(-1).sum())} patches, "
                             f"pixel_values {pixel_values.shape[0]}")
        m = self.spatial_merge_size
        if bool((grid_thw[:, 1:] % m).any()):
            raise ValueError(f"grid_thw {grid_thw.tolist()}: h and w must be multiples of {m}")
        return grid_thw

    def _rotary(self, grid_thw: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N, 1, head_dim) float32: [h freqs, w freqs, h freqs, w freqs] per patch."""
        pos = vision_position_ids(grid_thw, self.spatial_merge_size).to(device)
        freqs = pos[..., None].float() * self.inv_freq.to(device=device, dtype=torch.float)  # (N, 2, head_dim/4)
        freqs = freqs.flatten(1)  # (N, head_dim/2): rows then cols
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


class Qwen2VisionTower(_QwenVisionTowerBase):
    """transformers' Qwen2VisionTransformerPretrainedModel (Qwen2-VL): LayerNorm blocks with a quick-GELU MLP,
    full attention within each image frame, LayerNorm patch merger."""

    def __init__(self, vision_config: dict[str, Any]):
        super().__init__()
        cfg = vision_config
        dim = int(_get(cfg, ("embed_dim",), 1280))
        self._init_common(cfg, dim)
        out_dim = int(_get(cfg, ("hidden_size",), 3584))
        mlp_hidden = int(dim * float(_get(cfg, ("mlp_ratio",), 4)))
        act = str(_get(cfg, ("hidden_act",), "quick_gelu"))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, self.num_heads, Qwen2VisionMLP(dim, mlp_hidden, act), rms=False)
            for _ in range(self.depth))
        self.merger = PatchMerger(out_dim, dim, self.spatial_merge_size, rms=False)
        self.out_hidden_size = out_dim

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = self._check(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grid_thw, x.device)
        seqlens = frame_seqlens(grid_thw)
        for blk in self.blocks:
            x = blk(x, seqlens, cos, sin)
        return self.merger(x)


class Qwen2_5VisionTower(_QwenVisionTowerBase):
    """transformers' Qwen2_5_VisionTransformerPretrainedModel (Qwen2.5-VL): RMSNorm blocks with a gated SiLU MLP,
    window attention except in `fullatt_block_indexes`, RMSNorm patch merger."""

    def __init__(self, vision_config: dict[str, Any]):
        super().__init__()
        cfg = vision_config
        dim = int(_get(cfg, ("hidden_size",), 1280))
        self._init_common(cfg, dim)
        out_dim = int(_get(cfg, ("out_hidden_size",), 3584))
        inter = int(_get(cfg, ("intermediate_size",), 3420))
        act = str(_get(cfg, ("hidden_act",), "silu"))
        self.window_size = int(_get(cfg, ("window_size",), 112))
        self.fullatt_block_indexes = {int(i) for i in _get(cfg, ("fullatt_block_indexes",), (7, 15, 23, 31))}
        self.blocks = nn.ModuleList(
            VisionBlock(dim, self.num_heads, Qwen2_5VisionMLP(dim, inter, act), rms=True)
            for _ in range(self.depth))
        self.merger = PatchMerger(out_dim, dim, self.spatial_merge_size, rms=True)
        self.out_hidden_size = out_dim

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = self._check(pixel_values, grid_thw)
        m = self.spatial_merge_size
        unit = m * m
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        index, window_lens = window_index(grid_thw, m, self.window_size // m // self.patch_size)
        index = index.to(x.device)
        # Permute whole merge blocks (unit consecutive patches) into window order; rotary angles alike.
        x = x.reshape(n // unit, unit, -1)[index].reshape(n, -1)
        cos, sin = (t.reshape(n // unit, unit, 1, -1)[index].reshape(n, 1, -1)
                    for t in self._rotary(grid_thw, x.device))
        # Window order keeps each frame's patches contiguous, so the per-frame segments still apply.
        full_lens = frame_seqlens(grid_thw)
        for i, blk in enumerate(self.blocks):
            x = blk(x, full_lens if i in self.fullatt_block_indexes else window_lens, cos, sin)
        merged = self.merger(x)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(index.numel(), device=index.device)
        return merged[inverse]


_TOWERS: dict[str, type[nn.Module]] = {
    "qwen2_vl": Qwen2VisionTower,
    "qwen2_vl_vision": Qwen2VisionTower,
    "qwen2_5_vl": Qwen2_5VisionTower,
    "qwen2_5_vl_vision": Qwen2_5VisionTower,
}


def vision_tower_for(model_type: str, vision_config: dict[str, Any]) -> nn.Module:
    """The vision tower of a `qwen2_vl` / `qwen2_5_vl` checkpoint (config.json's `model_type`) from its
    `vision_config` dict."""
    if model_type not in _TOWERS:
        raise ValueError(f"no Qwen vision tower for model_type {model_type!r}; have {sorted(_TOWERS)}")
    return _TOWERS[model_type](dict(vision_config))
