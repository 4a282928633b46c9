"""Images of a prompt as they travel router → engine → runner: preprocessed tensors, their place in the prompt, and
a content hash.

The router runs the checkpoint's image processor and expands each image into its placeholder tokens; what reaches
the engine is, per image, the processor's tensors for that image alone and the span of prompt positions its
tokens occupy. The runner computes the image's embeddings (the vision tower) when a step first computes a position
of the span and puts them at the span's image-token positions, in order:

    prompt:  [ text ... | <image> <image> <row_1_col_2> <image> ... | text ... ]
                          offset                                      offset + length
             embeddings row 0, 1, 2 ... go to the span's positions holding the model's image token id; other
             tokens of the span (a family's tile separators) keep their text embeddings.
"""

from __future__ import annotations

import hashlib
from array import array

import msgspec
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
           "int32": torch.int32, "bool": torch.bool}


class TensorData(msgspec.Struct, array_like=True, frozen=True):
    """A tensor as plain bytes (msgpack carries no torch objects)."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorData:
        t = tensor.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"cannot send a {t.dtype} tensor")
        raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        return cls(name, list(t.shape), raw.numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        dtype = _DTYPES[self.dtype]
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        if dtype == torch.bool:
            return raw.to(torch.bool).view(self.shape)
        return raw.view(dtype).view(self.shape)


class ImageInput(msgspec.Struct, array_like=True, frozen=True):
    """One image of a prompt."""

    offset: int  # prompt position of the first token of its span
    length: int  # positions in its span: from its first image token to its last, separators included
    num_embeds: int  # image-token positions in the span (rows of its embeddings)
    content_hash: bytes  # what it is, for the prefix cache: same text and another image must never share K/V
    tensors: dict[str, TensorData]  # the image processor's outputs for this image alone

    @property
    def end(self) -> int:
        return self.offset + self.length


def content_hash(tensors: dict[str, torch.Tensor]) -> bytes:
    """A digest of the preprocessed image (what the model sees), names and shapes included."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update((t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)).numpy().tobytes())
    return h.digest()


def image_input(offset: int, length: int, num_embeds: int, tensors: dict[str, torch.Tensor]) -> ImageInput:
    return ImageInput(offset, length, num_embeds, content_hash(tensors),
                      {name: TensorData.of(t) for name, t in tensors.items()})


def block_extras(images: list[ImageInput], block_size: int, num_blocks: int) -> list[bytes]:
    """Per KV block, the content hashes of the images whose spans touch it (b"" for a block of text alone): the
    prefix cache keys a block by its tokens and these, so a block with another image is another block."""
    extras = [b""] * num_blocks
    for image in images:
        first, last = image.offset // block_size, (image.end - 1) // block_size
        for i in range(first, min(last + 1, num_blocks)):
            extras[i] += image.content_hash
    return extras


def whole_prompt_extras(token_ids: list[int], images: list[ImageInput], num_blocks: int) -> list[bytes]:
    """Per KV block of the prompt, for a model whose prompt tokens attend to each other both ways (PaliGemma): a
    digest of the whole prompt (its tokens, and its images' places and content hashes), the same for every block,
    since a block's K/V depend on the tokens after it too. Prompts then share blocks only when they are equal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(len(token_ids).to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    for image in images:
        h.update(image.offset.to_bytes(8, "little") + image.length.to_bytes(8, "little") + image.content_hash)
    return [h.digest()] * num_blocks
