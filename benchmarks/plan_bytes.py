"""Bytes of the engine→runner plan per step (what rank 0 broadcasts to the other tensor-parallel ranks each step),
against the plan format before the diff boundary (every sequence's token ids and whole block table, every step),
on the same schedule.

    python benchmarks/plan_bytes.py --model /work/bench-models/llama-360m --concurrency 16 --prompt-tokens 256
"""

from __future__ import annotations

import argparse
import statistics

import msgspec
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--output-tokens", type=int, default=64)
    args = ap.parse_args()

    from loom.config import EngineConfig
    from loom.engine.core import EngineCore
    from loom.protocol import shard
    from loom.sampling_params import SamplingParams

    engine = EngineCore(args.model, "auto", EngineConfig())
    gen = torch.Generator().manual_seed(0)
    for i in range(args.concurrency):
        prompt = torch.randint(0, engine.model_config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
        engine.add_request(f"req-{i:032x}", prompt, SamplingParams(max_new_tokens=args.output_tokens,
                                                                     ignore_eos=True))
    now: list[int] = []
    before: list[int] = []
    make_plan = engine.scheduler.make_plan

    def recording(scheduled):
        plan = make_plan(scheduled)
        if all(s.start > 0 and s.num_new_tokens == 1 for s in scheduled.seqs):  # decode steps
            now.append(len(shard.encode(plan)[1]))
            # the format before: a dataclass per sequence (msgpack map with its field names) with the whole table
            old = [{"request_id": s.request.request_id,
                    "token_ids": s.request.token_ids[s.start : s.start + s.num_new_tokens], "start": s.start,
                    "block_ids": engine.kv.block_ids(s.request.request_id), "sample": s.samples,
                    "all_logits": False} for s in scheduled.seqs]
            before.append(len(msgspec.msgpack.encode({"seqs": old, "block_size": plan.block_size})))
        return plan

    engine.scheduler.make_plan = recording
    while engine.has_unfinished():
        engine.step()
    print(f"decode steps: {len(now)}, batch {args.concurrency}, context {args.prompt_tokens}-"
          f"{args.prompt_tokens + args.output_tokens}")
    print(f"plan bytes per decode step: {statistics.mean(now):.0f} (whole tables every step: "
          f"{statistics.mean(before):.0f}, {statistics.mean(before) / statistics.mean(now):.1f}x)")


if __name__ == "__main__":
    main()
