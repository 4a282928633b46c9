"""Llava: a CLIP vision tower, a two-layer projector, and a Loom language model (Llama, Mistral, Qwen2, ...).

Each image is one fixed-size tile; its embeddings are the projected hidden states of `vision_feature_layer`
(several layers concatenated when a list), without the class token under the "default" strategy.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers.activation import get_activation
from loom.models.vision_encoders import CLIPVisionTower
from loom.models.vlm import TOWER_AND_PROJECTOR, VisionLanguageModel
from loom.protocol.multimodal import ImageInput


class LlavaProjector(nn.Module):
    def __init__(self, vision_features: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_features, hidden, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def feature_layers(hf: dict) -> list[int]:
    layer = hf.get("vision_feature_layer", -2)
    return [int(layer)] if isinstance(layer, int) else [int(i) for i in layer]


class LlavaForConditionalGeneration(VisionLanguageModel):
    PREFIXES = TOWER_AND_PROJECTOR

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        super().__init__(cfg, int(hf.get("image_token_index", hf.get("image_token_id", 32000))))
        vision = hf["vision_config"]
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"{cfg.architecture} with a {vision.get('model_type')} vision tower is not supported "
                             "(CLIP only)")
        layers = feature_layers(hf)
        self.strategy = hf.get("vision_feature_select_strategy", "default")
        self.vision_tower = CLIPVisionTower(vision, layers)
        self.multi_modal_projector = LlavaProjector(
            int(vision["hidden_size"]) * len(layers), int(hf["hidden_size"]), hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", True)))
        kept = self.vision_tower.encoder.layers
        # the tower's layers after the deepest feature layer, and its post-layernorm, never run
        self.SKIPPED = tuple(f"encoder.layers.{i}." for i in range(len(kept), int(vision["num_hidden_layers"]))) + (
            "post_layernorm.",)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, tokens, hidden)."""
        states = self.vision_tower(pixels)
        if self.strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        pixels = torch.cat([im.tensors["pixel_values"].tensor() for im in images]).to(dtype)
        return list(self.image_features(pixels))


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """Llava-Next ("anyres"): an image is its downscaled whole plus a grid of crops at the best-fitting
    resolution of `image_grid_pinpoints`; the crops' features are laid out as one feature map, cut back to the
    image's aspect ratio (the padding removed), with a learned newline embedding after each row."""

    PREFIXES = (*LlavaForConditionalGeneration.PREFIXES, ("model.image_newline", "image_newline"),
                ("image_newline", "image_newline"))

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.empty(int(cfg.hf_config["hidden_size"])))
        self.grid_pinpoints = cfg.hf_config["image_grid_pinpoints"]
        self.tile_size = int(cfg.hf_config["vision_config"]["image_size"])

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        # transformers' own helpers for the anyres geometry (the processor's counterpart decides the token count)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        dtype = self.multi_modal_projector.linear_1.weight.dtype
        crops, sizes, counts = [], [], []
        for image in images:
            size = image.tensors["image_sizes"].tensor().reshape(2).tolist()
            n = image_size_to_num_patches(size, self.grid_pinpoints, self.tile_size)
            pixels = image.tensors["pixel_values"].tensor()
            crops.append(pixels.reshape(-1, *pixels.shape[-3:])[:n])
            sizes.append(size)
            counts.append(n)
        features = self.image_features(torch.cat(crops).to(dtype)).split(counts)
        return [self._pack(f, size) for f, size in zip(features, sizes)]

    def _pack(self, features: torch.Tensor, size: list[int]) -> torch.Tensor:
        """(crops, tokens, hidden) of one image → its embeddings in prompt order (transformers' packing)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        newline = self.image_newline.to(features.dtype)
        if features.shape[0] == 1:
            return torch.cat([features[0], newline[None]])
        base, grid = features[0], features[1:]
        side = int(base.shape[0] ** 0.5)
        rows, cols = get_anyres_image_grid_shape(size, self.grid_pinpoints, self.tile_size)
        grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, size)
        grid = torch.cat([grid, newline[:, None, None].expand(*grid.shape[:-1], 1)], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])
