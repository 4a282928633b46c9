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
    table: torch.Tensor  # 32 bf16 words: value of each 4-bit code
    bits: int
    group_size: int
    out_features: int
    source: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module = quant_gemm_cpu.load()
        assert module is not None
        return module.linear(x, self.codes, self.scales, self.mins, self.table, bias, self.bits, self.group_size,
                             self.out_features)


def code_table(qt: QuantizedTensor) -> torch.Tensor | None:
    """bf16 words of the 16 code values (32 entries for the kernel's permute), or None when bf16 cannot hold them."""
    values = qt.codebook.to(torch.float32) if qt.codebook is not None else torch.arange(16, dtype=torch.float32)
    as_bf16 = values.to(torch.bfloat16)
    if not torch.equal(as_bf16.to(torch.float32), values):
        return None
    table = torch.zeros(32, dtype=torch.bfloat16)
    table[:16] = as_bf16
    return table.view(torch.int16)


def kernel_applies(qt: QuantizedTensor, dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and qt.group_size % 4 == 0
            and quant_gemm_cpu.load() is not None and code_table(qt) is not None)


def pack_quantized(qt: QuantizedTensor) -> QuantizedPackedWeight:
    module = quant_gemm_cpu.load()
    table = code_table(qt)
    assert module is not None and table is not None
    return QuantizedPackedWeight(
        codes=module.pack_codes(qt.codes, qt.bits), scales=module.pack_groups(qt.scales),
        mins=None if qt.mins is None else module.pack_groups(qt.mins), table=table, bits=qt.bits,
        group_size=qt.group_size, out_features=qt.shape[0], source=qt.source)
