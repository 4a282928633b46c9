"""Cost of structured output: the same batch with and without a JSON-schema grammar, in the same run.

Workload: unique random prompts of 256 tokens (the shared bench workload's shape), 128 greedy output tokens. The
unconstrained run ignores EOS; the constrained run uses a schema that needs more than 128 tokens (an array of 200
bounded integers), so both produce exactly 128 tokens per request and the difference is the grammar's cost: the
token masks (computed in a background thread during the forward pass) and applying them to the logits. The time
to compute one step's masks alone is reported too.

    python benchmarks/grammar_overhead.py --model /path/to/llama-360m --batch-sizes 1 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SCHEMA = {"type": "object", "required": ["values"], "properties": {"values": {
    "type": "array", "minItems": 200, "maxItems": 200, "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from loom import LLM, GrammarSpec, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)  # both runs get the same prompts
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    grammar = GrammarSpec.json_schema(SCHEMA)
    plain = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    guided = SamplingParams(max_new_tokens=args.output_len, grammar=grammar)
    llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, grammar=grammar), use_tqdm=False)  # warm-up
    figures = {}
    for size in args.batch_sizes:
        prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen).tolist() for _ in range(size)]
        row = {}
        for name, params in (("plain", plain), ("json_schema", guided)):
            start = time.perf_counter()
            results = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            assert all(len(r.token_ids) == args.output_len for r in results), [len(r.token_ids) for r in results]
            row[name] = size * args.output_len / elapsed
            print(f"batch {size:3d} {name:12s}: {row[name]:7.1f} tok/s ({elapsed:.1f} s)", flush=True)
        row["ratio"] = row["json_schema"] / row["plain"]
        # One step's masks for the whole batch, measured alone at a state mid-array.
        guide = llm.engine.grammar
        matchers = [guide.matcher(grammar) for _ in range(size)]
        prefix = llm.tokenizer.encode('{"values":[1,2,3,', add_special_tokens=False)
        for m in matchers:
            assert m.consume_tokens(prefix)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            guide.masks(matchers)
            times.append(time.perf_counter() - t)
        row["mask_ms_per_step"] = statistics.median(times) * 1000
        print(f"batch {size:3d} json_schema / plain = {row['ratio']:.3f}; masks alone "
              f"{row['mask_ms_per_step']:.3f} ms per step", flush=True)
        figures[size] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
