"""`loom bench` against a real server: exact prompt lengths, every request completes, ignore_eos honoured."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from loom.bench.cli import main as bench_main
from loom.bench.prompts import random_prompts


def test_prompts_have_exact_token_counts(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = random_prompts(tok, 5, 100, shared_prefix_tokens=60, seed=1)
    assert all(len(tok.encode(p, add_special_tokens=False)) == 100 for p in prompts)
    prefix = tok.encode(prompts[0], add_special_tokens=False)[:60]
    assert all(tok.encode(p, add_special_tokens=False)[:60] == prefix for p in prompts)
    assert len(set(prompts)) == 5


def test_bench_against_the_server(server, llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    code = bench_main(["--url", server.url, "--tokenizer", str(llama_dir), "--concurrency", "1", "2",
                       "--num-prompts", "4", "--prompt-tokens", "32", "--output-tokens", "8", "--no-progress",
                       "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["load"] for r in report["runs"]] == ["c=1", "c=2"]
    for run in report["runs"]:
        assert run["completed"] == run["requests"] == 4 and run["failed"] == 0
        assert run["output_tokens"] == 4 * 8  # ignore_eos: every request runs to max_tokens
        assert 0 < run["ttft_p50"] <= run["e2e_p50"] and run["tpot_p50"] > 0
        assert run["output_throughput"] > 0
    code = bench_main(["--url", server.url, "--tokenizer", str(llama_dir), "--api", "tgi", "--concurrency", "2",
                       "--num-prompts", "2", "--prompt-tokens", "16", "--output-tokens", "4", "--no-progress",
                       "--json", str(out), "--compare", server.url])
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and all(r["completed"] == 2 for r in runs)
