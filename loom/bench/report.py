"""Printing, JSON and a latency-vs-throughput plot of benchmark runs."""

from __future__ import annotations

import json
from pathlib import Path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def workload_lines(meta: dict, images: str | None = None) -> list[str]:
    """The settings a run is comparable by, as text: the API, prompt and output lengths, the images."""
    if meta.get("prompt_tokens") is None:
        text = "dataset prompts as they are"
    else:
        shared = meta.get("shared_prefix_tokens") or 0
        text = f"{meta['prompt_tokens']} text prompt tokens" + (f" ({shared} shared)" if shared else "")
    lines = [f"workload: api {meta['api']}, {text}, {meta['output_tokens']} output tokens"]
    if images:
        lines.append(f"images: {images}")
        lines.append("  the prompt tokens are the text's (bench tokenizer); image tokens come on top: "
                     "`srv prompt` = the server's mean count")
    return lines


def print_table(summaries: list[dict], workload: list[str] | None = None) -> None:
    if workload:
        print()
        for line in workload:
            print(line)
    print(f"\n{'server':<28} {'load':<10} {'ok/all':>7} {'out tok/s':>9} {'req/s':>6} "
          f"{'TTFT p50/p90/p99 ms':>21} {'TPOT p50/p90 ms':>16} {'ITL p50 ms':>10} {'E2E p50 s':>9} "
          f"{'accept':>6} {'srv prompt':>10}")
    for s in summaries:
        ttft = f"{_ms(s['ttft_p50'])}/{_ms(s['ttft_p90'])}/{_ms(s['ttft_p99'])}"
        tpot = f"{_ms(s['tpot_p50'])}/{_ms(s['tpot_p90'])}"
        e2e = "-" if s["e2e_p50"] is None else f"{s['e2e_p50']:.2f}"
        rate = s.get("spec_acceptance")  # speculative drafts accepted (a Loom server with --speculate)
        accept = "-" if rate is None else f"{rate * 100:.0f}%"
        prompt = s.get("mean_server_prompt_tokens")  # the server's prompt tokens, images included
        prompt = "-" if prompt is None else f"{prompt:.1f}"
        print(f"{s['url'][-28:]:<28} {s['load']:<10} {s['completed']:>3}/{s['requests']:<3} "
              f"{s['output_throughput']:>9.1f} {s['request_throughput']:>6.2f} {ttft:>21} {tpot:>16} "
              f"{_ms(s['itl_p50']):>10} {e2e:>9} {accept:>6} {prompt:>10}")
        for err in s["errors"]:
            print(f"    error: {err}")


def print_ratios(base: list[dict], other: list[dict]) -> None:
    """`base` (the first URL) over `other` (--compare): >1 means the first server is better."""
    print("\nratios (first server vs --compare server; >1 = first is better)")
    print(f"{'load':<10} {'out tok/s':>10} {'TTFT p50':>10} {'TPOT p50':>10}")
    for a, b in zip(base, other):
        def inv(key: str) -> str:
            return "-" if not a[key] or not b[key] else f"{b[key] / a[key]:.2f}x"

        tput = "-" if not b["output_throughput"] else f"{a['output_throughput'] / b['output_throughput']:.2f}x"
        print(f"{a['load']:<10} {tput:>10} {inv('ttft_p50'):>10} {inv('tpot_p50'):>10}")


def write_json(path: str | Path, summaries: list[dict], extra: dict) -> None:
    Path(path).write_text(json.dumps({**extra, "runs": summaries}, indent=2))


def plot(path: str | Path, series: dict[str, list[dict]]) -> None:
    """Per server: output throughput (x) against TPOT and TTFT p50 (y), one point per load level."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'loom[bench]'") from err
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, runs in series.items():
        x = [r["output_throughput"] for r in runs]
        ax1.plot(x, [(r["tpot_p50"] or 0) * 1000 for r in runs], marker="o", label=name)
        ax2.plot(x, [(r["ttft_p50"] or 0) for r in runs], marker="o", label=name)
        for r, xi, yi in zip(runs, x, [(r["tpot_p50"] or 0) * 1000 for r in runs]):
            ax1.annotate(r["load"], (xi, yi), fontsize=8)
    ax1.set(xlabel="output tokens/s", ylabel="TPOT p50 (ms)", title="Decode latency vs throughput")
    ax2.set(xlabel="output tokens/s", ylabel="TTFT p50 (s)", title="Time to first token vs throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
