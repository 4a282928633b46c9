"""Offline throughput: loom.LLM against transformers `generate` on the same prompts, in the same run.

Workload (the shared one, ../shared/bench/README.md): unique random prompts of exactly 256 tokens, 128 greedy
output tokens with EOS ignored. For each batch size, both engines get the same prompts; output tokens per second of
wall time are reported for each, with the ratio.

    python benchmarks/offline_vs_transformers.py --model /path/to/llama-360m --batch-sizes 1 16 32
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def run_loom(model: str, dtype: str, batches: dict[int, list[list[int]]], new_tokens: int) -> dict[int, float]:
    from loom import LLM, SamplingParams

    llm = LLM(model, dtype=dtype)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(batches[min(batches)][:1], SamplingParams(max_new_tokens=4))  # warm-up
    out = {}
    for size, prompts in batches.items():
        start = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(r.token_ids) == new_tokens for r in results)
        out[size] = size * new_tokens / elapsed
        print(f"loom          batch {size:3d}: {out[size]:8.1f} tok/s ({elapsed:.1f} s)", flush=True)
    del llm
    gc.collect()
    return out


def run_transformers(model: str, dtype: str, batches: dict[int, list[list[int]]], new_tokens: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(torch.tensor(batches[min(batches)][:1]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        out = {}
        for size, prompts in batches.items():
            start = time.perf_counter()
            hf.generate(torch.tensor(prompts), **kwargs)
            elapsed = time.perf_counter() - start
            out[size] = size * new_tokens / elapsed
            print(f"transformers  batch {size:3d}: {out[size]:8.1f} tok/s ({elapsed:.1f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (the shared bench model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--baseline-dtypes", nargs="+", default=None,
                    help="dtypes to run transformers in (default: --dtype); e.g. bfloat16 float32 on CPUs without "
                         "bf16 arithmetic, where transformers is faster in fp32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    batches = {b: make_prompts(b, args.prompt_tokens, 50000, args.seed + b) for b in args.batch_sizes}
    loom = run_loom(args.model, args.dtype, batches, args.new_tokens)
    baselines = {d: run_transformers(args.model, d, batches, args.new_tokens)
                 for d in args.baseline_dtypes or [args.dtype]}
    for dtype, hf in baselines.items():
        print(f"\nLoom {args.dtype} vs transformers {dtype}")
        print(f"{'batch':>5} {'loom tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
        for b in args.batch_sizes:
            print(f"{b:5d} {loom[b]:11.1f} {hf[b]:19.1f} {loom[b] / hf[b]:5.2f}x")
    if args.json:
        report = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                      dtype=args.dtype, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, loom=loom,
                      transformers={d: hf for d, hf in baselines.items()},
                      ratio={d: {b: loom[b] / hf[b] for b in args.batch_sizes} for d, hf in baselines.items()})
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
