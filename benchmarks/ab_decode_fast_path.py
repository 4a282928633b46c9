"""Same-process A/B of the decode fast path (kernels/fused_cpu.py: rope_store, add_rms_norm): one EngineCore,
the fused calls switched off and on every few steps, median step time of each.

    python benchmarks/ab_decode_fast_path.py --model /work/bench-models/gguf/model-q4_0.gguf --batch-size 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--alternations", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="steps per turn")
    args = ap.parse_args()

    from loom.config import EngineConfig
    from loom.engine.core import EngineCore
    from loom.layers.kernels import fused_cpu
    from loom.sampling_params import SamplingParams

    engine = EngineCore(args.model, "auto", EngineConfig(max_batch_prefill_tokens=8192))
    gen = torch.Generator().manual_seed(0)
    total = 8 + 2 * args.alternations * args.steps
    for i in range(args.batch_size):
        prompt = torch.randint(0, engine.model_config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=total, ignore_eos=True))
    for _ in range(5):
        engine.step()  # prefill and warm-up
    fused = (fused_cpu.rope_store, fused_cpu.add_rms_norm)
    off = (lambda *a, **k: None,) * 2
    times: dict[str, list[float]] = {"fused": [], "unfused": []}
    for _ in range(args.alternations):
        for mode in times:
            fused_cpu.rope_store, fused_cpu.add_rms_norm = fused if mode == "fused" else off
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.step()
                times[mode].append(time.perf_counter() - start)
    for mode, values in times.items():
        print(f"{mode:8s} {statistics.median(values) * 1e3:7.2f} ms/step (batch {args.batch_size})")


if __name__ == "__main__":
    main()
