"""oneDNN-packed bf16 weights: the same results as the plain matmul, through a whole model."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.layers.linear import (
    ColumnParallelLinear,
    pack_linear_weights,
    pack_weight,
    packed_linear,
    packed_matmul_available,
)

pytestmark = pytest.mark.skipif(not packed_matmul_available(torch.empty(1, 1, dtype=torch.bfloat16)),
                                reason="no oneDNN bf16 weight packing on this CPU or torch build")


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_matmul_equals_plain(rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    w = torch.randn(80, 96, generator=gen).bfloat16()
    b = torch.randn(80, generator=gen).bfloat16()
    assert torch.equal(packed_linear(x, pack_weight(w), b), torch.nn.functional.linear(x, w, b))


def test_packing_releases_the_plain_weight():
    layer = ColumnParallelLinear(32, [16, 16]).bfloat16()
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 32).bfloat16()
    expected = layer(x)
    assert pack_linear_weights(layer) == 1 and layer.weight.numel() == 0
    assert torch.equal(layer(x), expected)
    assert pack_linear_weights(layer) == 0  # idempotent
    fp32 = ColumnParallelLinear(32, [16])
    assert pack_linear_weights(fp32) == 0  # only bf16 is packed: fp32 keeps MKL's GEMM


def test_bf16_model_generates_the_same_tokens_packed_or_not(llama_dir, monkeypatch):
    prompts = ["Hello there", "The quick brown fox jumps"]
    params = SamplingParams(max_new_tokens=12)
    packed = LLM(llama_dir, dtype="bfloat16")
    assert packed.engine.runner.model.lm_head._packed is not None
    with_packing = [r.token_ids for r in packed.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("LOOM_DISABLE_PACKED_LINEAR", "1")
    plain = LLM(llama_dir, dtype="bfloat16")
    assert plain.engine.runner.model.lm_head._packed is None
    assert [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)] == with_packing
