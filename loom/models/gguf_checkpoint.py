"""GGUF files (llama.cpp, Ollama) as Loom checkpoints.

A GGUF file carries config, tokenizer, chat template and weights in one file. Loom serves it through the same
path as a Hugging Face directory: `model_directory()` turns the file into a small directory once (config.json
and tokenizer files built by transformers from the GGUF metadata, plus a link to the file) in
$LOOM_CACHE/gguf/, and `iter_gguf_checkpoint()` yields its tensors under the Hugging Face names, read from the
memory-mapped file by the `gguf` package. Quantized tensors of the types in `gguf_blocks` arrive as
`QuantizedTensor`s and stay quantized; other quantized types are dequantized at load with a warning.

Tensor names follow llama.cpp's converter; so does its reordering of the q and k rows for Llama-architecture
models (interleaved rotary halves), undone here per row (rows are whole blocks, so this is exact for every type),
and its storing of Gemma's RMSNorm weights as 1 + w.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loom.quantization import gguf_blocks
from loom.quantization.qtensor import QuantizedTensor

logger = logging.getLogger(__name__)

GGUF_LINK = "model.gguf"  # the materialized directory's link to the original file
_FORMAT_VERSION = 1  # bump when the materialized directory's contents change

# GGUF architecture → (transformers class, whether llama.cpp permuted q/k rows)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "gemma2": ("Gemma2ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
}
# Gemma: llama.cpp stores RMSNorm weights as 1 + w (its norm multiplies by the weight; Gemma's by 1 + w) and names
# the sandwich norms differently
_GEMMA = {"gemma2", "gemma3"}
_GEMMA_NAMES = {
    "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
}

# llama.cpp tensor name (without .weight/.bias) → Hugging Face name; {i} is the block index
_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
    "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_SKIPPED = {"rope_freqs"}  # Llama 3's rope factors: recomputed from the config
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFError(ValueError):
    """A GGUF file Loom cannot serve: says which file and why."""


def find_gguf(path: Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `.gguf` in a directory without config.json."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise GGUFError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                        "pass the one to serve as --model-id")
    return files[0] if files else None


def model_directory(path: str | os.PathLike) -> Path:
    """`path` itself for a Hugging Face directory; for a GGUF file (or a directory holding one) the directory
    Loom builds from it (once per file version)."""
    path = Path(path).expanduser()
    gguf_file = find_gguf(path)
    if gguf_file is None:
        return path
    return _materialize(gguf_file.resolve())


def _cache_root() -> Path:
    return Path(os.environ.get("LOOM_CACHE") or Path.home() / ".cache" / "loom") / "gguf"


def _materialize(gguf_file: Path) -> Path:
    st = gguf_file.stat()
    key = hashlib.blake2b(f"{gguf_file}|{st.st_size}|{st.st_mtime_ns}|{_FORMAT_VERSION}".encode(),
                          digest_size=6).hexdigest()
    out = _cache_root() / f"{gguf_file.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    logger.info("reading config and tokenizer from %s (once) into %s", gguf_file, out)
    reader = _open(gguf_file)
    arch = _architecture(reader, gguf_file)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).to_dict()
        config["architectures"] = [ARCHITECTURES[arch][0]]
        config.update(_config_fixes(reader, arch))
        config["torch_dtype"] = "bfloat16"  # compute dtype; the weights keep their own quantized storage
        config.pop("_name_or_path", None)
        config.pop("_model_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer.save_pretrained(str(tmp))
        (tmp / GGUF_LINK).symlink_to(gguf_file)
        if out.exists():  # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    except GGUFError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GGUFError(f"cannot read the config or tokenizer of {gguf_file}: {type(err).__name__}: {err}") from err
    return out


def _config_fixes(reader: Any, arch: str) -> dict[str, Any]:
    """What transformers' GGUF config reading misses: an explicit head size (Qwen3's differs from hidden/heads),
    and untied embeddings when the file has its own output matrix."""
    fixes: dict[str, Any] = {}
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        fixes["head_dim"] = int(key_length.contents())
    fixes["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return fixes


def _open(gguf_file: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(gguf_file))
    except Exception as err:  # truncated, not a GGUF, wrong version: the reader raises many types
        raise GGUFError(f"{gguf_file} is not a readable GGUF file ({type(err).__name__}: {err})") from err


def _architecture(reader: Any, gguf_file: Path) -> str:
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gguf_file}: GGUF architecture {arch!r} is not supported; Loom serves GGUF files of "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    return arch


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor name; None for tensors Loom recomputes."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _SKIPPED:
        return None
    match = _BLOCK.match(stem)
    key, index = (f"blk.{{i}}.{match.group(2)}", match.group(1)) if match else (stem, None)
    target = (_GEMMA_NAMES.get(key) if arch in _GEMMA else None) or _NAMES.get(key)
    if target is None:
        raise GGUFError(f"GGUF tensor {gguf_name!r} has no place in the model")
    return f"{target.format(i=index)}.{suffix}"


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: Hugging Face row h·D + j·D/2 + i is GGUF row h·D + 2i + j."""
    head_dim = rows // heads
    h, j, i = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(head_dim // 2), indexing="ij")
    return (h * head_dim + 2 * i + j).reshape(-1)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file; implements layers.linear.CheckpointTensor. Repacked quantized types come back
    as `QuantizedTensor` (rows decoded on demand), float types as torch tensors."""

    name: str
    type_name: str
    data: np.ndarray  # memory-mapped: (rows, bytes per row) for quantized types, (rows, cols) or (n,) otherwise
    shape: tuple[int, ...]
    row_index: torch.Tensor | None = None  # Hugging Face row r is GGUF row row_index[r]
    minus_one: bool = False  # a Gemma norm weight stored as 1 + w

    @property
    def quantized(self) -> bool:
        return self.type_name in gguf_blocks.REPACKED_TYPES

    def _rows(self, rows: torch.Tensor | slice) -> np.ndarray:
        return self.data[rows.numpy()] if isinstance(rows, torch.Tensor) else self.data[rows]

    def _read(self, start: int, length: int) -> torch.Tensor | QuantizedTensor:
        rows: torch.Tensor | slice = (self.row_index[start:start + length] if self.row_index is not None
                                      else slice(start, start + length))
        raw = self._rows(rows)
        if self.quantized:
            return gguf_blocks.decode(self.type_name, raw, length, self.shape[1])
        if self.type_name in ("F32", "F16"):
            value = torch.from_numpy(np.array(raw)).to(torch.float32)
            return value - 1 if self.minus_one else value
        if self.type_name == "BF16":
            return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
        from gguf import GGMLQuantizationType, quants

        return torch.from_numpy(quants.dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[self.type_name]))

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | QuantizedTensor:
        if dim == 0 or len(self.shape) == 1:
            return self._read(start, length)
        return self.full().narrow(dim, start, length)

    def full(self) -> torch.Tensor | QuantizedTensor:
        return self._read(0, self.shape[0])


def gguf_file_of(model_dir: Path) -> Path | None:
    link = model_dir / GGUF_LINK
    return link if link.exists() else None


def iter_gguf_checkpoint(model_dir: Path, hf_config: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    gguf_file = gguf_file_of(model_dir)
    assert gguf_file is not None
    reader = _open(gguf_file)
    arch = _architecture(reader, gguf_file)
    permuted = ARCHITECTURES[arch][1]
    heads = {"q_proj": int(hf_config["num_attention_heads"]),
             "k_proj": int(hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"])}
    warned: set[str] = set()
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        type_name = t.tensor_type.name
        # ggml lists dimensions innermost first: (cols, rows) is the Hugging Face (rows, cols)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if type_name not in gguf_blocks.REPACKED_TYPES and type_name not in ("F32", "F16", "BF16") \
                and type_name not in warned:
            warned.add(type_name)
            logger.warning("GGUF type %s is not repacked by Loom: tensors of this type are dequantized at load "
                           "(more memory, bf16 speed)", type_name)
        row_index = None
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            row_index = _unpermute_index(shape[0], heads[proj])
        minus_one = arch in _GEMMA and name.endswith("norm.weight")
        if minus_one and type_name not in ("F32", "F16"):
            raise GGUFError(f"{gguf_file}: Gemma norm {t.name} stored as {type_name} (F32/F16 expected)")
        yield name, GGUFTensor(t.name, type_name, t.data, shape, row_index, minus_one)
