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

    def build(self, pieces: list[Any], add_special_tokens: bool = True) -> ImagePrompt:
        """`pieces`: text (str) and images (PIL images), in prompt order. Raises ValueError for a prompt the
        processor refuses (say, a literal image token in the text with no image for it)."""
        images = [p for p in pieces if not isinstance(p, str)]
        text = "".join(p if isinstance(p, str) else self.placeholder for p in pieces)
        try:
            whole = self.processor(text=[text], images=[images] if images else None, return_tensors="pt",
                                   add_special_tokens=add_special_tokens)
        except ValueError:
            raise
        except Exception as err:  # the processor's own checks raise assorted types
            raise ValueError(str(err)) from err
        ids = whole["input_ids"][0].tolist()
        if not images:
            if self.image_token_id in ids:
                raise ValueError("the prompt has image tokens but no image")
            return ImagePrompt(ids, [])
        placed = []
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        used = 0
        for image in images:
            alone = self.processor(text=[self.placeholder], images=[[image]], return_tensors="pt",
                                   add_special_tokens=False)
            n = int((alone["input_ids"][0] == self.image_token_id).sum())
            mine = positions[used : used + n]
            if n == 0 or len(mine) < n:
                raise ValueError("the prompt's image tokens do not match its images")
            used += n
            tensors = {k: v for k, v in alone.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
            placed.append(image_input(mine[0], mine[-1] + 1 - mine[0], n, tensors))
        if used != len(positions):
            raise ValueError("the prompt has image tokens that belong to no image")
        return ImagePrompt(ids, placed)
