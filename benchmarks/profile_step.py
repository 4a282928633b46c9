"""Where one engine step spends its time: decode steps at given batch sizes, and a prefill step, on one model.

Runs `EngineCore` in-process (no router), fills the batch with unique random prompts, then times decode steps
(wall time per step, median of several) and prints torch.profiler's per-op table for one of them.

    python benchmarks/profile_step.py --model /work/bench-models/llama-360m --batch-sizes 1 16 32 --prefill 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _engine(model: str, max_prefill: int):
    from loom.config import EngineConfig
    from loom.engine.core import EngineCore

    return EngineCore(model, "auto", EngineConfig(max_batch_prefill_tokens=max_prefill))


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=0, help="also time one prefill step of this many tokens")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table for one step of each")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    from loom.sampling_params import SamplingParams

    engine = _engine(args.model, max(4096, args.prefill))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=args.steps + 8, ignore_eos=True)
    seed = 0
    for bs in args.batch_sizes:
        for i, p in enumerate(_prompts(bs, args.prompt_tokens, vocab, seed)):
            engine.add_request(f"b{bs}-{i}", p, params)
        seed += 1
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
            engine.step()  # prefill
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        med = statistics.median(times[2:])
        print(f"decode batch {bs:3d}: {med * 1e3:7.1f} ms/step  ({bs / med:6.1f} tok/s)", flush=True)
        if args.profile:
            with torch.profiler.profile() as prof:
                engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)
    if args.prefill:
        n = args.prefill // args.prompt_tokens
        for i, p in enumerate(_prompts(n, args.prompt_tokens, vocab, seed)):
            engine.add_request(f"p-{i}", p, SamplingParams(max_new_tokens=2, ignore_eos=True))
        if args.profile:
            with torch.profiler.profile() as prof:
                t = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - t
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        else:
            t = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - t
        print(f"prefill {n} x {args.prompt_tokens} tokens: {elapsed:.2f} s ({n * args.prompt_tokens / elapsed:.0f} "
              "tok/s)", flush=True)


if __name__ == "__main__":
    main()
