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
from loom.models.vlm import VisionLanguageModel
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
    # hub checkpoints name the tower `vision_tower.vision_model.`; transformers 5 saves it as `vision_tower.`
    PREFIXES = (("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
                ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("multi_modal_projector.", "multi_modal_projector."))

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
