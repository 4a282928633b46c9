"""Linear layers that know how to shard themselves for tensor parallelism (Megatron-style).

Each parameter carries a `weight_loader(param, weight, shard_id)` that copies its own slice of a checkpoint tensor
(`weight` is a `CheckpointTensor`: only the needed slice is read). With one rank the loaders copy whole tensors and
the forward passes do no communication.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loom.distributed.parallel_state import divide, get_tp_group, kv_head_range
from loom.layers.kernels import bf16_dot_gemm_cpu, bf16_gemm_cpu
from loom.layers.kernels.build import cpu_flags
from loom.layers.lora import LoraDelta, apply_lora
from loom.quantization.cpu_weight import QuantizedPackedWeight, kernel_applies, pack_quantized
from loom.quantization.qtensor import QuantizedTensor

logger = logging.getLogger(__name__)


class CheckpointTensor(Protocol):
    """A tensor in a checkpoint file, read lazily: `narrow` reads only the requested slice."""

    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...

    def full(self) -> torch.Tensor: ...


def copy_checked(dst: torch.Tensor, src: torch.Tensor | QuantizedTensor, what: str) -> None:
    """Copy a checkpoint slice into a parameter; a quantized slice landing in a plain parameter (an embedding, a
    layer without a quantized path) is dequantized."""
    if isinstance(src, QuantizedTensor):
        src = src.dequantize(torch.float32)
    if dst.shape != src.shape:
        raise ValueError(f"Shape mismatch loading {what}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}")
    dst.copy_(src)


def _empty(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    # Uninitialised on purpose: every parameter is overwritten from the checkpoint (the loader checks for misses).
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight re-laid-out once, at load, for the fastest CPU matmul this machine has.

    "onednn": oneDNN's blocked bf16 layout (CPUs with AMX, or AVX-512 BW/VL/DQ or AVX-NE-CONVERT without the
    kernel below): bit-identical to `F.linear`, 1.9x faster at one token per step, 1.4x at 32, ~7% at 256 on the
    bench model (AVX-512 BF16 CPU).
    "avx512_bf16": Loom's `vdpbf16ps` panels for CPUs with AVX-512 BF16 but no AMX (kernels/bf16_dot_gemm_cpu.py),
    where oneDNN's GEMM is slow at decode-sized row counts; fp32 accumulation, not bit-identical to `F.linear`.
    "avx2_bf16": Loom's panels for AVX2+FMA CPUs without bf16 arithmetic (kernels/bf16_gemm_cpu.py), where
    torch's bf16 matmul has no fast path (7x faster at 16 rows, 7x at 256 on the bench model); fp32 accumulation,
    not bit-identical to `F.linear` (the sums run in another order).
    """

    kind: str
    data: torch.Tensor
    out_features: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")
        if self.kind == "avx512_bf16":
            return bf16_dot_gemm_cpu.linear(x, self.data, bias, self.out_features)
        return bf16_gemm_cpu.linear(x, self.data, bias, self.out_features)


def packing_kind(weight: torch.Tensor) -> str | None:
    """Which packed layout suits `weight` on this machine, or None to keep the plain weight (fp32 keeps MKL's
    GEMM; devices other than the CPU use their own libraries). LOOM_DISABLE_PACKED_LINEAR=1 turns packing off
    (benchmark baselines)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2
            or os.environ.get("LOOM_DISABLE_PACKED_LINEAR") == "1"):
        return None
    return cpu_bf16_packing()


@cache
def cpu_bf16_packing() -> str | None:
    """This CPU's bf16 matmul path, from its flags (building the kernel it needs, the first time on a machine).

    AMX: oneDNN's tile kernels beat anything here. AVX-512 BF16 without AMX: Loom's kernel (1.2-1.6x oneDNN at
    decode row counts, on par at prefill sizes; kernels/bf16_dot_gemm_cpu.py). Other CPUs that oneDNN packs bf16
    for: oneDNN. AVX2 + FMA only: Loom's AVX2 kernel."""
    if "amx_bf16" not in cpu_flags() and bf16_dot_gemm_cpu.load() is not None:
        return "avx512_bf16"
    if onednn_packs_bf16():
        return "onednn"
    if bf16_gemm_cpu.load() is not None:
        return "avx2_bf16"
    return None


@cache
def onednn_packs_bf16() -> bool:
    # oneDNN packs bf16 only on CPUs with native bf16 conversions (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and check is not None and bool(check()))


def pack_weight(weight: torch.Tensor, kind: str | None = None) -> PackedWeight:
    kind = kind or packing_kind(weight)
    if kind == "onednn":
        return PackedWeight(kind, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), weight.shape[0])
    if kind == "avx512_bf16":
        return PackedWeight(kind, bf16_dot_gemm_cpu.pack(weight), weight.shape[0])
    if kind == "avx2_bf16":
        return PackedWeight(kind, bf16_gemm_cpu.pack(weight), weight.shape[0])
    raise ValueError(f"no packed layout for a {weight.dtype} weight on {weight.device} here")


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return packed.matmul(x, bias)


class PackableLinear(nn.Module):
    """A linear layer whose weight can be swapped for a packed copy once loading is done (`pack_for_inference`);
    the plain weight is then released, so memory stays that of one copy, unless `keeps_plain_weight` (a tied LM
    head shares it with the token embedding)."""

    weight: nn.Parameter
    keeps_plain_weight = False
    _packed: PackedWeight | QuantizedPackedWeight | None = None
    _weight_shape: tuple[int, int] | None = None  # (out, in) of the weight once packing has released it
    _quant_parts: dict[int, QuantizedTensor] | None = None  # row offset → quantized slice, until finalized
    lora: dict[int, list[LoraDelta]] | None = None  # LoRA adapters' updates of this layer (layers/lora.py)

    def place(self, param: nn.Parameter, row: int, src: torch.Tensor | QuantizedTensor, what: str) -> None:
        """Put a checkpoint slice at output row `row` of `param`: copied, or for a quantized slice of the weight
        kept quantized until `finalize_quantized` (parts of a fused layer may arrive in any order)."""
        dst = param.data.narrow(0, row, src.shape[0]) if param.dim() else param.data
        if isinstance(src, QuantizedTensor) and param is self.weight:
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"Shape mismatch loading {what}: checkpoint {tuple(src.shape)}, model "
                                 f"{tuple(dst.shape)}")
            if self._quant_parts is None:
                self._quant_parts = {}
            self._quant_parts[row] = src
            return
        copy_checked(dst, src, what)

    def finalize_quantized(self) -> str | None:
        """Once loaded: a quantized weight becomes the CPU kernel's packed weight when it applies (bf16 compute on
        an AVX-512 BF16 CPU), else it is dequantized into the plain weight. Returns the source format, or None
        when the weight was not quantized."""
        parts, self._quant_parts = self._quant_parts, None
        if not parts:
            return None
        qt = QuantizedTensor.cat_rows([parts[row] for row in sorted(parts)])
        if qt.shape != tuple(self.weight.shape):
            raise ValueError(f"quantized weight parts cover {qt.shape}, the layer is {tuple(self.weight.shape)}")
        if kernel_applies(qt, self.weight.dtype, self.weight.device) and not self.keeps_plain_weight:
            self._weight_shape = tuple(self.weight.shape)
            self._packed = pack_quantized(qt)
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        else:
            self.weight.data.copy_(qt.dequantize(torch.float32))
        return qt.source

    @property
    def features(self) -> tuple[int, int]:
        """(in_features, out_features) of this rank's weight, packed or not."""
        out_features, in_features = self._weight_shape or tuple(self.weight.shape)
        return in_features, out_features

    def pack_for_inference(self) -> bool:
        kind = None if self._packed is not None else packing_kind(self.weight)
        if kind is None:
            return False
        self._weight_shape = tuple(self.weight.shape)
        self._packed = pack_weight(self.weight, kind)
        if not self.keeps_plain_weight:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)  # loaded already: drop it
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._packed is not None:
            return self._packed.matmul(x, bias)
        return F.linear(x, self.weight, bias)


def quantize_linear_weights(model: nn.Module, method: str) -> int:
    """`--quantize` on the fly: every linear layer's loaded weight becomes quantized parts (not the LM head, whose
    logits TGI keeps in the compute dtype too). Returns how many layers."""
    from loom.quantization.methods import quantize_weight

    count = 0
    for module in model.modules():
        if type(module).__name__ == "ParallelLMHead" or not isinstance(module, PackableLinear):
            continue
        if module._quant_parts or module._packed is not None or module.weight.dim() != 2:
            continue
        module._quant_parts = {0: quantize_weight(module.weight.data, method)}
        count += 1
    return count


def finalize_quantized_weights(model: nn.Module) -> dict[str, int]:
    """Finalize every quantized linear layer of a loaded model; returns how many layers came from each format.
    Logs once when the weights had to be dequantized (no kernel for this CPU or dtype)."""
    formats: dict[str, int] = {}
    dequantized = 0
    for module in model.modules():
        if isinstance(module, PackableLinear):
            source = module.finalize_quantized()
            if source is not None:
                formats[source] = formats.get(source, 0) + 1
                dequantized += not isinstance(module._packed, QuantizedPackedWeight)
    if dequantized:
        logger.warning("%d quantized linear layers were dequantized at load (no quantized kernel for this CPU "
                       "and dtype): weight memory and speed are those of the compute dtype", dequantized)
    return formats


def pack_linear_weights(model: nn.Module) -> int:
    """Pack every packable linear layer (and LM head) of a loaded model; returns how many were packed."""
    return sum(m.pack_for_inference() for m in model.modules() if isinstance(m, PackableLinear))


class ReplicatedLinear(PackableLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _empty(out_features, in_features)
        self.weight.weight_loader = self._load_weight
        self.bias = _empty(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load_full

    @staticmethod
    def _load_full(param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        copy_checked(param.data, weight.full(), "replicated weight")

    def _load_weight(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        self.place(param, 0, weight.full(), "replicated weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_lora(self.lora, x, self.matmul(x, self.bias))


class ColumnParallelLinear(PackableLinear):
    """y = x Wᵀ with W split by output rows: each rank produces its slice of the output features.

    `output_sizes` lists the logical sub-matrices fused into this one (e.g. gate and up); each is split across
    ranks separately so rank r holds [gate_r; up_r]. `local_sizes` overrides the even split (replicated parts).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 local_sizes: list[int] | None = None):
        super().__init__()
        tp = get_tp_group()
        self.tp = tp
        self.output_sizes = output_sizes
        self.local_sizes = local_sizes or [divide(s, tp.size, "output features") for s in output_sizes]
        local_out = sum(self.local_sizes)
        self.weight = _empty(local_out, in_features)
        self.bias = _empty(local_out) if bias else None
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.load_shard
                param.num_shards = len(output_sizes)  # the loader checks every part arrived

    def _shard_offset(self, shard_id: int) -> int:
        return sum(self.local_sizes[:shard_id])

    def _part_start(self, shard_id: int) -> int:
        """First row of this rank's slice within logical part `shard_id`."""
        return self.tp.rank * self.local_sizes[shard_id]

    def load_shard(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: int | None = None) -> None:
        idx = 0 if shard_id is None else shard_id
        if shard_id is None and len(self.output_sizes) > 1:
            # An already-fused checkpoint tensor (e.g. Phi-3's gate_up_proj): load each part in turn.
            for i, size in enumerate(self.output_sizes):
                start = sum(self.output_sizes[:i]) + self._part_start(i)
                part = weight.narrow(0, start, self.local_sizes[i])
                self.place(param, self._shard_offset(i), part, "fused shard")
            return
        local = self.local_sizes[idx]
        src = weight.narrow(0, self._part_start(idx), local)
        self.place(param, self._shard_offset(idx), src, f"column shard {idx}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_lora(self.lora, x, self.matmul(x, self.bias))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k and v projections; shard ids "q", "k", "v". Query heads are split across ranks; key/value heads
    too, or, with more ranks than key/value heads, each rank keeps the one its query heads read
    (`parallel_state.kv_head_range`)."""

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_tp_group()
        local_heads = divide(num_heads, tp.size, "attention heads")
        kv_start, local_kv_heads = kv_head_range(num_kv_heads, tp)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias,
                         local_sizes=[local_heads * head_dim, local_kv_heads * head_dim, local_kv_heads * head_dim])
        self.head_dim, self.kv_start = head_dim, kv_start
        self.num_heads, self.num_kv_heads = local_heads, local_kv_heads  # this rank's
        self.q_size, self.kv_size = self.local_sizes[0], self.local_sizes[1]

    def _part_start(self, shard_id: int) -> int:
        return super()._part_start(0) if shard_id == 0 else self.kv_start * self.head_dim

    def load_shard(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: str | int | None = None) -> None:
        super().load_shard(param, weight, self.SHARDS.get(shard_id, shard_id))  # type: ignore[arg-type]


class RowParallelLinear(PackableLinear):
    """y = x Wᵀ + b with W split by input columns: each rank computes a partial sum, then all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.tp = get_tp_group()
        self.local_in = divide(in_features, self.tp.size, "input features")
        self.weight = _empty(out_features, self.local_in)
        self.weight.weight_loader = self._load_weight
        self.bias = _empty(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias

    def _load_bias(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        copy_checked(param.data, weight.full(), "row-parallel bias")

    def _load_weight(self, param: nn.Parameter, weight: CheckpointTensor, shard_id: object = None) -> None:
        self.place(param, 0, weight.narrow(1, self.tp.rank * self.local_in, self.local_in), "row shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_lora(self.lora, x, self.matmul(x))  # LoRA runs with one rank only: before the all-reduce is fine
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
