"""Loom's Qwen2-VL / Qwen2.5-VL vision towers (`loom.models.qwen2_vl_vision`) against transformers' on tiny random
checkpoints: same merged image embeddings (fp32, max abs diff < 1e-5) for one and several images of different
sizes, per-image independence (a batch of images equals each image alone), and multi-frame grids."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loom.models.qwen2_vl_vision import (
    Qwen2_5VisionTower,
    Qwen2VisionTower,
    vision_tower_for,
    window_index,
)
from loom.testing.vlm_checkpoints import build_tiny_vlm, load_hf, placeholder_text, test_image as make_image

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# The tiny checkpoints use 8x8 patches, 2x2 merge and (Qwen2.5) window_size 32 px, i.e. windows of 2x2 merged
# tokens. After the processor's smart_resize to multiples of 16 px, the patch grids (t, h, w) are:
#   40x30 -> (1, 4, 4):   2x2 merged tokens, exactly one window;
#   64x48 -> (1, 6, 8):   3x4 merged tokens, 2x2 windows (the bottom row partial);
#   112x80 -> (1, 10, 14): 5x7 merged tokens, 3x4 windows (partial last row and column).
# So Qwen2.5's window attention (blocks not in fullatt_block_indexes = [1, 3]) runs with several, unequal windows.
SIZES = ((40, 30), (64, 48), (112, 80))
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_vision")
    out = {}
    for family in FAMILIES:
        path = build_tiny_vlm(family, root / family)
        model, processor = load_hf(path)
        out[family] = (path, model, processor)
    return out


def _visual_state_dict(path) -> tuple[str, dict[str, torch.Tensor]]:
    """The checkpoint's vision tower tensors with their prefix stripped, and that prefix."""
    tensors = load_file(str(path / "model.safetensors"))
    for prefix in ("model.visual.", "visual."):
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return prefix, found
    raise AssertionError("no visual.* tensors in the checkpoint")


def _loom_tower(path) -> torch.nn.Module:
    cfg = json.loads((path / "config.json").read_text())
    tower = vision_tower_for(cfg["model_type"], cfg["vision_config"])
    _, state = _visual_state_dict(path)
    tower.load_state_dict(state, strict=True)  # every name and shape matches transformers'
    return tower.eval()


def _inputs(family: str, processor, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    out = processor(text=placeholder_text(family) * len(images), images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _hf_embeddings(model, pixel_values, grid_thw) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values, image_grid_thw=grid_thw)
    return torch.cat(list(out.pooler_output), dim=0)  # per image, split by get_image_features


def test_checkpoint_prefix_and_factory(checkpoints):
    for family, cls in zip(FAMILIES, (Qwen2VisionTower, Qwen2_5VisionTower)):
        path, _, _ = checkpoints[family]
        prefix, state = _visual_state_dict(path)
        assert prefix == "visual."  # what transformers 5 writes (as on the Hub)
        assert "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].ndim == 5
        assert isinstance(_loom_tower(path), cls)
    with pytest.raises(ValueError):
        vision_tower_for("llava", {})


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(checkpoints, family):
    path, model, processor = checkpoints[family]
    tower = _loom_tower(path)
    cases = [SIZES[:1], SIZES[:2], SIZES[2:], SIZES]
    for sizes in cases:
        pixel_values, grid_thw = _inputs(family, processor, sizes)
        ref = _hf_embeddings(model, pixel_values, grid_thw)
        with torch.no_grad():
            got = tower(pixel_values, grid_thw)
        assert got.shape == ref.shape == (int(grid_thw.prod(-1).sum()) // 4, tower.out_hidden_size)
        assert sum(tower.output_lengths(grid_thw)) == got.shape[0]
        diff = (got - ref).abs().max().item()
        assert diff < TOL, (family, sizes, diff)


def test_qwen2_5_has_several_windows(checkpoints):
    path, _, processor = checkpoints["qwen2_5_vl"]
    tower = _loom_tower(path)
    window = tower.window_size // tower.spatial_merge_size // tower.patch_size
    assert window == 2
    _, grid_thw = _inputs("qwen2_5_vl", processor, SIZES)
    assert grid_thw.tolist() == [[1, 4, 4], [1, 6, 8], [1, 10, 14]]
    index, lengths = window_index(grid_thw, tower.spatial_merge_size, window)
    assert sorted(index.tolist()) == list(range(4 + 12 + 35))
    # 1 window, then 2x2 (bottom row 1 token high), then 3x4 (last row and column partial); 4 patches per token
    assert lengths == [16] + [16, 16, 8, 8] + [16, 16, 16, 8] * 2 + [8, 8, 8, 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_images_independent(checkpoints, family):
    """A call on several images equals the calls on each image alone, concatenated (the engine batches images of
    different requests)."""
    path, _, processor = checkpoints[family]
    tower = _loom_tower(path)
    pixel_values, grid_thw = _inputs(family, processor, SIZES)
    with torch.no_grad():
        together = tower(pixel_values, grid_thw)
        alone, start = [], 0
        for g in grid_thw:
            n = int(g.prod())
            alone.append(tower(pixel_values[start:start + n], g[None]))
            start += n
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-6, rtol=0)
    # the same image twice: identical rows
    with torch.no_grad():
        twice = tower(torch.cat([pixel_values[:64]] * 2), torch.tensor([[1, 8, 8], [1, 8, 8]]))
    torch.testing.assert_close(twice[:16], twice[16:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_frame_grid_matches_transformers(checkpoints, family):
    """Grids with t > 1 (video-like): attention per frame, windows per frame."""
    path, model, _ = checkpoints[family]
    tower = _loom_tower(path)
    grid_thw = torch.tensor([[2, 6, 8], [1, 4, 6], [3, 4, 4]])
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 8 * 8, generator=gen)
    ref = _hf_embeddings(model, pixel_values, grid_thw)
    with torch.no_grad():
        got = tower(pixel_values, grid_thw)
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_runs_in_parameter_dtype(checkpoints, family):
    path, _, processor = checkpoints[family]
    tower = _loom_tower(path)
    pixel_values, grid_thw = _inputs(family, processor, SIZES[:2])
    with torch.no_grad():
        ref = tower(pixel_values, grid_thw)
        got = tower.to(torch.bfloat16)(pixel_values, grid_thw)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
