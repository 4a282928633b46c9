"""Vision towers at their real sizes (random weights): Loom's implementation against transformers' on the same
weights, in one run, and both against this machine's bf16 matmul rate at the tower's own GEMM shape.

    python benchmarks/vision_tower.py [--dtype bfloat16] [--repeats 3]

Towers: SigLIP-B/16 at 512 px (SmolVLM-256M/500M: one tile), CLIP-L/14 at 336 px (Llava 1.5: one image), and the
Qwen2-VL-2B tower on a 448x448 image (1024 patches). Prints ms per image for each, the ratio transformers / Loom,
and the share of the matmul rate each reaches (FLOPs of its linear layers and attention over its time).
"""

from __future__ import annotations

import argparse
import time

import torch

from loom.models.qwen2_vl_vision import Qwen2VisionTower
from loom.models.vision_encoders import CLIPVisionTower, SiglipVisionTower

SIGLIP_512 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
CLIP_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
QWEN2_VL_2B = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")


def copy_weights(hf_model: torch.nn.Module, ours: torch.nn.Module) -> None:
    """transformers' randomly initialised tower weights into ours (our module names are transformers'), wherever
    transformers nests the tower; every parameter of ours must be given one."""
    source = getattr(hf_model, "vision_model", hf_model).state_dict()
    result = ours.load_state_dict({k: v for k, v in source.items() if k in ours.state_dict()}, strict=False)
    assert not result.missing_keys, result.missing_keys


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of torch's matmul at (m, k) @ (k, n) in `dtype` (oneDNN's GEMM on CPU)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return 2 * m * k * n / (best_ms(lambda: a @ b, repeats) / 1e3)


def tower_flops(tokens: int, hidden: int, inter: int, layers: int, keys: int | None = None) -> float:
    keys = keys or tokens
    linear = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 2 * 2 * tokens * keys * hidden
    return layers * (linear + attention)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    import transformers as T

    rows = []
    # SigLIP-B/16-512
    loom_siglip = SiglipVisionTower(SIGLIP_512).to(dtype).eval()
    hf_siglip = T.SiglipVisionModel(T.SiglipVisionConfig(**SIGLIP_512, vision_use_head=False)).to(dtype).eval()
    copy_weights(hf_siglip, loom_siglip)
    pixels = torch.randn(1, 3, 512, 512).to(dtype)
    diff = (loom_siglip(pixels).float() - hf_siglip(pixel_values=pixels).last_hidden_state.float()).abs().max()
    rows.append(("SigLIP-B/16 512px tile", best_ms(lambda: loom_siglip(pixels), args.repeats),
                 best_ms(lambda: hf_siglip(pixel_values=pixels), args.repeats),
                 tower_flops(1024, 768, 3072, 12), (1024, 768, 3072), float(diff)))
    # CLIP-L/14-336 up to the second-to-last layer (Llava's feature layer)
    loom_clip = CLIPVisionTower(CLIP_336, [-2]).to(dtype).eval()
    hf_clip = T.CLIPVisionModel(T.CLIPVisionConfig(**CLIP_336)).to(dtype).eval()
    copy_weights(hf_clip, loom_clip)
    pixels = torch.randn(1, 3, 336, 336).to(dtype)
    ours = loom_clip(pixels)[0]
    theirs = hf_clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    rows.append(("CLIP-L/14 336px image", best_ms(lambda: loom_clip(pixels), args.repeats),
                 best_ms(lambda: hf_clip(pixel_values=pixels, output_hidden_states=True), args.repeats),
                 tower_flops(577, 1024, 4096, 23), (577, 1024, 4096),
                 float((ours.float() - theirs.float()).abs().max())))
    # Qwen2-VL-2B tower, 448x448 → 32x32 patches of 14 px
    loom_qwen = Qwen2VisionTower(QWEN2_VL_2B).to(dtype).eval()
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    hf_qwen = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**QWEN2_VL_2B)).to(dtype).eval()
    copy_weights(hf_qwen, loom_qwen)
    grid = torch.tensor([[1, 32, 32]])
    patches = torch.randn(1024, 3 * 2 * 14 * 14).to(dtype)
    out = hf_qwen(patches, grid_thw=grid)
    theirs = out.pooler_output if hasattr(out, "pooler_output") else out
    diff = (loom_qwen(patches, grid).float() - theirs.float()).abs().max()
    rows.append(("Qwen2-VL-2B tower 448px", best_ms(lambda: loom_qwen(patches, grid), args.repeats),
                 best_ms(lambda: hf_qwen(patches, grid_thw=grid), args.repeats),
                 tower_flops(1024, 1280, 5120, 32), (1024, 1280, 5120), float(diff)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{'tower':28s} {'loom ms':>9s} {'hf ms':>9s} {'hf/loom':>8s} {'% of matmul rate':>17s} {'max diff':>9s}")
    for name, loom_ms, hf_ms, flops, (m, k, n), diff in rows:
        rate = matmul_rate(m, k, n, dtype, args.repeats)
        share = flops / (loom_ms / 1e3) / rate * 100
        print(f"{name:28s} {loom_ms:9.1f} {hf_ms:9.1f} {hf_ms / loom_ms:8.2f} {share:16.0f}% {diff:9.2g}")


if __name__ == "__main__":
    main()
