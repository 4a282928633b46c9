"""This machine's ceilings for the bench model, to say how close Loom gets.

- Memory read bandwidth (STREAM-style sum over a 1 GiB array, all intra-op threads): bounds batch-1 decode, which
  must read every weight once per token: tok/s ≤ bandwidth / weight bytes.
- bf16 matmul throughput (oneDNN with packed weights, the bench model's layer shapes at M = 512): bounds large
  batches: tok/s ≤ FLOP/s / (2 × parameters per token). A prompt token costs as much as a generated one (less the
  LM head), so the shared workload (256 prompt + 128 output tokens per request) is bounded at about a third of
  that in output tokens.

    python benchmarks/machine_ceilings.py --model /path/to/llama-360m
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def best_of(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the bench model directory (for its shapes)")
    args = parser.parse_args()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inter), (inter, hidden)]  # (K, N) per layer
    layer_params = sum(k * n for k, n in shapes)
    weight_bytes = 2 * (layers * layer_params + cfg["vocab_size"] * hidden)  # bf16, LM head included
    flops_per_token = 2 * (layers * layer_params + cfg["vocab_size"] * hidden)

    data = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    best, median = best_of(lambda: data.sum(), 10)
    bandwidth = data.numel() * 4 / best
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s best, {data.numel() * 4 / median / 1e9:.1f} median")
    del data

    m = 512
    total_flops, total_time = 0.0, 0.0
    for k, n in shapes:
        w = torch.randn(n, k).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        x = torch.randn(m, k).bfloat16()
        best, _ = best_of(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 10)
        total_flops += 2 * m * k * n
        total_time += best
    matmul = total_flops / total_time
    print(f"bf16 matmul (packed oneDNN, M={m}, the model's layer shapes): {matmul / 1e9:.0f} GFLOP/s")
    print(f"bench model: {weight_bytes / 1e6:.0f} MB of bf16 weights, {flops_per_token / 1e9:.2f} GFLOP per token")
    print(f"ceiling, batch-1 decode: {bandwidth / weight_bytes:.1f} tok/s ({weight_bytes / bandwidth * 1e3:.0f} ms "
          "per token)")
    prompt_flops = flops_per_token - 2 * cfg["vocab_size"] * hidden  # only a prompt's last position needs logits
    print(f"ceiling, large batches: {matmul / flops_per_token:.0f} tokens/s computed; shared workload (256 prompt + "
          f"128 output per request): {matmul / (2 * prompt_flops + flops_per_token):.0f} output tok/s")


if __name__ == "__main__":
    main()
