"""Gemma 3 with images (`Gemma3ForConditionalGeneration`): a SigLIP vision tower, its patches average-pooled to
`mm_tokens_per_image` tokens, normalised and projected, and Loom's Gemma 3 language model.

An image's tokens attend to each other both ways (transformers: OR(causal, same image block), and within the
window on sliding layers), so the engine computes an image's tokens in one step (`bidirectional_images`: the
scheduler never ends a prompt chunk inside an image, and the attention mask opens the image's block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.layers.norm import GemmaRMSNorm
from loom.models.vision_encoders import SiglipVisionTower
from loom.models.vlm import TOWER_AND_PROJECTOR, VisionLanguageModel
from loom.protocol.multimodal import ImageInput


class Gemma3Projector(nn.Module):
    def __init__(self, vision: dict, hidden: int, tokens_per_image: int):
        super().__init__()
        width = int(vision["hidden_size"])
        self.mm_input_projection_weight = nn.Parameter(torch.empty(width, hidden))  # [in, out]: a matmul
        self.mm_soft_emb_norm = GemmaRMSNorm(width, float(vision.get("layer_norm_eps", 1e-6)))
        self.patches_per_side = int(vision["image_size"]) // int(vision["patch_size"])
        self.kernel = self.patches_per_side // int(tokens_per_image**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        grid = x.transpose(1, 2).reshape(b, d, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        return (self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight).to(x.dtype)


class Gemma3ForConditionalGeneration(VisionLanguageModel):
    bidirectional_images = True
    PREFIXES = TOWER_AND_PROJECTOR

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        super().__init__(cfg, int(hf.get("image_token_index", hf.get("image_token_id", 262144))))
        vision = hf["vision_config"]
        self.vision_tower = SiglipVisionTower(vision)
        self.multi_modal_projector = Gemma3Projector(vision, int(hf["hidden_size"]),
                                                     int(hf.get("mm_tokens_per_image", 256)))

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.mm_input_projection_weight.dtype
        pixels = torch.cat([im.tensors["pixel_values"].tensor() for im in images]).to(dtype)
        features = self.multi_modal_projector(self.vision_tower(pixels))
        counts = [im.tensors["pixel_values"].shape[0] for im in images]  # crops per image (pan and scan)
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]
