"""A linear layer's quantized weight packed for the CPU kernel (kernels/quant_gemm_cpu.py), or None where the
kernel does not apply (no AVX-512 BF16, a codebook bf16 cannot hold): the layer then dequantizes at load."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.layers.kernels import quant_gemm_cpu
from loom.quantization.qtensor import QuantizedTensor


@dataclass(frozen=True)
class QuantizedPackedWeight:
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    table: torch.Tensor  # 32 bf16 words: value of each 4-bit code (code-book mode)
    mode: int  # 0: affine 4-bit (value = code − (offset − 128)), 1: 4-bit code book, 2: 8-bit
    offset: float
    group_size: int
    out_features: int
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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


def _fits_fp16(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.equal(t.to(torch.float16).to(torch.float32), t.to(torch.float32)))


def kernel_applies(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and qt.group_size % 4 == 0
            and quant_gemm_cpu.load() is not None and code_table(qt) is not None)


def pack_quantized(qt: QuantizedTensor) -> QuantizedPackedWeight:
    """Codes in the kernel's interleaved layout; scales and mins in fp16 when they are exactly fp16 numbers (GGUF's
    d and m, GPTQ/AWQ scales): a fifth fewer bytes per 4-bit weight than fp32."""
    module = quant_gemm_cpu.load()
    table = code_table(qt)
    assert module is not None and table is not None
    z = affine_offset(qt) if qt.bits == 4 else None
    mode = 2 if qt.bits == 8 else (0 if z is not None else 1)
    half = _fits_fp16(qt.scales) and _fits_fp16(qt.mins)
    return QuantizedPackedWeight(
        codes=module.pack_codes(qt.codes, qt.bits), scales=module.pack_groups(qt.scales, half),
        mins=None if qt.mins is None else module.pack_groups(qt.mins, half), table=table, mode=mode,
        offset=128.0 + (z or 0), group_size=qt.group_size, out_features=qt.shape[0], source=qt.source)
