"""What every vision-language family shares: a Loom language model (any registered text family) with images'
embeddings put at their tokens' rows, and checkpoint names routed to the language model or the vision parts.

A family subclass builds its vision parts and implements `encode_images` (its vision tower and projector over a
batch of `ImageInput`s → per image, (num_embeds, hidden) embeddings in the order of its image tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from loom.config import ModelConfig
from loom.layers.linear import CheckpointTensor
from loom.models.registry import resolve_model_class
from loom.protocol.multimodal import ImageInput
from loom.worker.image_embeds import ImageRows


# The Llava-style layout (Llava, Gemma 3, PaliGemma): a `vision_tower` and a `multi_modal_projector`. Hub checkpoints
# name the tower `vision_tower.vision_model.`, transformers 5 saves it as `vision_tower.`; newer ones put both under
# `model.`.
TOWER_AND_PROJECTOR: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("multi_modal_projector.", "multi_modal_projector."))


def language_model_class(cfg: ModelConfig) -> type[nn.Module]:
    text_type = cfg.get("text_model_type") or "llama"
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(text_type)
    if architecture is None:
        raise ValueError(f"{cfg.architecture}: its language model type {text_type!r} has no causal-LM class")
    return resolve_model_class(architecture)


class VisionLanguageModel(nn.Module):
    # checkpoint name prefixes → where they go: (prefix, "lm" | "lm_head" | our module prefix), first match wins;
    # both transformers >= 4.52's layout (`model.language_model.`) and the older one (`language_model.model.`)
    PREFIXES: tuple[tuple[str, str], ...] = ()
    # checkpoint tensors of parts this implementation never runs (a pooling head, layers after the feature layer)
    SKIPPED: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, image_token_id: int):
        super().__init__()
        self.config = cfg
        self.image_token_id = image_token_id
        self.language_model = self.language_model_class(cfg)(cfg)

    @staticmethod
    def language_model_class(cfg: ModelConfig) -> type[nn.Module]:
        return language_model_class(cfg)

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, image_rows: ImageRows) -> torch.Tensor:
        """The tokens' embeddings with the image rows' replaced."""
        embeds = self.language_model.model.embed(input_ids)
        embeds[image_rows.rows] = image_rows.embeds.to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                image_rows: ImageRows | None = None) -> torch.Tensor:
        embeds = None if image_rows is None else self.embed(input_ids, image_rows)
        return self.language_model(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden)

    def _route(self, name: str) -> tuple[str, str] | None:
        """(part, name within it) for a checkpoint name: part "lm" or a module prefix of ours; None to skip."""
        if any(s in name for s in self.SKIPPED):
            return None
        for prefix, part in (*self.PREFIXES, ("model.language_model.", "lm"), ("language_model.model.", "lm"),
                             ("language_model.lm_head.", "lm_head"), ("lm_head.", "lm_head")):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                if part == "lm":
                    return "lm", "model." + rest
                if part == "lm_head":
                    return "lm", "lm_head." + rest
                return part, rest if part.endswith(".") else ""
        raise ValueError(f"Checkpoint tensor {name!r} has no place in {type(self).__name__}")

    def load_weights(self, weights: Iterable[tuple[str, CheckpointTensor]]) -> dict[str, set]:
        others: list[tuple[str, CheckpointTensor]] = []

        def language_model_weights() -> Iterator[tuple[str, CheckpointTensor]]:
            for name, tensor in weights:
                route = self._route(name)
                if route is None:
                    continue
                part, rest = route
                if part == "lm":
                    yield rest, tensor
                else:
                    others.append((part + rest, tensor))

        lm_loaded = self.language_model.load_weights(language_model_weights())
        loaded = {f"language_model.{k}": v for k, v in lm_loaded.items()}
        params = dict(self.named_parameters())
        for name, tensor in others:
            param = params.get(name)
            if param is None:
                raise ValueError(f"Checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            value = tensor.full()
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            loaded[name] = {None}
        return loaded
