"""GGUF files for tests, and the transformers oracle that reads them.

`write_tiny_gguf` writes a small random model in llama.cpp's layout with the `gguf` package's writer: its linear
weights are quantized to one GGUF type by the `gguf` package's own quantizer, or for the k-quants (which that
package only dequantizes) filled with random valid blocks; its tokenizer is a minimal byte-level BPE with ChatML. `hf_model_from_gguf` builds the transformers model from the same file with
transformers' own GGUF reader (its dequantization and q/k un-permutation, not Loom's).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from loom.demo import smollm2_gguf
from loom.testing.tiny_models import CHATML_TEMPLATE

import numpy as np
import torch

__all__ = ["hf_model_from_gguf", "smollm2_gguf", "write_tiny_gguf"]
K_QUANT_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A minimal GPT-2-style byte-level BPE: the 256 byte symbols, a few merges, ChatML specials (fast to parse,
    unlike a 50k-token vocabulary)."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = ByteLevel.alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    merged = [m.replace(" ", "") for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + symbols + merged
    return tokens, merges, [3] * len(specials) + [1] * (len(symbols) + len(merged))


def _random_k_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    nb = cols // 256
    raw = rng.integers(0, 256, size=(rows, nb, K_QUANT_BLOCK_BYTES[type_name]), dtype=np.uint8)
    # fp16 d (and dmin) at ggml's offsets, small enough that weights stay ~0.1 (Q6_K: d · int8 scale · 32)
    high = 5e-5 if type_name == "Q6_K" else 5e-4
    for off in ([208] if type_name == "Q6_K" else [0, 2]):
        raw[..., off:off + 2] = rng.uniform(high / 5, high, size=(rows, nb)).astype(np.float16).view(np.uint8) \
            .reshape(rows, nb, 2)
    return raw.reshape(rows, -1)


def write_tiny_gguf(out: Path, arch: str = "llama", weight_type: str = "Q8_0", seed: int = 0, hidden: int = 256,
                    intermediate: int = 512, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> Path:
    """A random `arch` model (llama, qwen2, qwen3, gemma2 or gemma3) with every linear weight in `weight_type`."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    tokens, merges, token_types = _byte_level_vocab()
    vocab, head_dim = len(tokens), hidden // heads
    rng = np.random.default_rng(seed)

    writer = GGUFWriter(str(out), arch)
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)

    def add_float(name: str, shape: tuple[int, ...], scale: float = 0.02, offset: float = 0.0) -> None:
        writer.add_tensor(name, (offset + scale * rng.standard_normal(shape)).astype(np.float32))

    def add_linear(name: str, rows: int, cols: int) -> None:
        qtype = GGMLQuantizationType[weight_type]
        if weight_type in K_QUANT_BLOCK_BYTES:
            raw = _random_k_blocks(weight_type, rows, cols, rng)
        elif weight_type in ("F32", "F16"):
            writer.add_tensor(name, (0.05 * rng.standard_normal((rows, cols))).astype(np.float16 if weight_type == "F16" else np.float32))
            return
        else:
            raw = quants.quantize((0.05 * rng.standard_normal((rows, cols))).astype(np.float32), qtype)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    add_float("token_embd.weight", (vocab, hidden))
    add_float("output_norm.weight", (hidden,), 0.1, 1.0)
    if arch not in ("gemma2", "gemma3"):  # Gemma ties its head to the embedding, as its GGUFs do
        add_linear("output.weight", vocab, hidden)
    for i in range(layers):
        add_float(f"blk.{i}.attn_norm.weight", (hidden,), 0.1, 1.0)
        add_float(f"blk.{i}.ffn_norm.weight", (hidden,), 0.1, 1.0)
        if arch in ("gemma2", "gemma3"):  # sandwich norms
            add_float(f"blk.{i}.post_attention_norm.weight", (hidden,), 0.1, 1.0)
            add_float(f"blk.{i}.post_ffw_norm.weight", (hidden,), 0.1, 1.0)
        add_linear(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        add_linear(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add_linear(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add_linear(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add_linear(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        add_linear(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        add_linear(f"blk.{i}.ffn_down.weight", hidden, intermediate)
        if arch == "qwen2":
            for proj, size in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                add_float(f"blk.{i}.attn_{proj}.bias", (size * head_dim,), 0.1)
        if arch in ("qwen3", "gemma3"):
            add_float(f"blk.{i}.attn_q_norm.weight", (head_dim,), 0.1, 1.0)
            add_float(f"blk.{i}.attn_k_norm.weight", (head_dim,), 0.1, 1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def hf_model_from_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """transformers' model of a GGUF file, weights dequantized by transformers' own GGUF reader."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from gguf import GGUFReader

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    reader = GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if f"{arch}.attention.key_length" in reader.fields:  # transformers reads no head size from GGUF metadata
        config.head_dim = int(reader.fields[f"{arch}.attention.key_length"].contents())
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    model = AutoModelForCausalLM.from_config(config)  # on the CPU: its non-persistent buffers stay real
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    with warnings.catch_warnings():  # transformers' lazy arrays predate numpy 2's `copy` keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        state = {name: torch.from_numpy(np.array(t, copy=True)).to(dtype) for name, t in tensors.items()}
    missing = set(model.state_dict()) - set(state)
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        missing.discard("lm_head.weight")
    assert not missing, f"transformers' GGUF reader left {sorted(missing)[:5]} unset"
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()
