"""Prompts with images → token ids and `ImageInput`s, with the checkpoint's own processor (transformers).

Shared by the router and `loom.LLM`. The prompt is a list of text pieces and images; each image becomes the
family's placeholder text (Llava's `<image>`, Qwen2-VL's `<|vision_start|><|image_pad|><|vision_end|>`, ...) and
the processor expands placeholders into the image's tokens exactly as transformers does for the same image (the
count depends on the image's size for Llava-Next, Idefics3 and Qwen2-VL) and computes its tensors. Each image's
tensors come from the processor run on that image alone, so that the engine gets them per image (the unit of its
encoder cache and of prefix-cache identity).

Runs in a worker thread (CPU-bound, and the processor is not async).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loom.protocol.multimodal import ImageInput, image_input

# processor outputs that are the text's, not the image's
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


def image_token_id(hf_config: dict[str, Any]) -> int | None:
    for key in ("image_token_index", "image_token_id"):
        if hf_config.get(key) is not None:
            return int(hf_config[key])
    return None


def is_vision_language(hf_config: dict[str, Any]) -> bool:
    return hf_config.get("vision_config") is not None and image_token_id(hf_config) is not None


def _placeholder(processor: Any) -> str:
    """The text the family's processor expands into one image's tokens."""
    kind = type(processor).__name__
    if kind.startswith(("Qwen2VL", "Qwen2_5_VL")):
        return "<|vision_start|><|image_pad|><|vision_end|>"
    if kind.startswith("Gemma3"):
        return processor.boi_token
    return processor.image_token


def load_processor(model_dir: str | Path, hf_config: dict[str, Any]) -> Any:
    """The checkpoint's processor. Qwen2-VL's and Qwen2.5-VL's need torchvision for their video half, even for
    images; without it (Loom does not depend on torchvision), the same processor class without a video processor:
    images and text still go through transformers' own processor code. Likewise SmolVLM's, which also needs
    num2words (for video prompts) to be built."""
    from transformers import AutoProcessor
    from transformers.utils import is_num2words_available, is_torchvision_available

    model_type = hf_config.get("model_type")
    if model_type == "smolvlm" and not (is_torchvision_available() and is_num2words_available()):
        return _smolvlm_processor_without_video(Path(model_dir))
    if model_type not in ("qwen2_vl", "qwen2_5_vl") or is_torchvision_available():
        return AutoProcessor.from_pretrained(str(model_dir))
    import transformers

    base = (transformers.Qwen2_5_VLProcessor if hf_config["model_type"] == "qwen2_5_vl"
            else transformers.Qwen2VLProcessor)

    class ImageOnlyProcessor(base):  # the parent checks its video processor against a torchvision-only class
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return ImageOnlyProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(str(model_dir)),
                              tokenizer=tokenizer, video_processor=None,
                              chat_template=getattr(tokenizer, "chat_template", None))


def _smolvlm_processor_without_video(model_dir: Path) -> Any:
    import transformers
    from transformers.models.smolvlm import processing_smolvlm

    def num2words_missing(*args, **kwargs):
        raise ImportError("SmolVLM's video prompts need the `num2words` package")

    class ImageOnlyProcessor(transformers.SmolVLMProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None):
            # the parent's init refuses to run without num2words, which only its video prompts use
            saved = processing_smolvlm.num2words
            processing_smolvlm.num2words = saved or num2words_missing
            try:
                super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len,
                                 chat_template=chat_template)
            finally:
                processing_smolvlm.num2words = saved

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = "SmolVLMProcessor"
    config_file = Path(model_dir) / "processor_config.json"
    processor_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return ImageOnlyProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(str(model_dir)),
                              tokenizer=tokenizer, image_seq_len=int(processor_config.get("image_seq_len", 169)),
                              chat_template=getattr(tokenizer, "chat_template", None))


@dataclass(slots=True)
class ImagePrompt:
    token_ids: list[int]
    images: list[ImageInput]


class ImagePromptBuilder:
    def __init__(self, model_dir: str | Path, hf_config: dict[str, Any]):
        self.processor = load_processor(model_dir, hf_config)
        token = image_token_id(hf_config)
        assert token is not None
        self.image_token_id = token
        self.placeholder = _placeholder(self.processor)
        self._placeholder_ids = self.processor.tokenizer(self.placeholder, add_special_tokens=False)["input_ids"]

    def build(self, pieces: list[Any], add_special_tokens: bool = True) -> ImagePrompt:
        """`pieces`: text (str) and images (PIL images), in prompt order. Raises ValueError for a prompt the
        processor refuses (say, a literal image token in the text with no image for it)."""
        images = [p for p in pieces if not isinstance(p, str)]
        text = "".join(p if isinstance(p, str) else self.placeholder for p in pieces)
        if not images:
            ids = self._process(text=[text], add_special_tokens=add_special_tokens)["input_ids"][0].tolist()
            if self.image_token_id in ids:
                raise ValueError("the prompt has image tokens but no image")
            return ImagePrompt(ids, [])
        alone = [self._process(text=[self.placeholder], images=[[image]], add_special_tokens=False)
                 for image in images]
        expansions = [a["input_ids"][0].tolist() for a in alone]
        ids = self._spliced(text, expansions, add_special_tokens)
        if ids is None:  # the processor on the whole prompt: each image processed a second time
            ids = self._process(text=[text], images=[images],
                                add_special_tokens=add_special_tokens)["input_ids"][0].tolist()
        placed = []
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        used = 0
        for one, expansion in zip(alone, expansions):
            n = sum(1 for t in expansion if t == self.image_token_id)
            mine = positions[used : used + n]
            if n == 0 or len(mine) < n:
                raise ValueError("the prompt's image tokens do not match its images")
            used += n
            tensors = {k: v for k, v in one.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
            placed.append(image_input(mine[0], mine[-1] + 1 - mine[0], n, tensors))
        if used != len(positions):
            raise ValueError("the prompt has image tokens that belong to no image")
        return ImagePrompt(ids, placed)

    def _process(self, **kwargs: Any) -> Any:
        try:
            return self.processor(return_tensors="pt", **kwargs)
        except ValueError:
            raise
        except Exception as err:  # the processor's own checks raise assorted types
            raise ValueError(str(err)) from err

    def _spliced(self, text: str, expansions: list[list[int]], add_special_tokens: bool) -> list[int] | None:
        """The prompt's ids without processing its images again: the text tokenized with the placeholders, each
        placeholder's ids then replaced by its image's expansion. Exact when every expansion starts and ends with
        a special token: the tokenizer splits text at special tokens, so the text around an expansion tokenizes as
        it does around the placeholder. None for a family whose expansion has plain text at an end (Gemma 3's
        newlines merge with the text next to them)."""
        if type(self.processor).__name__.startswith("PaliGemma"):
            # its processor also writes the prompt's BOS after the last image and "\n" at its end: one image's
            # expansion carries both, and is bounded by added tokens whenever the tokenizer has "\n" as one
            return None
        added, marker = self.processor.tokenizer.added_tokens_decoder, self._placeholder_ids

        def strips(first: int, last: int) -> tuple[bool, bool]:  # how the tokens eat whitespace next to them
            return bool(getattr(added[first], "lstrip", False)), bool(getattr(added[last], "rstrip", False))

        def special(token: int) -> bool:  # a special added token: no text next to it can merge into it (an added
            # "\n\n", as Gemma's tokenizer may have, could take a newline of the text and leave another)
            return token in added and bool(getattr(added[token], "special", False))

        if not marker or not special(marker[0]) or not special(marker[-1]):
            return None
        for e in expansions:
            if not e or not special(e[0]) or not special(e[-1]) or strips(e[0], e[-1]) != strips(marker[0], marker[-1]):
                return None
        ids = self.processor.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        out, at, k = [], 0, 0
        while at < len(ids):
            if ids[at : at + len(marker)] == marker:
                if k == len(expansions):
                    raise ValueError("the prompt has image tokens that belong to no image")
                out.extend(expansions[k])
                k, at = k + 1, at + len(marker)
            else:
                out.append(ids[at])
                at += 1
        return out if k == len(expansions) else None
