"""PaliGemma (`PaliGemmaForConditionalGeneration`): a SigLIP vision tower, one linear projection, and Loom's Gemma
(PaliGemma 1) or Gemma 2 (PaliGemma 2) language model.

PaliGemma is a prefix-LM. Its processor writes a prompt as `<image>` x image_seq_length per image, BOS, the text
and "\\n", every token of type 0, and transformers lets the tokens of type 0 attend to each other both ways: the
mask is OR(causal, prefix block), and on Gemma 2's sliding layers OR(window, prefix block), so the prefix is open
past the window. Generated tokens (type 1) attend causally. Loom serves a prompt as that prefix
(`bidirectional_prompt`): the scheduler computes a prompt in one step (past `max_batch_prefill_tokens` if need be),
the runner opens the prompt's range at prefill, and the prefix-cache key of each of the prompt's blocks holds a
digest of the whole prompt, since a block's K/V depend on the tokens after it: prompts share blocks only when they
are equal. A text-only prompt (which transformers' processor refuses) is a prefix too, as transformers computes it
with token types 0.

Positions count from 1 (transformers' PaliGemma adds 1 to every position id), so the language model's rotary
tables have one position more than the model's length.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from loom.config import ModelConfig
from loom.models.vision_encoders import SiglipVisionTower
from loom.models.vlm import TOWER_AND_PROJECTOR, VisionLanguageModel
from loom.protocol.multimodal import ImageInput
from loom.worker.image_embeds import ImageRows


class PaliGemmaProjector(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.linear = nn.Linear(width, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemmaForConditionalGeneration(VisionLanguageModel):
    bidirectional_prompt = True
    PREFIXES = TOWER_AND_PROJECTOR
    SKIPPED = ("vision_tower.vision_model.head.", "vision_tower.head.")  # SigLIP's pooling head, never used

    def __init__(self, cfg: ModelConfig):
        hf = cfg.hf_config
        # transformers' PaliGemma config sets `use_bidirectional_attention` on its text config: its meaning here is
        # `bidirectional_prompt`, not a language model without a causal mask
        text = {k: v for k, v in hf.items() if k != "use_bidirectional_attention"}
        super().__init__(replace(cfg, hf_config=text, max_model_len=cfg.max_model_len + 1),
                         int(hf.get("image_token_index", hf.get("image_token_id", 256000))))
        self.config = cfg
        vision = hf["vision_config"]
        hidden = int(hf["hidden_size"])  # the language model's (config.normalise_hf_config lifts text_config)
        projection = int(hf.get("projection_dim") or vision.get("projection_dim") or hidden)
        if projection != hidden:
            raise ValueError(f"PaliGemma: projection_dim {projection} differs from the language model's hidden size "
                             f"{hidden}; the image embeddings would not fit")
        self.vision_tower = SiglipVisionTower(vision)
        self.multi_modal_projector = PaliGemmaProjector(int(vision["hidden_size"]), projection)

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        dtype = self.multi_modal_projector.linear.weight.dtype
        pixels = torch.cat([im.tensors["pixel_values"].tensor() for im in images]).to(dtype)
        return list(self.multi_modal_projector(self.vision_tower(pixels)))  # per image (tokens, hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        return super().forward(input_ids, positions + 1, image_rows)  # transformers: positions count from 1
