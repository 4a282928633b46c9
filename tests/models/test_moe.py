"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers on tiny random checkpoints,
plus the MoE layer's checkpoint formats and tensor-parallel sharding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import LLM
from loom.config import ModelConfig
from loom.distributed.parallel_state import TPGroup, get_tp_group, set_tp_group
from loom.engine.kv.kv_manager import KVCacheManager
from loom.layers.moe import SparseMoeBlock
from loom.testing.parity import assert_greedy_parity, assert_logits_parity, make_checkpoint, paged_logits
from loom.testing.tiny_models import PADDED_VOCAB
from loom.worker.runner import ModelRunner

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "vocab_size": PADDED_VOCAB, "initializer_range": 0.1,
        "tie_word_embeddings": False, "num_experts_per_tok": 2}


def _config(family: str, **overrides):
    import transformers

    recipes = {
        # sliding window shorter than the longest test prompts, on every layer
        "mixtral": ("MixtralConfig", {"intermediate_size": 64, "num_local_experts": 4, "sliding_window": 24}),
        # layer 0 sliding + dense MLP (mlp_only_layers), layer 1 full attention + MoE with shared expert; no renorm
        "qwen2_moe": ("Qwen2MoeConfig", {
            "intermediate_size": 96, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
            "num_experts": 4, "mlp_only_layers": [0], "use_sliding_window": True, "sliding_window": 24,
            "max_window_layers": 1, "norm_topk_prob": False}),
        # decoder_sparse_step 2 → layer 0 dense, layer 1 MoE; renormalised top-k
        "qwen3_moe": ("Qwen3MoeConfig", {
            "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4, "head_dim": 16,
            "decoder_sparse_step": 2, "norm_topk_prob": True}),
    }
    cls_name, extra = recipes[family]
    return getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer_dir):
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[family] = make_checkpoint(out, _config(family), tokenizer_dir)
        return cache[family]

    return make


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, moe_dir):
    # 40 tokens: longer than the sliding windows (24) and spanning three KV blocks; kept short for test time
    assert_logits_parity(moe_dir(family), lengths=(1, 7, 40))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, moe_dir):
    assert_greedy_parity(moe_dir(family))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bfloat16_tracks_transformers_bfloat16(family, moe_dir):
    """Routing weights and the per-token sum over experts keep transformers' dtypes (Mixtral: float32 weights)."""
    from loom.testing.parity import hf_model

    path = moe_dir(family)
    ids = torch.randint(0, 50257, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = hf_model(path, torch.bfloat16)(torch.tensor([ids])).logits[0].float()
    runner = ModelRunner(ModelConfig.from_dir(path, "bfloat16"), num_blocks=8, block_size=16)
    for chunk in (40, 1):
        got = paged_logits(runner, KVCacheManager(8, 16, False), ids, chunk)
        assert (got - expected).abs().max().item() < 0.1, chunk


def test_layer_kinds_follow_config(moe_dir):
    """Dense vs sparse layers and per-layer windows are picked like transformers picks them."""
    from loom.layers.moe import GatedMLP

    qwen2 = ModelRunner(ModelConfig.from_dir(moe_dir("qwen2_moe"), "float32"), num_blocks=2, block_size=16).model
    kinds = [type(layer.mlp) for layer in qwen2.model.layers]
    assert kinds == [GatedMLP, SparseMoeBlock]
    assert [layer.self_attn.attn.sliding_window for layer in qwen2.model.layers] == [24, None]
    assert qwen2.model.layers[1].mlp.shared_expert is not None
    # a config.json from before `layer_types` gets the same per-layer windows
    cfg = json.loads((moe_dir("qwen2_moe") / "config.json").read_text())
    del cfg["layer_types"]
    assert qwen2.layer_windows(cfg) == [24, None]
    qwen3 = ModelRunner(ModelConfig.from_dir(moe_dir("qwen3_moe"), "float32"), num_blocks=2, block_size=16).model
    assert [type(layer.mlp) for layer in qwen3.model.layers] == [GatedMLP, SparseMoeBlock]
    assert qwen3.model.layers[1].mlp.shared_expert is None and qwen3.model.layers[1].mlp.renormalize


def _logits(path: Path, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(ModelConfig.from_dir(path, "float32"), num_blocks=8, block_size=16)
    return paged_logits(runner, KVCacheManager(8, 16, False), ids, len(ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoint_loads_the_same(family, moe_dir, tmp_path):
    """transformers' fused 3-D expert tensors (`mlp.experts.gate_up_proj`/`down_proj`) load like per-expert ones."""
    src = moe_dir(family)
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    experts = int(json.loads((src / "config.json").read_text()).get("num_local_experts") or 4)
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    fused: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        if ".experts.0." not in name or not name.endswith(f".{names[0]}.weight"):
            continue
        prefix = name.split(".experts.0.")[0]
        parts = {n: [tensors.pop(f"{prefix}.experts.{e}.{n}.weight") for e in range(experts)] for n in names}
        new_prefix = prefix.replace(".block_sparse_moe", ".mlp")
        fused[f"{new_prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(parts[names[0]], parts[names[1]])])  # (E, 2I, H)
        fused[f"{new_prefix}.experts.down_proj"] = torch.stack(parts[names[2]])  # (E, H, I)
        if new_prefix != prefix:
            fused[f"{new_prefix}.gate.weight"] = tensors.pop(f"{prefix}.gate.weight")
    assert fused
    save_file({**tensors, **fused}, str(dst / "model.safetensors"))
    ids = list(range(100, 140))
    assert torch.equal(_logits(src, ids), _logits(dst, ids))


class _PartialTP(TPGroup):
    """One rank of a pretend tensor-parallel group whose all-reduce the test does by hand."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Full:
    def __init__(self, t: torch.Tensor):
        self.t, self.shape = t, tuple(t.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.t.narrow(dim, start, length)

    def full(self) -> torch.Tensor:
        return self.t


@pytest.mark.parametrize("fused", [False, True])
def test_expert_sharding_sums_to_the_unsharded_output(fused):
    """Each rank loads its slice of every expert's intermediate dim; the ranks' partial outputs sum to tp=1's."""
    gen = torch.Generator().manual_seed(0)
    E, H, I = 4, 16, 8
    gate, up, down = (torch.randn(E, I, H, generator=gen), torch.randn(E, I, H, generator=gen),
                      torch.randn(E, H, I, generator=gen))
    router = torch.randn(E, H, generator=gen)
    x = torch.randn(10, H, generator=gen)

    def build(tp: TPGroup) -> SparseMoeBlock:
        prev = get_tp_group()
        set_tp_group(tp)
        try:
            block = SparseMoeBlock(H, E, 2, I, renormalize=True)
        finally:
            set_tp_group(prev)
        block.gate.weight.weight_loader(block.gate.weight, _Full(router))
        w13, w2 = block.experts.gate_up_proj, block.experts.down_proj
        if fused:
            w13.weight_loader(w13, _Full(torch.cat([gate, up], dim=1)))
            w2.weight_loader(w2, _Full(down))
        else:
            for e in range(E):
                w13.weight_loader(w13, _Full(gate[e]), (e, 0))
                w13.weight_loader(w13, _Full(up[e]), (e, 1))
                w2.weight_loader(w2, _Full(down[e]), e)
        return block

    expected = build(TPGroup())(x)
    partial = sum(build(_PartialTP(rank=r, size=2))(x) for r in range(2))
    torch.testing.assert_close(partial, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expert intermediate size"):
        build(_PartialTP(rank=0, size=3))


def _broken(moe_dir, tmp_path, family: str, **changes) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(moe_dir(family), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(changes)
    (bad / "config.json").write_text(json.dumps(cfg))
    return bad


def test_unsupported_activation_is_a_clear_error(moe_dir, tmp_path):
    with pytest.raises(ValueError, match="Unsupported activation 'relu6'"):
        LLM(_broken(moe_dir, tmp_path, "qwen3_moe", hidden_act="relu6"), max_batch_total_tokens=256)


def test_more_experts_per_token_than_experts_is_a_clear_error(moe_dir, tmp_path):
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\)"):
        LLM(_broken(moe_dir, tmp_path, "mixtral", num_experts_per_tok=5), max_batch_total_tokens=256)


def test_unknown_checkpoint_tensor_is_a_clear_error(moe_dir, tmp_path):
    bad = tmp_path / "extra"
    shutil.copytree(moe_dir("qwen2_moe"), bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)  # layer 0 is dense
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts.0.gate_proj.weight' has no place"):
        LLM(bad, max_batch_total_tokens=256)
