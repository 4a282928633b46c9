"""One representation for every quantized weight Loom loads: integer codes with a scale (and optionally a min) per
group of consecutive input features.

    w[n, k] = scale[n, g] * value(code[n, k]) + min[n, g]        g = k // group_size

`value` is the code itself, or for 4-bit codes with a `codebook`, codebook[code] (NF4/FP4 tables). GGUF blocks,
GPTQ/AWQ groups and compressed-tensors groups all map onto this exactly: their scales and mins are products of
fp16 numbers and small integers, which fp32 holds without rounding (formats/gguf_blocks.py says per type).

Storage: `codes` is (N, K) with one code per byte: uint8 in [0, 15] for `bits == 4`, int8 for `bits == 8`. The
CPU kernel packs them into its own layout once (kernels/quant_gemm_cpu.py); this class is the exchange format
between loaders, tensor-parallel slicing and the kernels, and `dequantize` is the reference every path is
checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor  # (N, K) uint8 (bits 4) or int8 (bits 8)
    scales: torch.Tensor  # (N, K // group_size) fp32
    mins: torch.Tensor | None  # (N, K // group_size) fp32, or None (symmetric)
    bits: int  # 4 or 8: how the codes are stored
    group_size: int
    codebook: torch.Tensor | None = None  # (16,) fp32 values of the 4-bit codes, None = the codes themselves
    source: str = ""  # what it was read from (e.g. "Q4_K"), for logs

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        if self.bits not in (4, 8):
            raise ValueError(f"quantized codes are stored in 4 or 8 bits, not {self.bits}")
        if self.bits == 4 and self.codes.dtype != torch.uint8 or self.bits == 8 and self.codes.dtype != torch.int8:
            raise ValueError(f"{self.bits}-bit codes must be {'uint8' if self.bits == 4 else 'int8'}")
        if k % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide {k} input features")
        groups = (n, k // self.group_size)
        if tuple(self.scales.shape) != groups or (self.mins is not None and tuple(self.mins.shape) != groups):
            raise ValueError(f"scales/mins must be {groups} for codes {tuple(self.codes.shape)}")
        if self.codebook is not None and (self.bits != 4 or self.codebook.numel() != 16):
            raise ValueError("a codebook holds the 16 values of 4-bit codes")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def integer_values(self) -> bool:
        """Whether every code's value is an integer an int8 holds (so 8-bit storage can take it exactly)."""
        if self.codebook is None:
            return True
        book = self.codebook.to(torch.float32)
        return bool(torch.equal(book, book.round()) and book.min() >= -128 and book.max() <= 127)

    def values(self) -> torch.Tensor:
        """The codes' values in fp32 (codebook applied)."""
        if self.codebook is not None:
            return self.codebook.to(torch.float32)[self.codes.long()]
        return self.codes.to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) weight in fp32 (exact), then cast to `dtype`."""
        g = self.group_size
        w = self.values().unflatten(1, (-1, g)) * self.scales.unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.unsqueeze(-1)
        return w.flatten(1).to(dtype)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """A slice of output rows (dim 0) or of whole groups of input features (dim 1): tensor parallelism."""
        if dim == 0:
            return replace(self, codes=self.codes.narrow(0, start, length), scales=self.scales.narrow(0, start, length),
                           mins=None if self.mins is None else self.mins.narrow(0, start, length))
        g = self.group_size
        if start % g or length % g:
            raise ValueError(f"cannot split input features at {start}+{length}: quantization groups are {g} wide")
        gs, gl = start // g, length // g
        return replace(self, codes=self.codes.narrow(1, start, length), scales=self.scales.narrow(1, gs, gl),
                       mins=None if self.mins is None else self.mins.narrow(1, gs, gl))

    def permute_rows(self, index: torch.Tensor) -> QuantizedTensor:
        return replace(self, codes=self.codes[index], scales=self.scales[index],
                       mins=None if self.mins is None else self.mins[index])

    def regrouped(self, bits: int, group_size: int, with_mins: bool) -> QuantizedTensor:
        """The same weight with wider code storage, smaller groups, or explicit zero mins: exact (a scale is repeated,
        a 4-bit code becomes the same 8-bit code)."""
        out = self
        if group_size != self.group_size:
            if self.group_size % group_size:
                raise ValueError(f"cannot regroup groups of {self.group_size} into groups of {group_size}")
            rep = self.group_size // group_size
            out = replace(out, group_size=group_size, scales=out.scales.repeat_interleave(rep, dim=1),
                          mins=None if out.mins is None else out.mins.repeat_interleave(rep, dim=1))
        if with_mins and out.mins is None:
            out = replace(out, mins=torch.zeros_like(out.scales))
        if bits != out.bits:
            if bits != 8 or not out.integer_values:
                raise ValueError(f"cannot widen {out.bits}-bit codes to {bits} bits")
            out = replace(out, bits=8, codes=out.values().to(torch.int8), codebook=None)
        return out

    @staticmethod
    def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Stack parts along output rows (fused q/k/v, gate/up), first bringing them to one storage: the widest
        codes, the smallest group, mins if any part has them. Exact."""
        if len(parts) == 1:
            return parts[0]
        books = {None if p.codebook is None else tuple(p.codebook.tolist()) for p in parts}
        bits = max(p.bits for p in parts)
        if len(books) > 1:  # e.g. Q4_0 (signed codes) fused with Q4_1: one int8 storage holds both
            if not all(p.integer_values for p in parts):
                raise ValueError("cannot fuse quantized parts with different codebooks")
            bits = 8
        group = min(p.group_size for p in parts)
        with_mins = any(p.mins is not None for p in parts)
        parts = [p.regrouped(bits, group, with_mins) for p in parts]
        return replace(parts[0], codes=torch.cat([p.codes for p in parts]), scales=torch.cat([p.scales for p in parts]),
                       mins=torch.cat([p.mins for p in parts]) if with_mins else None,  # type: ignore[misc]
                       source="+".join(sorted({p.source for p in parts})))
