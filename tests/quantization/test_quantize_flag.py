"""`--quantize` on the fly: TGI's method names, each against transformers running the same quantized-then-
dequantized weights; and the refusals (already-quantized checkpoints, formats that do not match, unknown names)."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.layers.kernels import quant_gemm_cpu
from loom.quantization.methods import FP4_CODEBOOK, NF4_CODEBOOK, quantize_weight
from loom.testing.parity import assert_logits_parity, hf_model
from loom.worker.runner import ModelRunner


@pytest.mark.parametrize("method", ["eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_quantizers_round_to_their_grid(method):
    w = torch.randn(48, 128) * 0.05
    qt = quantize_weight(w, method)
    deq = qt.dequantize()
    assert deq.shape == w.shape
    if method in ("eetq", "bitsandbytes"):
        assert (qt.bits, qt.group_size) == (8, 64)
        step = (w.view(48, 2, 64).abs().amax(-1, keepdim=True) / 127).expand(48, 2, 64).reshape(48, 128)
        assert ((deq - w).abs() <= step / 2 + 1e-7).all()  # nearest int8 step of its group
    else:
        book = NF4_CODEBOOK if method.endswith("nf4") else FP4_CODEBOOK
        assert (qt.bits, qt.group_size) == (4, 64) and torch.equal(qt.codebook, book)
        # every code is the nearest table entry to its normalized weight
        normalized = (w.view(48, 2, 64) / qt.scales.unsqueeze(-1)).reshape(48, 128)
        nearest = (normalized.unsqueeze(-1) - book).abs().min(-1).values
        chosen = (normalized - book[qt.codes.long()]).abs()
        assert torch.allclose(chosen, nearest)


@pytest.mark.parametrize("method", ["eetq", "bitsandbytes-nf4"])
def test_quantized_model_matches_transformers_on_the_same_weights(llama_dir, tmp_path, method):
    """Loom --quantize (fp32 compute) equals transformers whose weights are Loom's quantize-dequantize of the
    checkpoint: the quantizer is checked above, the model path here."""
    from safetensors.torch import load_file, save_file

    reference = tmp_path / "reference"
    reference.mkdir()
    for f in llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (reference / f.name).write_bytes(f.read_bytes())
    state = load_file(str(llama_dir / "model.safetensors"))
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, w in state.items():
        if any(f".{p}." in name for p in linear) and name.endswith(".weight"):
            state[name] = quantize_weight(w, method).dequantize(w.dtype)
    save_file(state, str(reference / "model.safetensors"))
    hf = hf_model(reference)
    config = ModelConfig.from_dir(llama_dir, "float32", quantize=method)
    assert config.quantize == method
    assert_logits_parity(llama_dir, lengths=(1, 21), chunks=(None, 1), hf=hf, quantize=method)


@pytest.mark.skipif(quant_gemm_cpu.load() is None, reason="needs a CPU with AVX-512 BF16")
def test_bf16_quantize_uses_the_kernel(llama_dir):
    runner = ModelRunner(ModelConfig.from_dir(llama_dir, "bfloat16", quantize="eetq"), num_blocks=4, block_size=16)
    layer = runner.model.model.layers[0].self_attn.qkv_proj
    assert type(layer._packed).__name__ == "QuantizedPackedWeight" and layer._packed.mode == 2  # 8-bit codes, default kernel


def test_refusals(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="not a TGI quantization method"):
        ModelConfig.from_dir(llama_dir, quantize="int3")
    with pytest.raises(ValueError, match="exl2"):
        ModelConfig.from_dir(llama_dir, quantize="exl2")
    with pytest.raises(ValueError, match="is not a gptq checkpoint"):
        ModelConfig.from_dir(llama_dir, quantize="gptq")
    from loom.testing.gguf_files import smollm2_gguf

    if smollm2_gguf() is not None:
        with pytest.raises(ValueError, match=r"already quantized \(gguf\)"):
            ModelConfig.from_dir(smollm2_gguf(), quantize="eetq")
