"""Vision towers of the vision-language families: CLIP (Llava, Llava-Next) and SigLIP (Idefics3 / SmolVLM, with
its variable-resolution position buckets; Gemma 3).

They run once per image at prefill, on whole images (no KV cache, bidirectional attention), replicated on every
tensor-parallel rank: an image's embeddings are needed in full by each rank's shard of the first decoder layer,
and a tower is small next to the language model. Parameter names are transformers' own, so checkpoints load by
name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.layers.activation import get_activation


class VisionAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer block (CLIP and SigLIP alike)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, eps = int(cfg["hidden_size"]), float(cfg.get("layer_norm_eps", 1e-5))
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = VisionAttention(hidden, int(cfg["num_attention_heads"]))
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = VisionMLP(hidden, int(cfg["intermediate_size"]), cfg.get("hidden_act", "quick_gelu"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                keep: set[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The last layer's output, and the hidden states numbered in `keep` (0 = the encoder's input, i = after
        layer i: transformers' `hidden_states` tuple)."""
        kept = {}
        if keep and 0 in keep:
            kept[0] = x
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if keep and i in keep:
                kept[i] = x
        return x, kept


def layers_needed(cfg: dict[str, Any], feature_layers: list[int]) -> int:
    """Layers to run to reach the deepest hidden state a family reads (negative indices count from the end of
    the `num_hidden_layers + 1` hidden states): the layers after it are never computed."""
    total = int(cfg["num_hidden_layers"])
    return max(i if i >= 0 else total + 1 + i for i in feature_layers)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, patch, size = int(cfg["hidden_size"]), int(cfg["patch_size"]), int(cfg["image_size"])
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(int(cfg.get("num_channels", 3)), hidden, patch, patch, bias=False)
        self.num_positions = (size // patch) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[: patches.shape[1] + 1]


class CLIPVisionTower(nn.Module):
    """transformers' CLIPVisionModel up to the hidden states Llava reads (no post-layernorm, no pooling)."""

    def __init__(self, cfg: dict[str, Any], feature_layers: list[int]):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(int(cfg["hidden_size"]), eps=float(cfg.get("layer_norm_eps", 1e-5)))
        total = int(cfg["num_hidden_layers"])
        self.keep = [i if i >= 0 else total + 1 + i for i in feature_layers]
        self.encoder = VisionEncoder(cfg, layers_needed(cfg, feature_layers))
        self.patch_size = int(cfg["patch_size"])

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The hidden states of `feature_layers`, in that order: each (B, 1 + patches, hidden)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        _, kept = self.encoder(x, keep=set(self.keep))
        return [kept[i] for i in self.keep]


class SiglipVisionEmbeddings(nn.Module):
    """SigLIP's patch embeddings; with `patch_mask`, Idefics3's variable-resolution position ids: each image's
    real patches (a tile may be padded) take positions spread over the full grid by bucketing."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, patch, size = int(cfg["hidden_size"]), int(cfg["patch_size"]), int(cfg["image_size"])
        self.patch_size = patch
        self.patch_embedding = nn.Conv2d(int(cfg.get("num_channels", 3)), hidden, patch, patch)
        self.per_side = size // patch
        self.position_embedding = nn.Embedding(self.per_side**2, hidden)

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if patch_mask is None:
            return x + self.position_embedding.weight[: x.shape[1]]
        b = pixels.shape[0]
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side)
        rows_h = patch_mask[:, :, 0].sum(dim=1)  # real patches per column / row of each image
        rows_w = patch_mask[:, 0, :].sum(dim=1)
        h = torch.arange(patch_mask.shape[1], dtype=torch.float32)[None, :] * (1.0 / rows_h)[:, None]
        w = torch.arange(patch_mask.shape[2], dtype=torch.float32)[None, :] * (1.0 / rows_w)[:, None]
        bucket_h = torch.bucketize(h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        bucket_w = torch.bucketize(w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        ids = (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(b, -1)
        ids = torch.where(patch_mask.reshape(b, -1), ids, torch.zeros_like(ids))
        return x + self.position_embedding(ids)


class SiglipVisionTower(nn.Module):
    """transformers' SiglipVisionTransformer (and Idefics3VisionTransformer) without the pooling head:
    last hidden state after the post-layernorm."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        # transformers' SiglipVisionConfig and Idefics3VisionConfig defaults, not CLIP's (quick_gelu, 1e-5): the
        # vision configs of the PaliGemma checkpoints on the Hub leave both out
        cfg = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, **cfg}
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, int(cfg["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(int(cfg["hidden_size"]), eps=float(cfg.get("layer_norm_eps", 1e-6)))

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(pixels, patch_mask)
        mask = None
        if patch_mask is not None and not bool(patch_mask.all()):
            keys = patch_mask.reshape(pixels.shape[0], -1)
            mask = torch.zeros(keys.shape, dtype=x.dtype).masked_fill(~keys, torch.finfo(x.dtype).min)
            mask = mask[:, None, None, :]
        x, _ = self.encoder(x, mask)
        return self.post_layernorm(x)
