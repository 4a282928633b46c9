"""A linear layer's quantized weight packed for a CPU kernel: by default kernels/quant_gemm_cpu.py (AVX-512 BF16:
the exact weight times bf16 activations, the numerics of a bf16 model); with LOOM_QUANT_KERNEL=vnni, integer-valued
codes (GGUF, GPTQ, AWQ, compressed-tensors, int8) on AVX-512 VNNI CPUs go to kernels/quant_vnni_gemm_cpu.py (int8
activations, as llama.cpp: faster from 4 rows up, less exact). Where neither applies the layer dequantizes at
load."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from loom.layers.kernels import quant_gemm_cpu, quant_vnni_gemm_cpu
from loom.quantization.qtensor import QuantizedTensor


VNNI_4, VNNI_8 = 10, 11
_FEATURES_PER_PANEL, _PANELS_PER_STREAM = 16, 4  # the kernels' NR and PG


@dataclass(frozen=True)
class QuantizedPackedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    table: torch.Tensor  # 32 bf16 words: value of each 4-bit code (code-book mode)
    mode: int  # bf16 kernel: 0 affine 4-bit (value = code − (offset − 128)), 1 4-bit code book, 2 8-bit;
    # VNNI kernel: VNNI_4 / VNNI_8 (value = stored code − offset)
    offset: float
    group_size: int
    out_features: int
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.mode == VNNI_4 or self.mode == VNNI_8:
            vnni = quant_vnni_gemm_cpu.load()
            assert vnni is not None
            return vnni.linear(x, self.codes, self.scales, self.mins, bias, 4 if self.mode == VNNI_4 else 8,
                               int(self.offset), self.group_size, self.out_features)
        module = quant_gemm_cpu.load()
        assert module is not None
        return module.linear(x, self.codes, self.scales, self.mins, self.table, bias, self.mode, self.offset,
                             self.group_size, self.out_features)


def code_table(qt: QuantizedTensor) -> torch.Tensor | None:
    """bf16 words of the 16 code values (32 entries for the kernel's permute), or None when bf16 cannot hold them."""
    values = qt.codebook.to(torch.float32) if qt.codebook is not None else torch.arange(16, dtype=torch.float32)
    as_bf16 = values.to(torch.bfloat16)
    if not torch.equal(as_bf16.to(torch.float32), values):
        return None
    table = torch.zeros(32, dtype=torch.bfloat16)
    table[:16] = as_bf16
    return table.view(torch.int16)


def affine_offset(qt: QuantizedTensor) -> int | None:
    """z when every 4-bit code's value is code − z (no code book: 0; Q4_0's signed nibbles: 8), else None."""
    if qt.codebook is None:
        return 0
    book = qt.codebook.to(torch.float32)
    z = -book[0].item()
    return int(z) if float(z).is_integer() and torch.equal(book, torch.arange(16, dtype=torch.float32) - z) else None


def pack_groups(values: torch.Tensor, half: bool) -> torch.Tensor:
    """Per-group scales or mins (N, G) → both kernels' layout (ceil(P/4), G, 4, 16) for P panels of 16 features,
    zero padded; fp16 when every value is exactly an fp16 (GGUF's d and m), else fp32."""
    n, groups = values.shape
    panel_groups = -(-n // (_PANELS_PER_STREAM * _FEATURES_PER_PANEL))
    padded = torch.zeros(panel_groups * _PANELS_PER_STREAM * _FEATURES_PER_PANEL, groups, dtype=torch.float32)
    padded[:n] = values.to(torch.float32)
    out = padded.view(panel_groups, _PANELS_PER_STREAM, _FEATURES_PER_PANEL, groups).permute(0, 3, 1, 2).contiguous()
    return out.to(torch.float16) if half else out


def _fits_fp16(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.equal(t.to(torch.float16).to(torch.float32), t.to(torch.float32)))


def _vnni_applies(qt: QuantizedTensor) -> bool:
    """Opted in (LOOM_QUANT_KERNEL=vnni), integer-valued codes (no code book, or an affine one), AVX-512 VNNI.

    Not the default: its int8 activations, though within 0.5% in perplexity, change greedy choices the exact
    path makes (SmolLM2 Q4_1 answers "What is the capital of France?" in French instead of "...is Paris.")."""
    integer = qt.bits == 8 or affine_offset(qt) is not None
    return (integer and qt.group_size % (8 if qt.bits == 4 else 4) == 0
            and os.environ.get("LOOM_QUANT_KERNEL") == "vnni" and quant_vnni_gemm_cpu.load() is not None)


def _bf16_applies(qt: QuantizedTensor) -> bool:
    return qt.group_size % 4 == 0 and quant_gemm_cpu.load() is not None and code_table(qt) is not None


def kernel_applies(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and (_vnni_applies(qt) or _bf16_applies(qt))


def pack_quantized(qt: QuantizedTensor) -> QuantizedPackedWeight:
    """Codes in the kernel's interleaved layout; scales and mins in fp16 when they are exactly fp16 numbers (GGUF's
    d and m, GPTQ/AWQ scales): a fifth fewer bytes per 4-bit weight than fp32."""
    half = _fits_fp16(qt.scales) and _fits_fp16(qt.mins)
    if _vnni_applies(qt):
        vnni = quant_vnni_gemm_cpu.load()
        assert vnni is not None
        return QuantizedPackedWeight(
            codes=vnni.pack_codes(qt.codes, qt.bits), scales=pack_groups(qt.scales, half),
            mins=None if qt.mins is None else pack_groups(qt.mins, half), table=torch.zeros(32, dtype=torch.int16),
            mode=VNNI_4 if qt.bits == 4 else VNNI_8, offset=float(affine_offset(qt) if qt.bits == 4 else 128),
            group_size=qt.group_size, out_features=qt.shape[0], source=qt.source)
    module = quant_gemm_cpu.load()
    table = code_table(qt)
    assert module is not None and table is not None
    z = affine_offset(qt) if qt.bits == 4 else None
    mode = 2 if qt.bits == 8 else (0 if z is not None else 1)
    return QuantizedPackedWeight(
        codes=module.pack_codes(qt.codes, qt.bits), scales=pack_groups(qt.scales, half),
        mins=None if qt.mins is None else pack_groups(qt.mins, half), table=table, mode=mode,
        offset=128.0 + (z or 0), group_size=qt.group_size, out_features=qt.shape[0], source=qt.source)
