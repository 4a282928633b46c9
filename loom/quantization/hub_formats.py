"""Pre-quantized Hugging Face checkpoints: GPTQ, AWQ and compressed-tensors, read into `QuantizedTensor`s exactly.

The format comes from `quantization_config` in config.json (as TGI detects it). Each quantized linear layer is
stored as several tensors under its prefix; `group_quantized_tensors` gathers them and yields one
`<prefix>.weight` whose slices are `QuantizedTensor`s, so the model's loaders and tensor-parallel slicing treat
it like any weight.

| format | tensors | weight |
|---|---|---|
| GPTQ (`checkpoint_format` gptq) | qweight int32 (K/8, N), 4-bit packed along K; qzeros int32 (G, N/8); scales (G, N); g_idx | scale · (q − (z + 1)) |
| GPTQ v2 | same | scale · (q − z) |
| AWQ (gemm) | qweight int32 (K, N/8), packed along N in the order 0 2 4 6 1 3 5 7; qzeros likewise; scales (G, N) | scale · (q − z) |
| compressed-tensors `pack-quantized` | weight_packed int32 (N, K·bits/32), packed along K, values offset by 2^(bits−1); weight_scale (N, G); weight_zero_point (N, G) if asymmetric | scale · (q − zp) |
| compressed-tensors `int-quantized` (w8a8) | weight int8 (N, K); weight_scale (N, 1) | scale · q, activations kept bf16 |

Every scale is fp16/bf16 and every zero a small integer, so scale · zero is exact in fp32: the stored weight is the
checkpoint's, never rounded again. Refused clearly: GPTQ with act-order (`desc_act` with a non-trivial g_idx),
bit widths other than 4 and 8, and compressed-tensors schemes other than the two above.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loom.quantization.qtensor import QuantizedTensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8
_PARTS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight"),
}
_REQUIRED = {"gptq": {"qweight", "qzeros", "scales"}, "awq": {"qweight", "qzeros", "scales"}}


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint Loom cannot serve exactly: says what and what would work."""


@dataclass(frozen=True)
class Scheme:
    method: str  # gptq | awq | compressed-tensors
    bits: int
    group_size: int  # -1 = per output channel
    zero_plus_one: bool = False  # GPTQ v1 stores zeros minus one
    symmetric: bool = True
    ct_format: str = ""  # compressed-tensors: pack-quantized | int-quantized


def scheme_of(hf_config: dict[str, Any]) -> Scheme | None:
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method in ("gptq", "awq"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if bits not in (4, 8) or (method == "awq" and bits != 4):
            raise QuantizedCheckpointError(f"{method} with {bits}-bit weights is not supported (4-bit GPTQ/AWQ, "
                                           "8-bit GPTQ are)")
        if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
            raise QuantizedCheckpointError(f"AWQ version {qc.get('version')!r} is not supported (gemm is)")
        v1 = method == "gptq" and str(qc.get("checkpoint_format", "gptq")) == "gptq"
        return Scheme(method, bits, group, zero_plus_one=v1, symmetric=bool(qc.get("sym", True)))
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(qc)
    raise QuantizedCheckpointError(f"quantization method {method!r} is not supported; Loom reads GPTQ, AWQ, "
                                   "compressed-tensors (pack-quantized, int-quantized) and GGUF")


def _compressed_tensors_scheme(qc: dict[str, Any]) -> Scheme:
    fmt = qc.get("format")
    groups = list((qc.get("config_groups") or {}).values())
    if fmt not in ("pack-quantized", "int-quantized") or len(groups) != 1:
        raise QuantizedCheckpointError(f"compressed-tensors format {fmt!r} with {len(groups)} config groups is "
                                       "not supported (one group, pack-quantized or int-quantized)")
    weights = groups[0].get("weights") or {}
    bits = int(weights.get("num_bits", 8))
    strategy = weights.get("strategy", "channel")
    if bits not in (4, 8) or weights.get("type", "int") != "int" or strategy not in ("channel", "group"):
        raise QuantizedCheckpointError(f"compressed-tensors {bits}-bit {weights.get('type')} weights with strategy "
                                       f"{strategy!r} are not supported (int4/int8, per channel or group)")
    group = int(weights.get("group_size") or -1) if strategy == "group" else -1
    return Scheme("compressed-tensors", bits, group, symmetric=bool(weights.get("symmetric", True)), ct_format=fmt)


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 words → unsigned values, `32 / bits` per word along `dim` (value i at bit i·bits, or at the slot
    `order` gives it)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    words = packed.to(torch.int32).unsqueeze(-1)
    if dim == 0:
        words = packed.to(torch.int32).t().unsqueeze(-1)
    values = (words >> shifts) & ((1 << bits) - 1)  # (..., words, per): value i of each word
    if order is not None:
        values = values[..., torch.argsort(torch.tensor(order))]
    values = values.flatten(-2)
    return values.t() if dim == 0 else values


def _as_codes(q: torch.Tensor, bits: int, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              source: str) -> QuantizedTensor:
    """Unsigned codes q (N, K), scale and zero per (N, group): w = scale · (q − zero), exactly."""
    scales = scales.to(torch.float32)
    zeros = zeros.to(torch.float32)
    if bits == 4:
        return QuantizedTensor(q.to(torch.uint8), scales, -(scales * zeros), 4, group, source=source)
    # 8-bit codes live in int8: q − 128, and the zero moves by the same 128 (integers: still exact)
    return QuantizedTensor((q.to(torch.int16) - 128).to(torch.int8), scales, -(scales * (zeros - 128)), 8, group,
                           source=source)


def decode(scheme: Scheme, parts: dict[str, torch.Tensor], out_features: int | None = None) -> QuantizedTensor:
    """One linear layer's stored tensors → (N, K) QuantizedTensor."""
    if scheme.method == "gptq":
        q = _unpack_int32(parts["qweight"], scheme.bits, dim=0).t()  # (K, N) → (N, K)
        n, k = q.shape
        group = k if scheme.group_size == -1 else scheme.group_size
        g_idx = parts.get("g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
            raise QuantizedCheckpointError("GPTQ with act-order (desc_act, a permuted g_idx) is not supported; "
                                           "use a checkpoint quantized with desc_act=false")
        zeros = _unpack_int32(parts["qzeros"], scheme.bits, dim=1)[:, :n].t()  # (G, N) → (N, G)
        if scheme.zero_plus_one:
            zeros = zeros + 1
        return _as_codes(q, scheme.bits, parts["scales"].t(), zeros, group, f"gptq-int{scheme.bits}")
    if scheme.method == "awq":
        q = _unpack_int32(parts["qweight"], 4, dim=1, order=AWQ_ORDER).t()  # (K, N) → (N, K)
        k = q.shape[1]
        group = k if scheme.group_size == -1 else scheme.group_size
        zeros = _unpack_int32(parts["qzeros"], 4, dim=1, order=AWQ_ORDER).t()
        return _as_codes(q, 4, parts["scales"].t(), zeros, group, "awq-int4")
    # compressed-tensors
    scales = parts["weight_scale"].to(torch.float32)
    if scheme.ct_format == "int-quantized":
        w = parts["weight"]
        if w.dtype != torch.int8:
            raise QuantizedCheckpointError(f"compressed-tensors int-quantized weight of dtype {w.dtype} (int8 is "
                                           "supported)")
        k = w.shape[1]
        group = k if scheme.group_size == -1 else scheme.group_size
        zp = parts.get("weight_zero_point")
        if zp is not None and zp.abs().max() > 0:
            raise QuantizedCheckpointError("asymmetric int-quantized compressed-tensors weights are not supported")
        return QuantizedTensor(w, scales.expand(w.shape[0], k // group).contiguous(), None, 8, group,
                               source="compressed-tensors int8")
    shape = parts.get("weight_shape")
    q = _unpack_int32(parts["weight_packed"], scheme.bits, dim=1)  # (N, K) unsigned: value + 2^(bits-1)
    if shape is not None:
        q = q[: int(shape[0]), : int(shape[1])]
    k = q.shape[1]
    group = k if scheme.group_size == -1 else scheme.group_size
    offset = 1 << (scheme.bits - 1)
    zp = parts.get("weight_zero_point")
    zeros = (zp.to(torch.float32) if zp is not None else torch.zeros_like(scales)) + offset
    return _as_codes(q, scheme.bits, scales.expand(q.shape[0], k // group), zeros.expand(q.shape[0], k // group),
                     group, f"compressed-tensors int{scheme.bits}")


@dataclass
class PackedLinearTensor:
    """A quantized layer's weight as one checkpoint tensor (layers.linear.CheckpointTensor): (out, in) slices come
    back as QuantizedTensor."""

    qt: QuantizedTensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qt.shape

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        return self.qt.narrow(dim, start, length)

    def full(self) -> QuantizedTensor:
        return self.qt


def group_quantized_tensors(weights: Iterable[tuple[str, Any]], scheme: Scheme) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors with each quantized layer's parts replaced by one `<prefix>.weight`. Parts of a
    layer may be spread over files: a layer is emitted once all its required parts have arrived."""
    names = _PARTS[scheme.method]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if leaf not in names or (leaf == "weight" and (scheme.ct_format != "int-quantized"
                                                       or getattr(tensor, "dtype_name", "I8") != "I8")):
            yield name, tensor  # not a quantized part (a norm, an embedding, a layer left unquantized)
            continue
        parts = pending.setdefault(prefix, {})
        parts[leaf] = tensor.full()
        if _complete(scheme, parts):
            yield f"{prefix}.weight", PackedLinearTensor(decode(scheme, pending.pop(prefix)))
    # layers whose parts never completed: say which
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise QuantizedCheckpointError(f"quantized layer {prefix} is missing parts (has {sorted(parts)})")


def _complete(scheme: Scheme, parts: dict[str, torch.Tensor]) -> bool:
    if scheme.method in _REQUIRED:
        needed = set(_REQUIRED[scheme.method]) | ({"g_idx"} if "g_idx" in parts else set())
        return needed <= parts.keys()
    if scheme.ct_format == "int-quantized":
        return {"weight", "weight_scale"} <= parts.keys()
    needed = {"weight_packed", "weight_scale", "weight_shape"}
    if not scheme.symmetric:
        needed.add("weight_zero_point")
    return needed <= parts.keys()
