"""`--quantize`: TGI's value names, what each means in Loom, and the on-the-fly quantizers.

On-the-fly methods quantize a bf16/fp16/fp32 checkpoint's linear weights at load (embeddings and norms stay in the
compute dtype, as TGI's do):

| --quantize | Loom | TGI |
|---|---|---|
| `eetq`, `bitsandbytes` | int8, symmetric, one scale (absmax / 127) per 64 inputs (per output channel when 64 does not divide the inputs) | EETQ / bnb LLM.int8: int8 per channel (CUDA) |
| `bitsandbytes-nf4` | 4-bit NF4 code book, one absmax scale per 64 inputs | bnb NF4, blocks of 64 |
| `bitsandbytes-fp4` | 4-bit FP4 (e2m1) code book, one scale per 64 inputs | bnb FP4, blocks of 64 |

The NF4 table is bnb's, rounded once to bf16 (the kernel multiplies in bf16): the values the weights are rounded
to are exactly those the kernel uses, so dequantization is exact. Checkpoint formats (`gptq`, `awq`,
`compressed-tensors`, GGUF) are detected from the checkpoint; naming them with `--quantize` only checks that the
checkpoint is in that format, as TGI does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loom.quantization.qtensor import QuantizedTensor

ON_THE_FLY = ("eetq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
CHECKPOINT_FORMATS = ("gptq", "awq", "compressed-tensors", "marlin")
# TGI values with no meaning on Loom's targets, and why
REFUSED = {
    "exl2": "ExLlamaV2 checkpoints are not supported (CUDA-only kernels); use a GPTQ, AWQ or GGUF version",
    "fp8": "fp8 weights are not supported yet; use eetq (int8) or bitsandbytes-nf4 (4-bit)",
}
ALL_VALUES = ON_THE_FLY + CHECKPOINT_FORMATS + tuple(REFUSED)

# bitsandbytes' NF4 table (quantiles of a standard normal, scaled to [-1, 1])
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
NF4_CODEBOOK = torch.tensor(_NF4).to(torch.bfloat16).to(torch.float32)
# FP4 e2m1 values (sign, 2 exponent bits, 1 mantissa bit), divided by its largest, 6: codes 0-7 positive, 8-15 negative
_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_CODEBOOK = torch.tensor(_E2M1 + [-v for v in _E2M1])  # scale = absmax / 6: the table itself is exact in bf16
NF4_FP4_GROUP = 64


def check_method(value: str | None) -> str | None:
    """The method, or ValueError naming the values that apply."""
    if value is None:
        return None
    if value in REFUSED:
        raise ValueError(f"--quantize {value}: {REFUSED[value]}")
    if value not in ALL_VALUES:
        raise ValueError(f"--quantize {value!r} is not a TGI quantization method; Loom takes "
                         f"{', '.join(ON_THE_FLY + CHECKPOINT_FORMATS)}")
    return value


def checkpoint_format(hf_config: dict, model_dir: Path) -> str | None:
    """The quantized format a checkpoint is in: `quantization_config.quant_method`, or "gguf"."""
    from loom.models.gguf_checkpoint import gguf_file_of

    if gguf_file_of(model_dir) is not None:
        return "gguf"
    qc = hf_config.get("quantization_config")
    if isinstance(qc, dict):
        return str(qc.get("quant_method") or "unknown")
    return None


def check_checkpoint(quantize: str | None, hf_config: dict, model_dir: Path) -> str | None:
    """`--quantize` against the checkpoint (ValueError with one clear line when they disagree)."""
    from loom.quantization.hub_formats import scheme_of

    method = check_method(quantize)
    scheme_of(hf_config)  # a quantized format Loom cannot read: refused here, before any weight is read
    fmt = checkpoint_format(hf_config, model_dir)
    if method in ON_THE_FLY and fmt is not None:
        raise ValueError(f"--quantize {method} applies to bf16/fp16/fp32 checkpoints; {model_dir} is already "
                         f"quantized ({fmt}): drop --quantize")
    if method in CHECKPOINT_FORMATS and fmt != method and not (method == "marlin" and fmt in ("gptq", "awq")):
        raise ValueError(f"--quantize {method}: {model_dir} is not a {method} checkpoint "
                         f"({'format ' + fmt if fmt else 'no quantization_config'})")
    return method


INT8_GROUP = 64


def quantize_int8(weight: torch.Tensor) -> QuantizedTensor:
    """Symmetric int8 with one absmax scale per group of 64 inputs. TGI's EETQ and LLM.int8 use one scale per output
    channel; groups cost 1/16 byte per weight more and keep the quality: on SmolLM2-135M (docs/benchmarks.md)
    per-channel int8 raised perplexity 1.87%, groups of 64 changed it by -0.62%."""
    w = weight.to(torch.float32)
    n, k = w.shape
    group = INT8_GROUP if k % INT8_GROUP == 0 else k
    groups = w.view(n, k // group, group)
    scale = groups.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    codes = torch.round(groups / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).view(n, k)
    return QuantizedTensor(codes, scale, None, 8, group, source=f"int8 (groups of {group})")


def quantize_codebook(weight: torch.Tensor, codebook: torch.Tensor, divisor: float, group: int, name: str
                      ) -> QuantizedTensor:
    """Each group of `group` inputs: scale = absmax / divisor, code = the nearest table entry to w / scale."""
    w = weight.to(torch.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"{name} needs input sizes divisible by {group}; this layer has {k}")
    groups = w.view(n, k // group, group)
    scale = groups.abs().amax(dim=-1).clamp_min(1e-12) / divisor  # (n, k/group)
    normalized = groups / scale.unsqueeze(-1)
    codes = torch.empty(n, k // group, group, dtype=torch.uint8)
    for start in range(0, n, 256):  # nearest entry, a few rows at a time (the distance table is 16x the rows)
        rows = normalized[start:start + 256]
        codes[start:start + 256] = (rows.unsqueeze(-1) - codebook).abs().argmin(dim=-1).to(torch.uint8)
    return QuantizedTensor(codes.view(n, k), scale, None, 4, group, codebook=codebook, source=name)


def quantize_weight(weight: torch.Tensor, method: str) -> QuantizedTensor:
    if method in ("eetq", "bitsandbytes"):
        return quantize_int8(weight)
    if method == "bitsandbytes-nf4":
        return quantize_codebook(weight, NF4_CODEBOOK, 1.0, NF4_FP4_GROUP, "nf4")
    if method == "bitsandbytes-fp4":
        return quantize_codebook(weight, FP4_CODEBOOK, 6.0, NF4_FP4_GROUP, "fp4")
    raise ValueError(f"{method} is not an on-the-fly quantization method")
