"""Configuration: what the model is (read from its directory) and how the engine runs (written once at start)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, hf_config: dict[str, Any]) -> torch.dtype:
    """`auto` takes the checkpoint's `torch_dtype`/`dtype` (float32 when absent)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"Unsupported dtype {name!r}; choose one of auto, float32, bfloat16, float16")
    return _DTYPES[name]


# Older families name the same geometry differently; the engine reads the Llama names.
_ALIASES = {
    "num_hidden_layers": ("n_layer", "num_layers"),
    "num_attention_heads": ("n_head",),
    "hidden_size": ("n_embd", "n_embed", "d_model"),
    "max_position_embeddings": ("n_positions", "max_seq_len"),
}


def normalise_hf_config(hf: dict[str, Any]) -> dict[str, Any]:
    """A copy of config.json with the Llama names filled in from aliases (GPT-2's n_layer, ...) and the KV head
    count made explicit (Falcon's multi_query / num_kv_heads). A vision-language config's `text_config` is
    lifted to the top level (the engine sizes its KV cache from the language model), the rest kept: the
    checkpoint's `model_type` and `architectures` stay, the language model's type becomes `text_model_type`."""
    out = dict(hf)
    text = hf.get("text_config")
    if isinstance(text, dict) and "vision_config" in hf:
        out.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
        out["text_model_type"] = text.get("model_type")
        if hf.get("model_type") == "paligemma" and "max_position_embeddings" not in text:
            # PaliGemma's text configs on the Hub leave it out, and transformers' Gemma and Gemma 2 then read 8192
            # (not Loom's 4096 fallback, which a 896-pixel PaliGemma's 4096 image tokens alone fill)
            out["max_position_embeddings"] = 8192
    for name, aliases in _ALIASES.items():
        if name not in out:
            for alias in aliases:
                if alias in out:
                    out[name] = out[alias]
                    break
    # Each family's KV head count as its transformers class reads it: GPT-2 and GPT-NeoX are multi-head (their
    # classes ignore a stray `num_key_value_heads`), Falcon has its own keys; the rest read num_key_value_heads.
    model_type = out.get("model_type")
    if model_type in _MULTI_HEAD_ONLY and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]
    elif model_type == "falcon":
        if out.get("new_decoder_architecture"):
            out["num_key_value_heads"] = out.get("num_kv_heads") or out["num_attention_heads"]
        elif out.get("multi_query", True):
            out["num_key_value_heads"] = 1
        else:
            out["num_key_value_heads"] = out["num_attention_heads"]
    return out


# model types whose transformers attention has as many key/value heads as query heads, whatever config.json says
_MULTI_HEAD_ONLY = frozenset({"gpt2", "gpt_neox"})


def architecture_of(hf_config: dict[str, Any]) -> str | None:
    """The class name to build: config.json's first `architectures` entry, or, without one (a config transformers
    wrote for a model loaded from GGUF, say), the causal-LM class transformers' AutoModelForCausalLM picks for the
    `model_type`."""
    archs = hf_config.get("architectures") or []
    if archs:
        return str(archs[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.get("model_type", ""))
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class SpeculatorSpec:
    kind: Literal["medusa", "mlp_speculator"]
    path: Path  # the speculator's own directory
    num_heads: int  # drafts it proposes per step
    config: dict[str, Any] = field(hash=False, compare=False)


def read_speculator(path: Path) -> SpeculatorSpec | None:
    """The speculator whose directory is `path`, or None for a plain model directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    if "medusa_num_heads" in cfg:
        return SpeculatorSpec("medusa", path, int(cfg["medusa_num_heads"]), cfg)
    if cfg.get("model_type") == "mlp_speculator" or "MLPSpeculatorPreTrainedModel" in (cfg.get("architectures") or []):
        return SpeculatorSpec("mlp_speculator", path, int(cfg["n_predict"]), cfg)
    return None


def base_model_path(spec: SpeculatorSpec) -> Path:
    """The base model's local directory: `base_model_name_or_path` as a path (absolute, or relative to the
    speculator), else a hub id already in the local Hugging Face cache (the launcher fetches it first)."""
    name = spec.config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{spec.path / 'config.json'}: a {spec.kind} speculator needs `base_model_name_or_path`")
    for candidate in (Path(name), spec.path / name):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # noqa: BLE001 — not in the cache, or not a hub id
        raise ValueError(f"the base model {name!r} of speculator {spec.path} is neither a local directory nor in "
                         f"the Hugging Face cache ({type(err).__name__})") from err


ROPE_OVERRIDE_TYPES = ("linear", "dynamic")


def override_rope(hf_config: dict[str, Any], kind: str, factor: float) -> dict[str, Any]:
    """TGI's `--rope-scaling` / `--rope-factor` (env ROPE_SCALING / ROPE_FACTOR): the scaling replaces the
    checkpoint's own (`{"type": kind, "factor": factor}`), over its rope_theta, and the longest sequence grows by
    the factor (TGI's launcher: max_position_embeddings × factor). Written the way transformers reads it, so that
    transformers given the same config computes the same rotations."""
    if kind not in ROPE_OVERRIDE_TYPES:
        raise ValueError(f"rope scaling {kind!r}: TGI's --rope-scaling takes {' or '.join(ROPE_OVERRIDE_TYPES)}")
    if not factor > 0:
        raise ValueError(f"rope factor must be > 0, got {factor}")
    cfg = dict(hf_config)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    params = {"rope_type": kind, "factor": float(factor), "rope_theta": theta}
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = params
    cfg["rope_theta"] = theta
    return cfg


@dataclass(frozen=True)
class ModelConfig:
    """The model directory and what the engine needs to know about it."""

    path: Path
    hf_config: dict[str, Any]
    dtype: torch.dtype
    architecture: str
    max_model_len: int  # longest sequence (prompt + generated) the model supports
    quantize: str | None = None  # --quantize: an on-the-fly method, or the checkpoint format it must have
    speculator: SpeculatorSpec | None = None  # the Medusa / MLP-speculator heads when given a speculator directory
    rope_override: tuple[str, float] | None = None  # --rope-scaling / --rope-factor, applied to hf_config
    trust_remote_code: bool = False  # --trust-remote-code: custom modeling code may run (transformers fallback)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, dtype: str | torch.dtype = "auto", quantize: str | None = None,
                 rope: tuple[str, float] | None = None, trust_remote_code: bool = False) -> ModelConfig:
        """`rope`: TGI's rope override (kind, factor), see `override_rope`. `trust_remote_code`: a checkpoint
        whose config maps to its own modeling code (`auto_map`) may run it (the transformers fallback)."""
        from loom.models.gguf_checkpoint import model_directory

        speculator = read_speculator(Path(path)) if Path(path).is_dir() else None
        if speculator is not None:  # TGI: a speculator's directory serves its base model with its heads
            path = base_model_path(speculator)
        path = model_directory(path)  # a GGUF file → the directory Loom builds from its metadata
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"No config.json in model directory {path}")
        hf_config = normalise_hf_config(json.loads(cfg_file.read_text()))
        architecture = architecture_of(hf_config)
        if architecture is None:
            raise ValueError(f"{cfg_file} has no `architectures` entry and its model_type "
                             f"{hf_config.get('model_type')!r} names no causal language model; cannot pick a model "
                             "implementation")
        max_len = int(hf_config.get("max_position_embeddings") or hf_config.get("n_positions") or 4096)
        if rope is not None:
            hf_config = override_rope(hf_config, *rope)
            max_len = int(max_len * max(1.0, rope[1]))
        from loom.quantization.methods import check_checkpoint

        quantize = check_checkpoint(quantize, hf_config, path)
        return cls(path, hf_config, resolve_dtype(dtype, hf_config), architecture, max_len, quantize, speculator,
                   tuple(rope) if rope is not None else None, trust_remote_code)  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return self.hf_config.get(key, default)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_attention_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_attention_heads)

    @property
    def head_dim(self) -> int:
        explicit = self.hf_config.get("head_dim")
        return int(explicit) if explicit else int(self.hf_config["hidden_size"]) // self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    def kv_bytes_per_token(self, kv_dtype: torch.dtype | None = None) -> int:
        elem = torch.tensor([], dtype=kv_dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and memory limits, with TGI's flag names. Frozen: written once by whoever starts the engine."""

    # tokens computed per step (prefill chunks + decodes); None → inferred by the engine (EngineCore)
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None  # KV cache capacity in tokens; None → from available memory
    max_batch_size: int = 256  # sequences per step
    max_total_tokens: int | None = None  # longest request (prompt + generated); None → model's max length
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True
    kv_memory_fraction: float = 0.25  # share of available RAM the default KV budget may take
    seed: int = 0  # seeds the engine's own RNG (random per-request seeds come from `random`)
    speculate: int = 0  # most draft tokens verified per request and step (n-gram prompt lookup); 0 = off
    draft_model: str | None = None  # a small model with the same tokenizer that proposes the drafts
    watermark_gamma: float = 0.5  # share of the vocabulary in a watermark's green list (TGI's default)
    watermark_delta: float = 2.0  # logit bias of the green list
    rope_scaling: str | None = None  # TGI's --rope-scaling override: "linear" or "dynamic" (needs rope_factor)
    rope_factor: float | None = None  # TGI's --rope-factor (alone: linear scaling)
    trust_remote_code: bool = False  # TGI's --trust-remote-code: custom modeling code runs (transformers fallback)
    kv_cache_dtype: str | None = None  # TGI's --kv-cache-dtype: "fp8_e4m3fn" or "fp8_e5m2"; None: the model's dtype
    lora_adapters: tuple[tuple[str, str], ...] = ()  # TGI's --lora-adapters: (adapter id, local directory) pairs
