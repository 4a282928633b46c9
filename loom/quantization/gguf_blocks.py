"""GGUF (ggml) quantized blocks → `QuantizedTensor`, exactly: codes, and per-group scales/mins as fp32 products.

Block layouts are ggml's (ggml-common.h; llama.cpp's `dequantize_row_*`). Each type maps to groups as follows:

| type | block | groups | codes | scale · value + min |
|---|---|---|---|---|
| Q8_0 | 32: d, 32 × int8 | 32 | int8 q | d · q |
| Q4_0 | 32: d, 16 bytes of nibbles | 32 | 4-bit q, valued q − 8 | d · (q − 8) |
| Q4_1 | 32: d, m, nibbles | 32 | 4-bit q | d · q + m |
| Q5_0 | 32: d, 32 high bits, nibbles | 32 | int8 q − 16 | d · (q − 16) |
| Q5_1 | 32: d, m, high bits, nibbles | 32 | int8 q | d · q + m |
| Q4_K | 256: d, dmin, 12 bytes of 6-bit scales/mins, nibbles | 32 | 4-bit q | (d·sc) · q − dmin·m |
| Q5_K | 256: d, dmin, scales/mins, high bits, nibbles | 32 | int8 q | (d·sc) · q − dmin·m |
| Q6_K | 256: low nibbles, 2 high bits, 16 int8 scales, d | 16 | int8 q − 32 | (d·sc) · (q − 32) |

d, m, dmin are fp16, sc and m small integers, so every product is exact in fp32. Other types are dequantized by
the `gguf` package at load (with a warning) rather than repacked.
"""

from __future__ import annotations

import numpy as np
import torch

from loom.quantization.qtensor import QuantizedTensor

QK = 32  # elements per block of the legacy types
QK_K = 256  # elements per super-block of the k-quants
# bytes per block
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_SIZE = {"Q8_0": QK, "Q4_0": QK, "Q4_1": QK, "Q5_0": QK, "Q5_1": QK, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
REPACKED_TYPES = frozenset(BLOCK_BYTES)
SIGNED_NIBBLE = torch.arange(16, dtype=torch.float32) - 8  # Q4_0's code values: q − 8, no min needed


def _f16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 → (...) fp32 of the little-endian fp16 they hold."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes → (..., 32) codes: ggml puts element j in the low nibble of byte j, element j+16 in its high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(..., 4) bytes holding a 32-bit mask → (..., 32) bits, bit j for element j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes → 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes → 256 low-nibble codes: each 32-byte run holds elements [64i, 64i+32) in its low
    nibbles and [64i+32, 64i+64) in its high ones."""
    runs = qs.reshape(qs.shape[:-1] + (4, 32))
    return np.concatenate([runs & 0x0F, runs >> 4], axis=-1).reshape(qs.shape[:-1] + (256,))


def decode(type_name: str, raw: np.ndarray, rows: int, cols: int) -> QuantizedTensor:
    """Blocks of a (rows, cols) tensor (raw bytes, any shape holding rows × blocks × block bytes) → codes/scales."""
    nb = cols // BLOCK_SIZE[type_name]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, nb, BLOCK_BYTES[type_name])
    mins: np.ndarray | None = None
    if type_name == "Q8_0":
        scales, codes, bits, group = _f16(b[..., 0:2]), b[..., 2:].view(np.int8), 8, QK
    elif type_name in ("Q4_0", "Q4_1"):
        scales = _f16(b[..., 0:2])
        off = 4 if type_name == "Q4_1" else 2
        codes, bits, group = _nibbles(b[..., off:]), 4, QK
        mins = _f16(b[..., 2:4]) if type_name == "Q4_1" else None
    elif type_name in ("Q5_0", "Q5_1"):
        scales = _f16(b[..., 0:2])
        off = 4 if type_name == "Q5_1" else 2
        q = _nibbles(b[..., off + 4:]) | (_high_bits(b[..., off:off + 4]) << 4)
        if type_name == "Q5_1":
            codes, mins = q.astype(np.int8), _f16(b[..., 2:4])
        else:
            codes = (q.astype(np.int16) - 16).astype(np.int8)
        bits, group = 8, QK
    elif type_name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales_mins(b[..., 4:16])
        scales = d[..., None] * sc  # (rows, nb, 8): exact (fp16 × 6-bit integer)
        mins = -(dmin[..., None] * mn)
        if type_name == "Q4_K":
            codes, bits = _k_nibbles(b[..., 16:144]), 4
        else:
            qh = b[..., 16:48]  # bit i of byte l: element 32i + l gets 16
            high = np.unpackbits(qh[..., None, :], axis=-2, count=8, bitorder="little")  # (rows, nb, 8, 32)
            codes, bits = (_k_nibbles(b[..., 48:176]) | (high.reshape(rows, nb, 256) << 4)).astype(np.int8), 8
        group = 32
    elif type_name == "Q6_K":
        ql, qh, sc, d = b[..., 0:128], b[..., 128:192], b[..., 192:208].view(np.int8), _f16(b[..., 208:210])
        # Two halves of 128 elements; in each, 32 bytes of qh give the top 2 bits of four runs of 32.
        ql = ql.reshape(rows, nb, 2, 64)
        qh = qh.reshape(rows, nb, 2, 32)
        low = np.concatenate([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], -1)
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        q = (low | (high << 4)).reshape(rows, nb, 256)
        codes, bits, group = (q.astype(np.int16) - 32).astype(np.int8), 8, 16
        scales = d[..., None] * sc.astype(np.float32)  # (rows, nb, 16)
    else:
        raise ValueError(f"GGUF type {type_name} is not repacked (dequantize it instead)")
    codes_t = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols))
    if bits == 4:
        codes_t = codes_t.to(torch.uint8)
    return QuantizedTensor(
        codes=codes_t, codebook=SIGNED_NIBBLE if type_name == "Q4_0" else None,
        scales=torch.from_numpy(np.ascontiguousarray(scales, np.float32).reshape(rows, -1)),
        mins=None if mins is None else torch.from_numpy(np.ascontiguousarray(mins, np.float32).reshape(rows, -1)),
        bits=bits, group_size=group, source=type_name)
