"""Qwen2-VL and Qwen2.5-VL: their own vision towers (qwen2_vl_vision.py) and Loom's Qwen2 language model with
M-RoPE: a prompt position is (temporal, height, width). Text takes three equal numbers that count on from the
position before it; an image's tokens take their grid coordinates from where the image starts, and the text after
it resumes at start + max(grid height, grid width) (transformers' get_rope_index). Generated tokens take position
index + delta, delta being the prompt's last position + 1 - its length.
"""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.models.llama import Qwen2ForCausalLM
from loom.models.qwen2_vl_vision import vision_tower_for
from loom.models.vlm import VisionLanguageModel
from loom.protocol.multimodal import ImageInput


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    PREFIXES = (("model.visual.", "visual."), ("visual.", "visual."), ("model.language_model.", "lm"),
                ("model.", "lm"))

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        super().__init__(cfg, int(hf.get("image_token_id", 151655)))
        self.visual = vision_tower_for(str(hf["model_type"]), hf["vision_config"])
        self.merge = int(hf["vision_config"].get("spatial_merge_size", 2))

    @staticmethod
    def language_model_class(cfg: ModelConfig) -> type[nn.Module]:
        return Qwen2ForCausalLM  # with M-RoPE from the config's mrope_section

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype = next(self.visual.parameters()).dtype
        pixels = torch.cat([im.tensors["pixel_values"].tensor() for im in images]).to(dtype)
        grids = torch.cat([im.tensors["image_grid_thw"].tensor().reshape(-1, 3) for im in images])
        return list(self.visual(pixels, grids).split(self.visual.output_lengths(grids)))

    def mrope_positions(self, num_prompt_tokens: int, images: list[ImageInput],
                        image_positions: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(3, num_prompt_tokens) positions of the prompt and the delta of the positions after it."""
        out = torch.empty(3, num_prompt_tokens, dtype=torch.long)
        at, pos = 0, 0  # next prompt index, next position
        for image, where in zip(images, image_positions):
            first, n = int(where[0]), len(where)
            out[:, at:first] = torch.arange(pos, pos + first - at)
            pos += first - at
            t, h, w = (int(x) for x in image.tensors["image_grid_thw"].tensor().reshape(3))
            h, w = h // self.merge, w // self.merge
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            out[:, first : first + n] = grid.reshape(3, -1) + pos
            pos += max(h, w)
            at = first + n
        out[:, at:] = torch.arange(pos, pos + num_prompt_tokens - at)
        last = int(out.max()) if num_prompt_tokens else -1
        return out, last + 1 - num_prompt_tokens


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    pass
