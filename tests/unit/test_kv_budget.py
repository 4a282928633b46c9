"""The default KV budget: a share of available memory, for all tensor-parallel ranks' caches together."""

from __future__ import annotations

from loom.config import EngineConfig, ModelConfig
from loom.engine import core


def test_budget_counts_copied_kv_heads(llama_dir, monkeypatch):
    model = ModelConfig.from_dir(llama_dir, "float32")  # 2 key/value heads
    monkeypatch.setattr(core, "available_memory_bytes", lambda: 1 << 26)
    config = EngineConfig(max_batch_size=10**6)
    one = core.kv_cache_tokens(model, config, 10**6, "cpu", tp_size=1)
    assert one == int((1 << 26) * config.kv_memory_fraction) // model.kv_bytes_per_token()
    assert core.kv_cache_tokens(model, config, 10**6, "cpu", tp_size=2) == one  # heads split: same total
    assert abs(core.kv_cache_tokens(model, config, 10**6, "cpu", tp_size=4) - one / 2) <= 1  # each head twice
    assert core.kv_cache_tokens(model, EngineConfig(max_batch_total_tokens=123), 10**6, "cpu", tp_size=4) == 123


def test_kv_cache_memory_is_zeroed_and_writable():
    import torch

    from loom.worker.runner import zeroed

    for dtype in (torch.bfloat16, torch.float32):
        cache = zeroed((2, 64, 3, 8), dtype, torch.device("cpu"))
        assert cache.shape == (2, 64, 3, 8) and cache.dtype == dtype and not cache.any()
        cache[1].index_copy_(0, torch.tensor([5]), torch.ones(1, 3, 8, dtype=dtype))
        assert cache.sum() == 24 and cache[0].sum() == 0
    assert zeroed((0, 4), torch.float32, torch.device("cpu")).shape == (0, 4)
