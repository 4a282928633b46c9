"""Idefics3 and SmolVLM: a SigLIP vision tower over fixed-size tiles of an image (a grid of crops and the whole
image), a pixel-shuffle connector that folds `scale_factor`² neighbouring patches into one token, and a Loom
language model (Llama)."""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.models.vision_encoders import SiglipVisionTower
from loom.models.vlm import VisionLanguageModel
from loom.protocol.multimodal import ImageInput


class Idefics3Connector(nn.Module):
    def __init__(self, vision_hidden: int, hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(vision_hidden * scale_factor**2, hidden, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """(B, side², D) → (B, side²/s², D·s²): each s×s block of patches becomes one token (transformers'
        order of the folded features)."""
        b, seq, d = x.shape
        s = self.scale_factor
        side = int(seq**0.5)
        x = x.view(b, side, side // s, d * s).permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
        return x.reshape(b, seq // (s * s), d * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(self.pixel_shuffle(x))


class Idefics3ForConditionalGeneration(VisionLanguageModel):
    PREFIXES = (("model.text_model.", "lm"), ("model.vision_model.", "vision_model."),
                ("model.connector.", "connector."))

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        super().__init__(cfg, int(hf["image_token_id"]))
        vision = hf["vision_config"]
        self.patch_size = int(vision["patch_size"])
        self.vision_model = SiglipVisionTower(vision)
        self.connector = Idefics3Connector(int(vision["hidden_size"]), int(hf["hidden_size"]),
                                           int(hf.get("scale_factor", 2)))

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Every tile of every image through the tower, one call per tile shape; per image its tiles' tokens in
        order."""
        dtype = self.connector.modality_projection.proj.weight.dtype
        tiles, masks, counts = [], [], []
        for image in images:
            pixels = image.tensors["pixel_values"].tensor()
            pixels = pixels.reshape(-1, *pixels.shape[-3:])
            mask = image.tensors.get("pixel_attention_mask")
            pixel_mask = (mask.tensor().reshape(-1, *pixels.shape[-2:]).bool() if mask is not None
                          else torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.bool))
            tiles.extend(pixels)
            masks.extend(pixel_mask)
            counts.append(pixels.shape[0])
        out: list[torch.Tensor | None] = [None] * len(tiles)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tiles):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        p = self.patch_size
        for index in by_shape.values():
            pixels = torch.stack([tiles[i] for i in index]).to(dtype)
            pixel_mask = torch.stack([masks[i] for i in index])
            patches = pixel_mask.unfold(1, p, p).unfold(2, p, p)
            patch_mask = patches.sum(dim=(-1, -2)) > 0
            features = self.connector(self.vision_model(pixels, patch_mask))
            for i, f in zip(index, features):
                out[i] = f
        embeds, at = [], 0
        for n in counts:
            embeds.append(torch.cat(out[at : at + n]))  # type: ignore[arg-type]
            at += n
        return embeds
