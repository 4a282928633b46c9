"""The runner's side of a prompt's images: which positions take image embeddings, and the encoder cache.

An image's embeddings (its vision tower output) are computed by the first step that computes a position of its
span, kept while later prompt chunks still have positions of the span to compute (chunked prefill may split a
prompt inside an image), and dropped once the span is computed: the tower runs once per image and admission
(again after a preemption, whose recompute starts over).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loom.protocol.multimodal import ImageInput


@dataclass(slots=True)
class ImageRows:
    """This step's rows of the flattened batch that take image embeddings instead of token embeddings."""

    rows: torch.Tensor  # (N,) long
    embeds: torch.Tensor  # (N, hidden)


def check_placement(token_ids: list[int], images: list[ImageInput], image_token_id: int) -> None:
    """The spans are in the prompt, in order and apart, and each has as many image tokens as its embeddings
    rows. Raises ValueError."""
    end = 0
    for i, image in enumerate(images):
        if image.offset < end or image.length <= 0 or image.end > len(token_ids):
            raise ValueError(f"image {i} is placed at prompt positions [{image.offset}, {image.end}), outside the "
                             "prompt or over another image")
        count = sum(1 for t in token_ids[image.offset : image.end] if t == image_token_id)
        if count != image.num_embeds:
            raise ValueError(f"image {i} has {image.num_embeds} embeddings but {count} image tokens in its span")
        end = image.end
    outside = sum(1 for t in token_ids if t == image_token_id) - sum(im.num_embeds for im in images)
    if outside:
        raise ValueError(f"the prompt has {outside} image tokens that belong to no image")


@dataclass(slots=True)
class SeqImages:
    """One request's images on the runner."""

    images: list[ImageInput]
    positions: list[torch.Tensor]  # per image: the prompt positions of its embeddings rows, ascending
    cache: dict[int, torch.Tensor] = field(default_factory=dict)  # image index → embeddings (the encoder cache)

    @classmethod
    def of(cls, images: list[ImageInput], token_ids: list[int], image_token_id: int) -> SeqImages:
        ids = torch.tensor(token_ids)
        positions = []
        for image in images:
            span = ids[image.offset : image.end]
            positions.append(torch.nonzero(span == image_token_id).flatten() + image.offset)
        return cls(images, positions)

    def to_encode(self, start: int, end: int) -> list[int]:
        """Images with positions in [start, end) whose embeddings are not cached."""
        return [i for i, image in enumerate(self.images)
                if image.offset < end and image.end > start and i not in self.cache]

    def token_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Per image with image tokens in [start, end): the range from its first image token to its last (for a
        family whose image tokens attend to each other both ways)."""
        out = []
        for image, pos in zip(self.images, self.positions):
            if len(pos) and image.offset < end and image.end > start:
                out.append((int(pos[0]), int(pos[-1]) + 1))
        return out

    def rows(self, start: int, end: int, first_row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(batch rows, their embeddings) for this step's positions [start, end), the sequence's first row being
        `first_row`; then drops the embeddings no later step needs."""
        out = []
        for i, image in enumerate(self.images):
            if image.offset >= end or image.end <= start:
                continue
            pos = self.positions[i]
            keep = (pos >= start) & (pos < end)
            if bool(keep.any()):
                out.append((pos[keep] - start + first_row, self.cache[i][keep]))
            if image.end <= end:
                self.cache.pop(i, None)
        return out
