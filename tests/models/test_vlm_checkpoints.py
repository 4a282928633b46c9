"""The tiny random VLM checkpoints of `loom.testing.vlm_checkpoints`: each family saves, loads back with
transformers (model + processor), expands one image into the expected number of image tokens, and its logits depend
on the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from loom.testing.vlm_checkpoints import (
    VLM_FAMILIES,
    build_tiny_vlm,
    hf_reference,
    image_token,
    load_hf,
    placeholder_text,
    test_image as make_image,
)

# Image tokens in input_ids for one image of (width, height) pixels.
EXPECTED_IMAGE_TOKENS = {
    "llava": {(40, 30): 16, (64, 48): 16, (30, 70): 16},  # resize + centre crop to 32x32: 4x4 patches, CLS dropped
    "llava_next": {(40, 30): 44, (64, 48): 70, (30, 70): 56},  # anyres: base 16 + unpadded grid + newlines
    "idefics3": {(40, 30): 20, (64, 48): 20, (30, 70): 12},  # (rows*cols + 1 global) tiles x 4 tokens
    "smolvlm": {(40, 30): 20, (64, 48): 20, (30, 70): 12},  # the same tiling as idefics3
    "qwen2_vl": {(40, 30): 4, (64, 48): 12, (30, 70): 8},  # (h/16)*(w/16) after smart_resize to multiples of 16
    "qwen2_5_vl": {(40, 30): 4, (64, 48): 12, (30, 70): 8},
    "gemma3": {(40, 30): 4, (64, 48): 4, (30, 70): 4},  # fixed mm_tokens_per_image
}
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
}
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """family -> (dir, model, processor), built and loaded once."""
    root = tmp_path_factory.mktemp("vlm")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            path = build_tiny_vlm(family, root / family)
            model, processor = load_hf(path)
            cache[family] = (path, model, processor)
        return cache[family]

    return get


def _prompt(family, processor, with_image=True):
    image = placeholder_text(family, processor) if with_image else ""
    return f"<|im_start|>user\n{image}What is in this picture?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_checkpoint_files_and_tokens(vlm, family):
    path, model, processor = vlm(family)
    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name
    assert type(model).__name__ == MODEL_CLASSES[family]
    config = json.loads((path / "config.json").read_text())
    image_id = config.get("image_token_id", config.get("image_token_index"))
    tokenizer = processor.tokenizer
    assert image_id == tokenizer.convert_tokens_to_ids(image_token(family))
    assert len(tokenizer) <= model.config.get_text_config().vocab_size
    # No degenerate tensor: every saved tensor varies (norm scales, biases and projections included).
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert t.dtype == torch.float32, key
            assert t.numel() > 1 and float(t.std()) > 1e-3, key


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_token_counts(vlm, family):
    _, _, processor = vlm(family)
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token(family))
    prompt = _prompt(family, processor)
    for size, expected in EXPECTED_IMAGE_TOKENS[family].items():
        inputs = processor(text=prompt, images=[make_image(*size)], return_tensors="pt")
        assert int((inputs["input_ids"] == image_id).sum()) == expected, size


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reference_with_one_image(vlm, family):
    path, model, processor = vlm(family)
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token(family))
    prompt = _prompt(family, processor)
    ref = hf_reference(path, prompt, [make_image(40, 30)], max_new_tokens=NEW_TOKENS, model=model,
                       processor=processor)
    length = ref.input_ids.shape[1]
    assert ref.input_ids.shape == (1, length)
    assert int((ref.input_ids == image_id).sum()) == EXPECTED_IMAGE_TOKENS[family][(40, 30)]
    assert ref.logits.shape == (length, model.config.get_text_config().vocab_size)
    assert ref.logits.dtype == torch.float32 and torch.isfinite(ref.logits).all()
    assert float(ref.logits.std(dim=-1).min()) > 0.1  # not flat at any position
    assert float((ref.logits - ref.logits[0]).abs().amax(dim=-1)[1:].min()) > 1e-3  # positions differ
    eos = model.generation_config.eos_token_id
    assert len(ref.greedy) == NEW_TOKENS or (ref.greedy and ref.greedy[-1] == eos)
    assert ref.greedy[0] == int(ref.logits[-1].argmax())  # the continuation starts at the last position's argmax
    assert "pixel_values" in ref.processor_inputs
    # The vision tower matters: another image with the same token layout gives different last-position logits.
    other = hf_reference(path, prompt, [make_image(40, 30, seed=1)], max_new_tokens=1, model=model,
                         processor=processor)
    assert torch.equal(other.input_ids, ref.input_ids)
    assert float((other.logits[-1] - ref.logits[-1]).abs().max()) > 0.1


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_reference_without_images(vlm, family):
    path, model, processor = vlm(family)
    ref = hf_reference(path, _prompt(family, processor, with_image=False), [], max_new_tokens=2, model=model,
                       processor=processor)
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token(family))
    assert int((ref.input_ids == image_id).sum()) == 0
    assert "pixel_values" not in ref.processor_inputs
    assert torch.isfinite(ref.logits).all() and ref.logits.shape[0] == ref.input_ids.shape[1]


def test_seeded_and_idempotent(tmp_path):
    def tensors(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a = tensors(build_tiny_vlm("llava", tmp_path / "a", seed=0))
    b = tensors(build_tiny_vlm("llava", tmp_path / "a", seed=0))  # again into the same directory
    c = tensors(build_tiny_vlm("llava", tmp_path / "c", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["multi_modal_projector.linear_1.weight"], c["multi_modal_projector.linear_1.weight"])


def test_image_is_deterministic_and_structured():
    a, b = make_image(40, 30), make_image(40, 30)
    assert a.size == (40, 30) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != make_image(40, 30, seed=1).tobytes()
    assert len(np.unique(np.asarray(a).reshape(-1, 3), axis=0)) > 100
