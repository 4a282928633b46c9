"""This machine's ceilings for the bench model, to say how close Loom gets.

- Memory read bandwidth (STREAM-style sum over a 1 GiB array, all intra-op threads): bounds batch-1 decode, which
  must read every weight once per token: tok/s ≤ bandwidth / weight bytes.
- matmul throughput with bf16 weights (every path this CPU has: oneDNN's packed bf16 on AVX-512 BF16 / AMX, Loom's
  AVX-512 BF16 kernel, Loom's AVX2 kernel; oneDNN fp32 and torch's plain bf16 for reference; the bench model's layer
  shapes at M = 512), and the arithmetic peaks (AVX2 FMAs, and AVX-512 `vdpbf16ps` where the CPU has it, in
  registers, all threads): bound large batches: tok/s ≤ FLOP/s / (2 × parameters per token). A prompt token costs
  as much as a generated one (less the LM head), so the shared workload (256 prompt + 128 output tokens per
  request) is bounded at about a third of that in output tokens.

    python benchmarks/machine_ceilings.py --model /path/to/llama-360m
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from loom.layers.kernels import bf16_dot_gemm_cpu, bf16_gemm_cpu
from loom.layers.kernels.build import cpu_flags, load_kernel
from loom.layers.linear import onednn_packs_bf16

# Independent FMA chains in registers on every thread: the arithmetic peak no matmul can pass.
_FMA_PEAK = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <chrono>
#include <vector>
double fma_peak(int64_t iters) {
  std::vector<float> sink(at::get_num_threads() + 1, 0.f);
  auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      __m256 a[12], m = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
      for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps((float)i);
      for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
      for (int i = 1; i < 12; ++i) a[0] = _mm256_add_ps(a[0], a[i]);
      sink[t] = _mm256_cvtss_f32(a[0]);
    }
  });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * 8 * 12 * iters * at::get_num_threads() / s + 0 * sink[0];
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fma_peak", &fma_peak); }
"""


# The same with AVX-512 BF16 dot products (each `vdpbf16ps` on 512 bits: 32 multiplies and 32 adds).
_DP_PEAK = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <chrono>
#include <vector>
double dp_peak(int64_t iters) {
  std::vector<float> sink(at::get_num_threads() + 1, 0.f);
  auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      __m512 a[12];
      const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x33803380);
      for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps((float)i);
      for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
      for (int i = 1; i < 12; ++i) a[0] = _mm512_add_ps(a[0], a[i]);
      sink[t] = _mm512_reduce_add_ps(a[0]);
    }
  });
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * 32 * 12 * iters * at::get_num_threads() / s + 0 * sink[0];
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dp_peak", &dp_peak); }
"""


def bf16_dot_peak() -> float | None:
    if not {"avx512f", "avx512_bf16"} <= cpu_flags():
        return None
    module = load_kernel("loom_bench_dp_peak_v1", _DP_PEAK)
    return max(module.dp_peak(20_000_000) for _ in range(3)) if module is not None else None


def fma_peak() -> float | None:
    if not {"avx2", "fma"} <= cpu_flags():
        return None
    module = load_kernel("loom_bench_fma_peak_v1", _FMA_PEAK)
    return max(module.fma_peak(50_000_000) for _ in range(3)) if module is not None else None


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
    xs = {(k, n): torch.randn(m, k).bfloat16() for k, n in shapes}
    ws = {(k, n): torch.randn(n, k).bfloat16() for k, n in shapes}
    flops = sum(2 * m * k * n for k, n in shapes)
    paths = {}
    if onednn_packs_bf16():
        packed = {s: torch.ops.mkldnn._reorder_linear_weight(w, m) for s, w in ws.items()}
        paths["bf16 matmul, packed oneDNN"] = lambda s: torch.ops.mkldnn._linear_pointwise(
            xs[s], packed[s], None, "none", [], "")
    if bf16_dot_gemm_cpu.load() is not None:
        dot_panels = {s: bf16_dot_gemm_cpu.pack(w) for s, w in ws.items()}
        paths["bf16 weights, Loom's AVX-512 BF16 kernel"] = lambda s: bf16_dot_gemm_cpu.linear(
            xs[s], dot_panels[s], None, s[1])
    if bf16_gemm_cpu.load() is not None:
        panels = {s: bf16_gemm_cpu.pack(w) for s, w in ws.items()}
        paths["bf16 weights, Loom's AVX2 kernel"] = lambda s: bf16_gemm_cpu.linear(xs[s], panels[s], None, s[1])
    if torch.backends.mkldnn.is_available():
        x32 = {s: x.float() for s, x in xs.items()}
        packed32 = {s: torch.ops.mkldnn._reorder_linear_weight(w.float(), m) for s, w in ws.items()}
        paths["fp32 matmul, packed oneDNN (2x the weight bytes)"] = lambda s: torch.ops.mkldnn._linear_pointwise(
            x32[s], packed32[s], None, "none", [], "")
    paths["bf16 matmul, torch F.linear"] = lambda s: torch.nn.functional.linear(xs[s], ws[s])
    matmul = 0.0
    for name, run in paths.items():
        seconds = sum(best_of(lambda s=s: run(s), 5)[0] for s in shapes)
        print(f"{name} (M={m}, the model's layer shapes): {flops / seconds / 1e9:.0f} GFLOP/s")
        matmul = max(matmul, flops / seconds)
    peak = fma_peak()
    if peak:
        print(f"fp32 FMA peak (registers only, all threads): {peak / 1e9:.0f} GFLOP/s")
    dot_peak = bf16_dot_peak()
    if dot_peak:
        print(f"bf16 dot-product peak (vdpbf16ps in registers, all threads): {dot_peak / 1e9:.0f} GFLOP/s")
    print(f"bench model: {weight_bytes / 1e6:.0f} MB of bf16 weights, {flops_per_token / 1e9:.2f} GFLOP per token")
    print(f"ceiling, batch-1 decode: {bandwidth / weight_bytes:.1f} tok/s ({weight_bytes / bandwidth * 1e3:.0f} ms "
          "per token)")
    prompt_flops = flops_per_token - 2 * cfg["vocab_size"] * hidden  # only a prompt's last position needs logits
    print(f"ceiling, large batches: {matmul / flops_per_token:.0f} tokens/s computed; shared workload (256 prompt + "
          f"128 output per request): {matmul / (2 * prompt_flops + flops_per_token):.0f} output tok/s")
    if dot_peak:
        print(f"  at the bf16 dot-product peak: {dot_peak / flops_per_token:.0f} tokens/s computed, "
              f"{dot_peak / (2 * prompt_flops + flops_per_token):.0f} output tok/s on the shared workload")
    if peak:
        print(f"  at the FMA peak: {peak / flops_per_token:.0f} tokens/s computed, "
              f"{peak / (2 * prompt_flops + flops_per_token):.0f} output tok/s on the shared workload")


if __name__ == "__main__":
    main()
