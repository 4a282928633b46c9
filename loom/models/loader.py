"""Builds a model from a Hugging Face directory: the registry picks the class, safetensors fill the parameters.

Tensors are read through memory-mapped `safe_open` slices one at a time, so peak memory is the model plus one
tensor (and each tensor-parallel rank reads only its own slice).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from loom.config import ModelConfig
from loom.layers.linear import CheckpointTensor, finalize_quantized_weights, quantize_linear_weights
from loom.quantization.hub_formats import group_quantized_tensors, scheme_of
from loom.quantization.methods import ON_THE_FLY
from loom.models.gguf_checkpoint import gguf_file_of, iter_gguf_checkpoint
from loom.models.registry import resolve_model_class

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SafetensorsTensor:
    """A checkpoint tensor behind an mmap'ed safetensors slice; implements layers.linear.CheckpointTensor."""

    slice: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.slice.get_shape())

    @property
    def dtype_name(self) -> str:
        """safetensors' dtype name ("BF16", "I8", ...), known without reading the tensor."""
        return str(self.slice.get_dtype())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self.slice[tuple(index)]

    def full(self) -> torch.Tensor:
        return self.slice[...]  # `[:]` cannot index a 0-dim tensor (a scale)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {model_dir}")
    return files


def iter_checkpoint(model_dir: Path, stack: ExitStack, hf_config: dict[str, Any] | None = None
                    ) -> Iterator[tuple[str, CheckpointTensor]]:
    if gguf_file_of(model_dir) is not None:
        yield from iter_gguf_checkpoint(model_dir, hf_config or {})
        return
    for file in checkpoint_files(model_dir):
        handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        for name in handle.keys():
            yield name, SafetensorsTensor(handle.get_slice(name))


def import_model_code(config: ModelConfig) -> None:
    """Import the modules that building `config`'s model needs (its class's, a vision-language model's language
    model's, the CPU kernels' wrappers), without building anything."""
    import loom.layers.kernels.build  # noqa: F401  (the kernel thread's own imports: prebuild imports the rest)
    from loom.layers.kernels import fused_cpu, paged_decode_cpu, prefill_attention_cpu  # noqa: F401
    from loom.layers.kernels import quant_gemm_cpu, quant_vnni_gemm_cpu  # noqa: F401

    cls = resolve_model_class(config.architecture, config.hf_config, config.trust_remote_code)
    language_model_class = getattr(cls, "language_model_class", None)
    if language_model_class is not None:
        language_model_class(config)


def load_model(config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    cls = resolve_model_class(config.architecture, config.hf_config, config.trust_remote_code)
    from_model_config = getattr(cls, "from_model_config", None)
    if from_model_config is not None:
        # A class that loads itself (the transformers fallback) also checks its own weights are complete.
        return from_model_config(config, device).eval()
    prev_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(prev_dtype)
    with ExitStack() as stack:
        weights = iter_checkpoint(config.path, stack, config.hf_config)
        scheme = scheme_of(config.hf_config)
        if scheme is not None:  # GPTQ / AWQ / compressed-tensors: each layer's parts become one quantized weight
            weights = group_quantized_tensors(weights, scheme)
        loaded = model.load_weights(weights)
    _check_complete(model, loaded)
    if config.quantize in ON_THE_FLY:
        quantize_linear_weights(model, config.quantize)
    formats = finalize_quantized_weights(model)
    if formats:
        logger.info("quantized linear layers: %s", ", ".join(f"{n} {fmt}" for fmt, n in sorted(formats.items())))
    return model.eval()


def _check_complete(model: nn.Module, loaded: dict[str, set]) -> None:
    missing = []
    for name, param in model.named_parameters():
        shards = loaded.get(name)
        expected = getattr(param, "num_shards", 1)
        if not shards or (None not in shards and len(shards) < expected):
            missing.append(name)
    if missing:
        raise ValueError(f"Checkpoint is missing weights for: {', '.join(missing[:10])}"
                         + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
