"""GGUF block decoding against the `gguf` package's own dequantizer (ggml's reference, not Loom's code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from loom.quantization import gguf_blocks
from loom.quantization.qtensor import QuantizedTensor

QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the gguf package quantizes these itself
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]  # it only dequantizes these: random blocks with sane fp16 scales


def _random_k_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    nb = cols // 256
    raw = rng.integers(0, 256, size=(rows, nb, gguf_blocks.BLOCK_BYTES[type_name]), dtype=np.uint8)
    # fp16 super-block scales at ggml's offsets: d, dmin first (Q4_K/Q5_K); d last (Q6_K)
    offsets = [208] if type_name == "Q6_K" else [0, 2]
    for off in offsets:
        raw[..., off:off + 2] = (rng.uniform(1e-4, 2e-3, size=(rows, nb)).astype(np.float16)
                                 .view(np.uint8).reshape(rows, nb, 2))
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", QUANTIZABLE + K_QUANTS)
def test_decode_matches_ggml_dequantize(type_name):
    rng = np.random.default_rng(0)
    rows, cols = 24, 512
    qtype = GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        raw = quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    else:
        raw = _random_k_blocks(type_name, rows, cols, rng)
    reference = torch.from_numpy(quants.dequantize(raw, qtype).astype(np.float32))
    qt = gguf_blocks.decode(type_name, raw, rows, cols)
    assert qt.shape == (rows, cols)
    torch.testing.assert_close(qt.dequantize(), reference, rtol=1e-6, atol=1e-7)
    # the storage is what the format promises: 4-bit for 4-bit types, int8 otherwise, ggml's group size
    assert qt.bits == (4 if type_name in ("Q4_0", "Q4_1", "Q4_K") else 8)
    assert qt.group_size == {"Q6_K": 16}.get(type_name, 32)


def test_fusing_parts_of_different_types_is_exact():
    rng = np.random.default_rng(1)
    parts = []
    for type_name in ("Q4_K", "Q6_K", "Q4_0", "Q8_0"):
        raw = (_random_k_blocks(type_name, 16, 256, rng) if type_name in K_QUANTS
               else quants.quantize(rng.standard_normal((16, 256)).astype(np.float32), GGMLQuantizationType[type_name]))
        parts.append(gguf_blocks.decode(type_name, raw, 16, 256))
    fused = QuantizedTensor.cat_rows(parts)
    assert (fused.bits, fused.group_size) == (8, 16)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=1e-6, atol=1e-7)


def test_slices_follow_groups():
    rng = np.random.default_rng(2)
    raw = quants.quantize(rng.standard_normal((32, 128)).astype(np.float32), GGMLQuantizationType.Q4_1)
    qt = gguf_blocks.decode("Q4_1", raw, 32, 128)
    full = qt.dequantize()
    torch.testing.assert_close(qt.narrow(0, 8, 16).dequantize(), full[8:24])
    torch.testing.assert_close(qt.narrow(1, 64, 64).dequantize(), full[:, 64:])
    with pytest.raises(ValueError, match="groups are 32 wide"):
        qt.narrow(1, 16, 64)
