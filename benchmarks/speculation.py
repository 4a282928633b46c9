"""Speculative decoding on a real model, side by side: the same server started without and with `--speculate N`
(one at a time), each loaded by `loom bench` with copy-heavy chat requests (fix the typos in a paragraph, add type
hints to a function, summarise with quotes) and with random prompts, at each concurrency. Prints output tok/s,
TPOT and the share of drafts accepted, and the ratios (speculation over none).

    python benchmarks/speculation.py                       # the default model (SmolLM2-135M-Instruct Q4_1 GGUF)
    python benchmarks/speculation.py --model-id DIR --speculate 4 --concurrency 1 16

Greedy outputs are the same with and without speculation (the engine's tests check that), so both servers
generate the same tokens for the copy-heavy requests (which stop at EOS).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "declaration_of_independence.txt"


def _paragraphs(min_words: int = 60, max_words: int = 140) -> list[str]:
    words = re.sub(r"\s+", " ", TEXT.read_text()).split(" ")
    out, i = [], 0
    rng = random.Random(0)
    while i < len(words):
        n = rng.randint(min_words, max_words)
        out.append(" ".join(words[i : i + n]))
        i += n
    return [p for p in out if len(p.split()) >= min_words]


def _with_typos(text: str, rng: random.Random, rate: float = 0.08) -> str:
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and rng.random() < rate:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # two letters swapped
    return " ".join(words)


def _functions() -> list[str]:
    """Small untyped functions of the standard library."""
    import colorsys
    import fnmatch
    import posixpath

    funcs = [textwrap.indent, shlex.quote, colorsys.rgb_to_hsv, colorsys.hsv_to_rgb, fnmatch.translate,
             posixpath.relpath, posixpath.commonpath, textwrap.shorten, posixpath.splitext]
    out = []
    for f in funcs:
        try:
            src = textwrap.dedent(inspect.getsource(f))
        except (OSError, TypeError):  # implemented in C on this build
            continue
        tree = ast.parse(src)
        body = tree.body[0].body  # type: ignore[attr-defined]
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            del body[0]  # without its docstring
        src = ast.unparse(tree) + "\n"
        if len(src.splitlines()) <= 45:
            out.append(src)
    return out


def copy_heavy_prompts() -> list[str]:
    rng = random.Random(1)
    paragraphs = _paragraphs()
    prompts = []
    for p in paragraphs[:8]:
        prompts.append("Fix the typos in this paragraph. Reply with the corrected paragraph only.\n\n"
                       + _with_typos(p, rng))
    for src in _functions():
        prompts.append("Add type hints to this Python function. Reply with the function only.\n\n```python\n"
                       + src + "```")
    for p in paragraphs[8:14]:
        prompts.append("Summarise this text in two sentences, quoting its key phrases word for word.\n\n" + p)
    return prompts


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:  # noqa: S310 — local server
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("server not ready in time")


def _bench(url: str, args, extra: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "loom.cli", "bench", "--url", url, "--concurrency", *map(str, args.concurrency),
           "--no-progress", "--json", str(out), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-id", help="model to serve (default: loom launch's default model)")
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests-per-client", type=int, default=2, help="requests per load level = this × clients "
                                                                        "(at least 8)")
    ap.add_argument("--max-tokens", type=int, default=256, help="most tokens per copy-heavy answer (they stop at "
                                                                "EOS)")
    ap.add_argument("--port", type=int, default=3190)
    ap.add_argument("--json", help="write every figure to this file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loom-spec-bench-"))
    dataset = work / "copy_heavy.jsonl"
    prompts = copy_heavy_prompts()
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    n = max(8, args.requests_per_client * max(args.concurrency))
    workloads = {
        "copy-heavy": ["--api", "chat", "--dataset", str(dataset), "--output-tokens", str(args.max_tokens),
                       "--no-ignore-eos", "--num-prompts", str(n)],
        "random": ["--api", "openai", "--prompt-tokens", "256", "--output-tokens", "128", "--num-prompts", str(n)],
    }
    url = f"http://127.0.0.1:{args.port}"
    results: dict[str, dict[str, list[dict]]] = {}
    for label, spec in (("off", 0), (f"speculate {args.speculate}", args.speculate)):
        cmd = [sys.executable, "-m", "loom.cli", "launch", "--port", str(args.port)]
        if args.model_id:
            cmd += ["--model-id", args.model_id]
        if spec:
            cmd += ["--speculate", str(spec)]
        print("$", shlex.join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"server-{spec}.log", "w"),
                                env={**os.environ, "LOG_LEVEL": "info"})
        try:
            _wait_ready(url, proc)
            for name, extra in workloads.items():
                results.setdefault(name, {})[label] = _bench(url, args, extra, work / f"{name}-{spec}.json")
        finally:
            proc.terminate()
            proc.wait(60)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\nCPU: {cpu}, {os.cpu_count()} cores; {len(prompts)} copy-heavy prompts, {n} requests per level")
    print(f"{'workload':<11} {'load':<6} {'off tok/s':>9} {'spec tok/s':>10} {'ratio':>6} {'off TPOT':>9} "
          f"{'spec TPOT':>9} {'accepted':>8} {'drafts':>7}")
    label = f"speculate {args.speculate}"
    for name, by in results.items():
        for off, on in zip(by["off"], by[label]):
            ratio = on["output_throughput"] / off["output_throughput"] if off["output_throughput"] else 0
            acc = on.get("spec_acceptance")
            print(f"{name:<11} {off['load']:<6} {off['output_throughput']:>9.1f} {on['output_throughput']:>10.1f} "
                  f"{ratio:>5.2f}x {off['tpot_p50'] * 1e3:>7.1f}ms {on['tpot_p50'] * 1e3:>7.1f}ms "
                  f"{'-' if acc is None else f'{acc * 100:.0f}%':>8} {on.get('spec_draft_tokens', 0):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
