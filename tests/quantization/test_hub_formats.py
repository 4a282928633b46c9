"""GPTQ, AWQ and compressed-tensors checkpoints written by reference packers (from each format's specification,
not Loom's reader), served by Loom and checked against transformers running the dequantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.config import ModelConfig
from loom.quantization.hub_formats import QuantizedCheckpointError
from loom.testing.parity import assert_logits_parity, hf_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) unsigned → (R / (32/bits), C) int32, consecutive rows in one word, first in the low bits."""
    per = 32 // bits
    v = values.to(torch.int64).view(-1, per, values.shape[1])
    word = sum(v[:, i] << (bits * i) for i in range(per))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # as int32 (two's complement)


def _pack_cols(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    per = 32 // bits
    v = values.to(torch.int64).view(values.shape[0], -1, per)
    order = order or list(range(per))
    word = sum(v[:, :, order[i]] << (bits * i) for i in range(per))
    return (word - ((word >> 31) << 32)).to(torch.int32)


def _quantize(w: torch.Tensor, bits: int, group: int, gen: torch.Generator):
    """Asymmetric min-max quantization: codes (N, K), scales fp16 (N, G), integer zeros (N, G)."""
    n, k = w.shape
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-6).half()
    zero = torch.round(-lo / scale.float()).clamp(0, qmax)
    q = torch.round(g / scale.float().unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, qmax).to(torch.int64)
    return q.view(n, k), scale, zero.to(torch.int64)


def _dequant(q, scale, zero, group):
    n, k = q.shape
    return ((q.view(n, k // group, group) - zero.unsqueeze(-1)) * scale.float().unsqueeze(-1)).view(n, k)


def _write(src: Path, out: Path, method: str, bits: int, group: int) -> Path:
    """A quantized copy of `src` at `out`, and its dequantized twin at `out`-reference for transformers."""
    ref = out.with_name(out.name + "-reference")
    for d in (out, ref):
        shutil.copytree(src, d)
    state = load_file(str(src / "model.safetensors"))
    packed, plain = {}, {}
    gen = torch.Generator().manual_seed(0)
    for name, w in state.items():
        prefix = name.removesuffix(".weight")
        if not (name.endswith(".weight") and any(f".{p}." in name for p in LINEAR)):
            packed[name] = plain[name] = w
            continue
        q, scale, zero = _quantize(w.float(), bits, group, gen)
        if method == "ct-int8":  # compressed-tensors int-quantized: symmetric int8 per channel
            s = (w.float().abs().amax(1, keepdim=True) / 127).half()
            qi = torch.round(w.float() / s.float()).clamp(-127, 127).to(torch.int8)
            packed[f"{prefix}.weight"], packed[f"{prefix}.weight_scale"] = qi, s
            plain[name] = (qi.float() * s.float()).to(w.dtype)
            continue
        plain[name] = _dequant(q, scale, zero, group).to(w.dtype)
        if method == "gptq":
            packed[f"{prefix}.qweight"] = _pack_rows(q.t(), bits)  # (K/8, N)
            packed[f"{prefix}.qzeros"] = _pack_cols(zero.t() - 1, bits)  # v1 stores zero - 1
            packed[f"{prefix}.scales"] = scale.t().contiguous()
            packed[f"{prefix}.g_idx"] = (torch.arange(w.shape[1]) // group).to(torch.int32)
        elif method == "awq":
            packed[f"{prefix}.qweight"] = _pack_cols(q.t(), 4, AWQ_PACK_ORDER)  # (K, N/8)
            packed[f"{prefix}.qzeros"] = _pack_cols(zero.t(), 4, AWQ_PACK_ORDER)
            packed[f"{prefix}.scales"] = scale.t().contiguous()
        else:  # compressed-tensors pack-quantized, asymmetric: stored values offset by 8, zero point signed
            offset = 1 << (bits - 1)
            packed[f"{prefix}.weight_packed"] = _pack_cols(q, bits)  # (N, K/8): q - zp = (q - 8) - (zp - 8)
            packed[f"{prefix}.weight_scale"] = scale
            packed[f"{prefix}.weight_zero_point"] = (zero - offset).to(torch.int8)
            packed[f"{prefix}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
            # the reader adds the offset back to both: (q_signed + 8) - (zp + 8) = q - zero
    save_file({k: v.contiguous() for k, v in packed.items()}, str(out / "model.safetensors"))
    save_file(plain, str(ref / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": False,
              "checkpoint_format": "gptq"}
    elif method == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm", "zero_point": True}
    else:
        weights = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"} if method == "ct-int8"
                   else {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                         "group_size": group})
        qc = {"quant_method": "compressed-tensors",
              "format": "int-quantized" if method == "ct-int8" else "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    return ref


@pytest.mark.parametrize("method,bits,group", [("gptq", 4, 32), ("gptq", 8, 64), ("awq", 4, 32),
                                               ("compressed-tensors", 4, 32), ("ct-int8", 8, 64)])
def test_quantized_checkpoint_matches_transformers_on_dequantized_weights(llama_dir, tmp_path, method, bits, group):
    out = tmp_path / method
    ref = _write(llama_dir, out, method, bits, group)
    assert_logits_parity(out, lengths=(1, 21), chunks=(None, 1), hf=hf_model(ref))


def test_act_order_gptq_is_refused(llama_dir, tmp_path):
    out = tmp_path / "gptq"
    _write(llama_dir, out, "gptq", 4, 32)
    state = load_file(str(out / "model.safetensors"))
    for name in [n for n in state if n.endswith("g_idx")]:
        state[name] = torch.flip(state[name], [0]).contiguous()
    save_file(state, str(out / "model.safetensors"))
    from loom.worker.runner import ModelRunner

    with pytest.raises(QuantizedCheckpointError, match="act-order"):
        ModelRunner(ModelConfig.from_dir(out, "float32"), num_blocks=4, block_size=16)


def test_unsupported_quantization_config_is_refused_at_config_time(llama_dir, tmp_path):
    out = tmp_path / "hqq"
    shutil.copytree(llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="'hqq' is not supported"):
        ModelConfig.from_dir(out)
